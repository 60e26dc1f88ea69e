"""The dist-ema config file: what to track, when to snapshot, where to store, in one TOML table.

    # configs/dist_ema.toml
    [dist_ema]
    sigma_rels = [0.05, 0.10]
    snapshot_every = 1000
    store = "s3://my-bucket/runs/exp1/snapshots"

    cfg = load_config("configs/dist_ema.toml")            # -> DistEMAConfig (validated)
    cfg = apply_overrides(cfg, {"store": "runs/x/snapshots"})  # command-line flags win
    ema = PostHocEMA(model, **cfg.ema_kwargs())

The file may hold other tables (a training script's own ``[train]`` settings, say); only
``[dist_ema]`` is read here. Unknown keys, wrong types and out-of-range values are errors
that name the field and the fix: a typo in a config file must not silently fall back to a
default for a run that takes days.

Scripts that use argparse get the matching flags from :func:`add_config_arguments` and the
merged result from :func:`config_from_args` (file first, then every flag that was given).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConfigError",
    "DistEMAConfig",
    "add_config_arguments",
    "apply_overrides",
    "config_from_args",
    "field_docs",
    "load_config",
    "load_toml",
    "parse_args",
    "unknown_flags_message",
]

TABLE = "dist_ema"  # the TOML table this module reads

# kept in step with dist_ema.store (tests check it); repeated here so that reading a
# config file never imports zarr
_STORAGE_DTYPES = ("float32", "bfloat16", "float16")
_COMPRESSIONS = ("blosc-lz4", "zstd")
_WRITERS = ("process", "thread", "sync")
_WHEN_BEHIND = ("block", "skip")
_ON_ERROR = ("raise", "warn")
_SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)  # gamma = 0 (a uniform average); see dist_ema.phema


class ConfigError(ValueError):
    """A config file (or override) that cannot be used; the message names the field and the fix."""


@dataclass(frozen=True)
class DistEMAConfig:
    """Settings of one dist-ema run: tracked profiles, update and snapshot schedule, store.

    Every field has a default, so an empty ``[dist_ema]`` table (or no file) is valid: it
    tracks sigma_rel 0.05 and 0.10 every step and writes no snapshots. Validation runs on
    construction (and on every :func:`apply_overrides`); errors name the field and the fix.
    """

    sigma_rels: tuple[float, ...] = (0.05, 0.10)
    """Tracked profiles: relative standard deviation of each power-function EMA, each in
    (0, 0.2887). Synthesis can later produce any sigma_rel from these; EDM2 tracks 0.05 and
    0.10. More profiles cost one fp32 copy of the (sharded) model each."""

    update_every: int = 1
    """Update the EMAs every this many optimizer steps (>= 1). Exact for any value (the
    skipped steps enter t_delta); larger values save update time on very large models."""

    snapshot_every: int | None = None
    """Write a snapshot every this many EMA *updates* (so every snapshot_every x update_every
    optimizer steps). None: only when the script calls ``ema.snapshot()``. Plan it with
    ``dist-ema error``: with 0.05 and 0.10 tracked, 25 snapshots spread over a run already
    reconstruct sigma_rel 0.06-0.15 to under 0.4%, 100 snapshots to under 0.03%."""

    store: str | None = None
    """Snapshot store URL: a local path, ``file://...``, ``s3://bucket/prefix`` or any fsspec
    URL. One store per run: a store with snapshots is only reused with resume. None: no
    snapshots (the EMAs still exist in memory)."""

    storage_options: dict[str, Any] | None = field(default=None, hash=False)
    """fsspec options for the store (e.g. ``endpoint_url``, ``profile``), a TOML table
    ``[dist_ema.storage_options]``. Default: the environment (AWS_*, FSSPEC_S3_*). Prefer
    the environment for credentials: config files get copied and committed."""

    storage_dtype: str = "float32"
    """Snapshot dtype: "float32" (exact resume), "bfloat16" or "float16" (half the bytes;
    synthesis still accumulates in float64)."""

    compression: str | None = None
    """Compression of stored snapshots: None / "none" (default; weights barely compress),
    "blosc-lz4" or "zstd"."""

    keep: int | None = None
    """Retention: None / "all" keeps every snapshot; an integer K >= 2 thins the store to at
    most K snapshots spread evenly over the run (never only the last K: that ruins
    synthesis of long profiles)."""

    writer: str = "process"
    """Who writes snapshots: "process" (default: a child process per rank, off the training
    loop's GIL), "thread", or "sync" (in the training loop; for debugging)."""

    when_behind: str = "block"
    """A snapshot due while the previous one is still being written on some rank: "block"
    (default: wait for it; nothing is skipped) or "skip" (skip this snapshot on every rank and
    log it: training never waits for a slow or unreachable store)."""

    on_error: str = "raise"
    """A snapshot write that failed after retries: "raise" (default: StoreError on every rank)
    or "warn" (log it, leave that snapshot out, keep training)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma_rels", _check_sigma_rels(self.sigma_rels))
        _check_int("update_every", self.update_every, minimum=1, example="update_every = 1", unit="optimizer steps")
        if self.snapshot_every is not None:
            _check_int("snapshot_every", self.snapshot_every, minimum=1, example="snapshot_every = 1000",
                       unit="EMA updates", optional=True)
        if self.store is not None:
            if not isinstance(self.store, str) or not self.store.strip():
                raise ConfigError(f"dist_ema.store must be a URL string; got {self.store!r}. "
                                  f'Fix: store = "runs/exp1/snapshots" or "s3://bucket/prefix", or leave it out')
            if self.store.startswith("memory://"):
                raise ConfigError(f"dist_ema.store = {self.store!r}: memory:// is private to one process, so the "
                                  f"ranks could never see each other's snapshots. Fix: use a local path or s3://")
        if self.storage_options is not None:
            if not isinstance(self.storage_options, Mapping) or not all(
                isinstance(k, str) for k in self.storage_options
            ):
                raise ConfigError(f"dist_ema.storage_options must be a table of fsspec options; got "
                                  f"{type(self.storage_options).__name__}. Fix: [dist_ema.storage_options] with "
                                  f'lines like endpoint_url = "http://..."')
            object.__setattr__(self, "storage_options", dict(self.storage_options))
        if self.storage_dtype not in _STORAGE_DTYPES:
            raise ConfigError(f"dist_ema.storage_dtype must be one of {list(_STORAGE_DTYPES)}; got "
                              f"{self.storage_dtype!r}. Fix: storage_dtype = \"float32\"")
        compression = self.compression
        if isinstance(compression, str) and compression.lower() == "none":
            compression = None
            object.__setattr__(self, "compression", None)
        if compression is not None and compression not in _COMPRESSIONS:
            raise ConfigError(f"dist_ema.compression must be \"none\" or one of {list(_COMPRESSIONS)}; got "
                              f"{compression!r}. Fix: leave it out (weights barely compress) or "
                              f"compression = \"blosc-lz4\"")
        if isinstance(self.keep, str) and self.keep.lower() == "all":
            object.__setattr__(self, "keep", None)
        if self.keep is not None:
            _check_int("keep", self.keep, minimum=2, example="keep = 200", unit="snapshots", optional=True,
                       extra=' or "all"')
        if self.writer not in _WRITERS:
            raise ConfigError(f"dist_ema.writer must be one of {list(_WRITERS)}; got {self.writer!r}. "
                              f"Fix: writer = \"process\"")
        if self.when_behind not in _WHEN_BEHIND:
            raise ConfigError(f"dist_ema.when_behind must be one of {list(_WHEN_BEHIND)}; got {self.when_behind!r}. "
                              f"Fix: when_behind = \"block\" (or \"skip\" to never wait for the store)")
        if self.on_error not in _ON_ERROR:
            raise ConfigError(f"dist_ema.on_error must be one of {list(_ON_ERROR)}; got {self.on_error!r}. "
                              f"Fix: on_error = \"raise\" (or \"warn\" to keep training without that snapshot)")

    def ema_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`dist_ema.PostHocEMA` (add ``resume=`` yourself).

        Raises ConfigError when ``snapshot_every`` or ``keep`` is set without a ``store``:
        checked here, not on construction, because the store often comes from a flag.
        """
        if self.store is None and (self.snapshot_every is not None or self.keep is not None):
            which = "snapshot_every" if self.snapshot_every is not None else "keep"
            raise ConfigError(f"dist_ema.{which} is set but dist_ema.store is not: snapshots need a place to go. "
                              f'Fix: store = "runs/exp1/snapshots" in [dist_ema], or pass --store URL')
        kw: dict[str, Any] = {"sigma_rels": self.sigma_rels, "update_every": self.update_every}
        if self.store is not None:
            kw.update(store=self.store, snapshot_every=self.snapshot_every, storage_options=self.storage_options,
                      storage_dtype=self.storage_dtype, compression=self.compression, keep=self.keep,
                      writer=self.writer, when_behind=self.when_behind, on_error=self.on_error)
        return kw

    def describe(self) -> str:
        """One line for logs (credentials in storage_options masked)."""
        head = f"sigma_rels={list(self.sigma_rels)} update_every={self.update_every}"
        if self.store is None:
            return f"{head} no snapshot store (the EMAs live in memory only)"
        opts = _redact(self.storage_options) if self.storage_options else None
        every = "on demand" if self.snapshot_every is None else f"every {self.snapshot_every} updates"
        return (f"{head} store={self.store} snapshots {every} dtype={self.storage_dtype} "
                f"compression={self.compression or 'none'} keep={self.keep or 'all'} writer={self.writer} "
                f"when_behind={self.when_behind} on_error={self.on_error}"
                + (f" storage_options={opts}" if opts else ""))


# ---------------------------------------------------------------------------------- checks


def _check_sigma_rels(value: object) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"dist_ema.sigma_rels must be a list of numbers; got {value!r}. "
                          f"Fix: sigma_rels = [0.05, 0.10]")
    out = []
    for x in value:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise ConfigError(f"dist_ema.sigma_rels must hold numbers; got {x!r} in {list(value)!r}. "
                              f"Fix: sigma_rels = [0.05, 0.10] (no quotes)")
        out.append(float(x))
    if not out:
        raise ConfigError("dist_ema.sigma_rels is empty: track at least one profile. Fix: sigma_rels = [0.05, 0.10]")
    bad = [x for x in out if not (0.0 < x < _SIGMA_REL_MAX)]
    if bad:
        raise ConfigError(f"dist_ema.sigma_rels must each be in (0, {_SIGMA_REL_MAX:.4f}); got {bad}. "
                          f"Fix: use values like sigma_rels = [0.05, 0.10] (sigma_rel is a fraction of the "
                          f"training time, not a decay rate like 0.999)")
    if len({round(x, 9) for x in out}) != len(out):
        raise ConfigError(f"dist_ema.sigma_rels lists a profile twice: {out}. Fix: list each sigma_rel once")
    return tuple(out)


def _check_int(name: str, value: object, *, minimum: int, example: str, unit: str, optional: bool = False,
               extra: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        hint = " (a string: drop the quotes)" if isinstance(value, str) and value.strip().isdigit() else ""
        leave = " or leave it out" if optional else ""
        raise ConfigError(f"dist_ema.{name} must be an integer >= {minimum} ({unit}){extra}; got {value!r}{hint}. "
                          f"Fix: {example}{leave}")


def _redact(options: Mapping[str, Any]) -> dict:
    from dist_ema.store.fs import redact

    return redact(dict(options))


# ---------------------------------------------------------------------------------- loading


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML file; ConfigError (with the file name and line) when it is not valid TOML."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError as e:
            raise ConfigError("reading TOML config files on Python 3.10 needs tomli: pip install tomli") from e
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {os.fspath(path)!r} does not exist. Fix: pass the path of a TOML file, "
                          f"e.g. --config configs/dist_ema.toml") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{os.fspath(path)}: not valid TOML: {e}") from None


def _from_table(table: object, where: str) -> DistEMAConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: [{TABLE}] must be a table; got {type(table).__name__}")
    names = [f.name for f in dataclasses.fields(DistEMAConfig)]
    unknown = [k for k in table if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{where}: unknown key {TABLE}.{k}; {hint}valid keys: {', '.join(names)}")
    values = dict(table)
    if isinstance(values.get("sigma_rels"), list):
        values["sigma_rels"] = tuple(values["sigma_rels"])
    try:
        return DistEMAConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_config(path: str | os.PathLike | None) -> DistEMAConfig:
    """Read the ``[dist_ema]`` table of a TOML file into a validated :class:`DistEMAConfig`.

    ``path=None`` gives the defaults. A file without a ``[dist_ema]`` table is an error
    (most likely the wrong file); an empty table is fine.

    Example:
        >>> cfg = load_config("configs/dist_ema.toml")
        >>> cfg.sigma_rels
        (0.05, 0.1)
    """
    if path is None:
        return DistEMAConfig()
    doc = load_toml(path)
    if TABLE not in doc:
        tables = ", ".join(f"[{k}]" for k in doc) or "none"
        raise ConfigError(f"{os.fspath(path)}: no [{TABLE}] table (tables found: {tables}). Fix: put the dist-ema "
                          f"settings under a [{TABLE}] header, see configs/dist_ema.toml")
    return _from_table(doc[TABLE], os.fspath(path))


def apply_overrides(config: DistEMAConfig, overrides: Mapping[str, Any]) -> DistEMAConfig:
    """A copy of ``config`` with the given fields replaced; ``None`` values are ignored.

    Meant for command-line flags (argparse leaves flags that were not given as None), so
    the file sets the defaults and the flags win. The result is validated again.

    Example:
        >>> cfg = apply_overrides(load_config("configs/dist_ema.toml"), {"store": "runs/x", "keep": None})
    """
    names = {f.name for f in dataclasses.fields(DistEMAConfig)}
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ConfigError(f"unknown dist-ema setting(s) {unknown}; valid: {', '.join(sorted(names))}")
    if isinstance(given.get("sigma_rels"), list):
        given["sigma_rels"] = tuple(given["sigma_rels"])
    try:
        return dataclasses.replace(config, **given)
    except ConfigError as e:
        raise ConfigError(f"command-line override: {e}") from None


# ---------------------------------------------------------------------------------- argparse

# flag -> config field; flags default to None so that "not given" never overrides the file
_FLAGS: dict[str, str] = {
    "--sigma-rels": "sigma_rels",
    "--update-every": "update_every",
    "--snapshot-every": "snapshot_every",
    "--store": "store",
    "--storage-options": "storage_options",
    "--storage-dtype": "storage_dtype",
    "--compression": "compression",
    "--keep": "keep",
    "--writer": "writer",
    "--when-behind": "when_behind",
    "--on-error": "on_error",
}


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"not JSON ({e}); e.g. '{{\"endpoint_url\": \"http://127.0.0.1:9000\"}}'"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"endpoint_url\": \"http://...\"}'")
    return value


def _keep(text: str) -> int | str:
    if text.lower() == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer K >= 2 (snapshots, thinned evenly over the run) or "
                                         f"'all'; got {text!r}") from None


def add_config_arguments(parser: argparse.ArgumentParser, config_flag: bool = True) -> None:
    """Add ``--config`` and one flag per config field (each overrides the file when given)."""
    g = parser.add_argument_group("dist-ema (override the [dist_ema] table of --config)")
    if config_flag:
        g.add_argument("--config", metavar="FILE.toml", default=None,
                       help="dist-ema config file with a [dist_ema] table (flags below override it)")
    g.add_argument("--sigma-rels", "--sigma-rel", type=float, nargs="+", metavar="S",
                   help="tracked profiles, each in (0, 0.2887)")
    g.add_argument("--update-every", type=int, metavar="N", help="update the EMAs every N optimizer steps")
    g.add_argument("--snapshot-every", type=int, metavar="N", help="snapshot every N EMA updates")
    g.add_argument("--store", metavar="URL", help="snapshot store: local path, s3://bucket/prefix, ...")
    g.add_argument("--storage-options", type=_json_object, metavar="JSON", help="fsspec options as a JSON object")
    g.add_argument("--storage-dtype", choices=_STORAGE_DTYPES, help="snapshot dtype")
    g.add_argument("--compression", choices=("none", *_COMPRESSIONS), help="snapshot compression")
    g.add_argument("--keep", type=_keep, metavar="K|all", help="keep at most K snapshots, spread over the run")
    g.add_argument("--writer", choices=_WRITERS, help="snapshot writer")
    g.add_argument("--when-behind", choices=_WHEN_BEHIND, help="a snapshot due while the last is being written")
    g.add_argument("--on-error", choices=_ON_ERROR, help="a snapshot write that failed after retries")


def config_from_args(args: argparse.Namespace) -> DistEMAConfig:
    """The file named by ``args.config`` (or the defaults) with the flags that were given applied."""
    cfg = load_config(getattr(args, "config", None))
    overrides = {name: getattr(args, flag[2:].replace("-", "_"), None) for flag, name in _FLAGS.items()}
    return apply_overrides(cfg, overrides)


class FieldDocs(dict):
    """{field: docstring}; printed, one entry per key with its default and flag (the README's table)."""

    def __str__(self) -> str:
        import textwrap

        flags = {name: flag for flag, name in _FLAGS.items()}
        defaults = {f.name: f.default for f in dataclasses.fields(DistEMAConfig)}
        unset = {"compression": '"none"', "keep": '"all"', "storage_options": "the environment"}  # None means
        out = []
        for name, doc in self.items():
            d = defaults[name]
            d = unset.get(name, "none") if d is None else json.dumps(list(d) if isinstance(d, tuple) else d)
            out.append(f"{name} (default {d}; flag {flags[name]})")
            out += textwrap.wrap(" ".join(doc.split()), 96, initial_indent="    ", subsequent_indent="    ",
                                 break_on_hyphens=False)
        return "\n".join(out)


def field_docs() -> FieldDocs:
    """The docstring of every :class:`DistEMAConfig` field (for help texts and the README's reference).

    A dict; ``print(field_docs())`` shows each key with its default, flag and text::

        >>> print(field_docs())
        sigma_rels (default [0.05, 0.1]; flag --sigma-rels)
            Tracked profiles: ...
    """
    tree = ast.parse(inspect.getsource(DistEMAConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = FieldDocs()
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


# ---------------------------------------------------------------------------------- flag typos


def unknown_flags_message(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> str:
    """argparse's "unrecognized arguments" line, with the closest flag of ``parser`` for each typo.

    Example: ``unrecognized arguments: --verfy (did you mean --verify?)``.
    """
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    words = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6) if flag.startswith("-") else []
        words.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
    return f"unrecognized arguments: {' '.join(words)}"


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but a mistyped flag names the closest valid one (exit 2)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(unknown_flags_message(parser, unknown))
    return args
