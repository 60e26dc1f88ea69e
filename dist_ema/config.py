"""The settings of dist-ema, validated in one place: one check per field for every entry point.

Three frozen dataclasses share the checks of this module's field table:

* :class:`EMAConfig`: what a :class:`~dist_ema.PostHocEMA` tracks and how often;
* :class:`SnapshotConfig`: where and how its snapshots are written;
* :class:`DistEMAConfig`: the ``[dist_ema]`` table of a config file, both of the above in
  one flat table (:meth:`DistEMAConfig.ema_config` and :meth:`DistEMAConfig.snapshot_config`
  give the two parts).

A field is checked by the same function whichever way it comes in (keyword argument,
config file, command-line flag); only the name in the message differs
(``writer`` / ``dist_ema.writer``).

The config file::

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from dist_ema import phema
from dist_ema.errors import DistEMAError

__all__ = [
    "Buffers",
    "Compression",
    "ConfigError",
    "DistEMAConfig",
    "EMAConfig",
    "OnError",
    "SnapshotConfig",
    "StorageDtype",
    "UpdateImpl",
    "WhenBehind",
    "Writer",
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

Buffers = Literal["copy", "ignore"]
UpdateImpl = Literal["auto", "fused", "foreach"]
StorageDtype = Literal["float32", "bfloat16", "float16"]
Compression = Literal["blosc-lz4", "zstd"]  # or None: uncompressed
Writer = Literal["process", "thread", "sync"]
WhenBehind = Literal["block", "skip"]
OnError = Literal["raise", "warn"]

# kept in step with dist_ema.store (tests check it); repeated here so that reading a
# config file never imports zarr
_STORAGE_DTYPES: tuple[str, ...] = get_args(StorageDtype)
_COMPRESSIONS: tuple[str, ...] = get_args(Compression)
_WRITERS: tuple[str, ...] = get_args(Writer)
_WHEN_BEHIND: tuple[str, ...] = get_args(WhenBehind)
_ON_ERROR: tuple[str, ...] = get_args(OnError)
DEFAULT_MAX_OBJECT_BYTES = 1 * 2**20  # = dist_ema.store.layout.DEFAULT_MAX_OBJECT_BYTES (the inner chunk)


class ConfigError(DistEMAError, ValueError):
    """A setting (keyword argument, config file entry or flag) that cannot be used; the message names
    the field and the fix."""


# ---------------------------------------------------------------------------------- field checks
#
# One function per field: ``check(value, name) -> normalized value``, raising ConfigError that
# names the field as ``name`` spells it (``writer`` for a keyword, ``dist_ema.writer`` in a file).


def _spell(choices: Sequence[str]) -> str:
    quoted = [repr(c) for c in choices]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _check_choice(value: object, name: str, choices: Sequence[str], fix: str, what: str = "") -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be {what}{_spell(choices)}; got {value!r}. Fix: {fix}")
    return value


def _check_int(name: str, value: object, *, minimum: int, example: str, unit: str, optional: bool = False,
               extra: str = "") -> int | None:
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        hint = " (a string: drop the quotes)" if isinstance(value, str) and value.strip().isdigit() else ""
        leave = " or leave it out" if optional else ""
        raise ConfigError(f"{name} must be an integer >= {minimum} ({unit}){extra}; got {value!r}{hint}. "
                          f"Fix: {example}{leave}")
    return value


def _numbers(value: object, name: str, example: str) -> list[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"{name} must be a list of numbers; got {value!r}. Fix: {example}")
    out = []
    for x in value:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise ConfigError(f"{name} must hold numbers; got {x!r} in {list(value)!r}. Fix: {example} (no quotes)")
        out.append(float(x))
    if not out:
        raise ConfigError(f"{name} is empty: track at least one profile. Fix: {example}")
    return out


def _check_distinct(gammas: Sequence[float], values: Sequence[float], name: str, unit: str) -> None:
    if any(phema.find_gamma(gammas[:i], g) is not None for i, g in enumerate(gammas)):
        raise ConfigError(f"{name} lists a profile twice: {list(values)}. Fix: list each {unit} once")


def check_sigma_rels(value: object, name: str = "sigma_rels") -> tuple[float, ...]:
    """The tracked profiles as sigma_rels: a number or a list of distinct numbers in (0, 0.2887)."""
    example = "sigma_rels = [0.05, 0.10]"
    out = _numbers(value, name, example)
    bad = [x for x in out if not (0.0 < x < phema.SIGMA_REL_MAX)]
    if bad:
        raise ConfigError(f"{name} must each be in (0, {phema.SIGMA_REL_MAX:.4f}); got {bad}. "
                          f"Fix: use values like {example} (sigma_rel is a fraction of the "
                          f"training time, not a decay rate like 0.999)")
    _check_distinct([float(g) for g in phema.sigma_rel_to_gamma(out)], out, name, "sigma_rel")
    return tuple(out)


def check_gammas(value: object, name: str = "gammas") -> tuple[float, ...]:
    """The tracked profiles as power-function exponents: a number or a list of distinct numbers >= 0."""
    out = _numbers(value, name, "gammas = [16.97, 6.94]")
    bad = [x for x in out if not 0.0 <= x < math.inf]
    if bad:
        raise ConfigError(f"{name} must be >= 0; got {bad}. gamma = 0 is the uniform average; typical values "
                          f"are 5-30. Fix: gammas = [16.97, 6.94] (sigma_rels 0.05 and 0.10)")
    _check_distinct(out, out, name, "gamma")
    return tuple(out)


def check_update_every(value: object, name: str = "update_every") -> int:
    return _check_int(name, value, minimum=1, example="update_every = 1", unit="optimizer steps")


def check_batch_size(value: object, name: str = "batch_size") -> int | None:
    return _check_int(name, value, minimum=1, example="batch_size = 256 (samples per step, all ranks)",
                      unit="samples per optimizer step", optional=True)


def check_snapshot_every(value: object, name: str = "snapshot_every") -> int | None:
    return _check_int(name, value, minimum=1, example="snapshot_every = 1000", unit="EMA updates", optional=True)


def check_store(value: object, name: str = "store") -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"{name} must be a URL string; got {value!r}. "
                          f'Fix: store = "runs/exp1/snapshots" or "s3://bucket/prefix", or leave it out')
    return value


def check_storage_options(value: object, name: str = "storage_options") -> dict | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{name} must be a table of fsspec options; got {type(value).__name__}. Fix: "
                          f'[dist_ema.storage_options] with lines like endpoint_url = "http://..." '
                          f"(storage_options={{'endpoint_url': ...}} as a keyword)")
    return dict(value)


def check_storage_dtype(value: object, name: str = "storage_dtype") -> str:
    return _check_choice(value, name, _STORAGE_DTYPES, 'storage_dtype = "float32"', what="a storage dtype, ")


def check_compression(value: object, name: str = "compression") -> str | None:
    """None, or "none" (spelled out in a file or flag) for no compression, or a codec."""
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    return _check_choice(value, name, ("none", *_COMPRESSIONS),
                         'leave it out (weights barely compress) or compression = "blosc-lz4"')


def check_keep(value: object, name: str = "keep") -> int | None:
    """None or "all" keeps every snapshot; an integer K >= 2 thins them to K."""
    if isinstance(value, str) and value.lower() == "all":
        return None
    return _check_int(name, value, minimum=2, example="keep = 200", unit="snapshots", optional=True,
                      extra=' or "all"')


def check_max_object_bytes(value: object, name: str = "max_object_bytes") -> int:
    return _check_int(name, value, minimum=4, example=f"max_object_bytes = {DEFAULT_MAX_OBJECT_BYTES}",
                      unit="bytes per inner chunk")


def check_slots(value: object, name: str = "slots") -> int:
    return _check_int(name, value, minimum=1, example="slots = 2", unit="staging buffers")


def check_writer(value: object, name: str = "writer") -> str:
    return _check_choice(value, name, _WRITERS, 'writer = "process"')


def check_when_behind(value: object, name: str = "when_behind") -> str:
    return _check_choice(value, name, _WHEN_BEHIND,
                         'when_behind = "block" (or "skip" to never wait for the store)')


def check_timeout(value: object, name: str = "timeout") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < float(value) < float("inf")):
        raise ConfigError(f"{name} must be a positive number of seconds; got {value!r}. Fix: {name} = 300")
    return float(value)


def check_on_error(value: object, name: str = "on_error") -> str:
    return _check_choice(value, name, _ON_ERROR,
                         'on_error = "raise" (or "warn" to keep training without that snapshot)')


def check_buffers(value: object, name: str = "buffers") -> str:
    return _check_choice(value, name, get_args(Buffers), 'buffers = "copy"')


def check_update_impl(value: object, name: str = "update_impl") -> str:
    return _check_choice(value, name, get_args(UpdateImpl), 'update_impl = "auto"')


def check_resume(value: object, name: str = "resume") -> bool | str:
    """True, False or "takeover" exactly: a typo ("takeovr") must not pass as a true value."""
    if value is True or value is False or (isinstance(value, str) and value == "takeover"):
        return value
    raise ConfigError(f"{name} must be True, False or 'takeover'; got {value!r}. Fix: {name}=True continues the run "
                      f"in the store, {name}='takeover' also takes the store over from another job that owns it "
                      f"(docs/commit-protocol.md), {name}=False starts a new run (an empty store)")


# field -> its check; the three config classes validate through this table only
FIELD_CHECKS: dict[str, Callable[[object, str], Any]] = {
    "sigma_rels": check_sigma_rels,
    "gammas": check_gammas,
    "update_every": check_update_every,
    "batch_size": check_batch_size,
    "buffers": check_buffers,
    "update_impl": check_update_impl,
    "snapshot_every": check_snapshot_every,
    "store": check_store,
    "storage_options": check_storage_options,
    "storage_dtype": check_storage_dtype,
    "compression": check_compression,
    "keep": check_keep,
    "max_object_bytes": check_max_object_bytes,
    "slots": check_slots,
    "writer": check_writer,
    "when_behind": check_when_behind,
    "on_error": check_on_error,
    "timeout": check_timeout,
}


def _validate(obj: object, prefix: str = "", renamed: Mapping[str, str] | None = None,
              skip: Sequence[str] = ()) -> None:
    """Check every field of the frozen dataclass ``obj`` that has a check and store the normalized value.

    ``renamed`` maps an attribute to the field (keyword) it is spelled as for users
    (``SnapshotConfig.url`` is the ``store`` keyword).
    """
    renamed = renamed or {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        key = renamed.get(f.name, f.name)
        check = FIELD_CHECKS.get(key)
        if check is not None and f.name not in skip:
            object.__setattr__(obj, f.name, check(getattr(obj, f.name), prefix + key))


# ---------------------------------------------------------------------------------- the configs


@dataclass(frozen=True)
class EMAConfig:
    """What to track and how often.

    Attributes:
        sigma_rels: relative std of each tracked profile, each in (0, 0.2887). Give this
            or ``gammas``. Default when neither is given: (0.05, 0.10), as in EDM2.
        gammas: power-function exponents (>= 0) instead of sigma_rels.
        update_every: update the EMA every this many optimizer steps (>= 1). Exact:
            the skipped steps enter t_delta. Default 1.
        batch_size: samples per optimizer step (global). When given, time is counted
            in samples ("nimg") instead of steps. Coefficients do not depend on it.
        include_frozen: also track parameters with requires_grad=False (their EMA
            equals the parameter; tracking them keeps synthesized state dicts complete).
        buffers: "copy" stores each buffer's current value with every snapshot and in
            full state dicts; "ignore" leaves buffers out.
        update_impl: how update() runs. "auto" (default): each source read once for all
            profiles where that helps: small tensors staged into one flat buffer (one copy
            call, then one flat update per profile), runs of >= 64Ki elements through one
            torch.compile'd kernel for all profiles (compiled once per process; if compile
            is unavailable or fails it is logged once and foreach is used). "fused": also
            compile the small runs. "foreach": one ``torch._foreach_lerp_`` per profile.
    """

    sigma_rels: tuple[float, ...] | None = None
    gammas: tuple[float, ...] | None = None
    update_every: int = 1
    batch_size: int | None = None
    include_frozen: bool = True
    buffers: Buffers = "copy"
    update_impl: UpdateImpl = "auto"

    def __post_init__(self) -> None:
        if self.sigma_rels is not None and self.gammas is not None:
            raise ConfigError("give either sigma_rels or gammas for the tracked profiles, not both")
        if self.sigma_rels is None and self.gammas is None:
            object.__setattr__(self, "sigma_rels", (0.05, 0.10))
        _validate(self, skip=("gammas",) if self.gammas is None else ("sigma_rels",))
        if self.gammas is None:
            gammas = tuple(float(g) for g in phema.sigma_rel_to_gamma(self.sigma_rels))
            object.__setattr__(self, "gammas", gammas)
        else:
            sigma_rels = tuple(float(s) for s in phema.gamma_to_sigma_rel(self.gammas))
            object.__setattr__(self, "sigma_rels", sigma_rels)

    @property
    def unit(self) -> str:
        return "samples" if self.batch_size is not None else "steps"


@dataclass(frozen=True, repr=False)
class SnapshotConfig:
    """Where and how snapshots are written.

    Attributes:
        url: store URL: local path, ``file://``, ``s3://bucket/prefix`` or any fsspec URL
            (the ``store`` keyword of PostHocEMA).
        snapshot_every: write a snapshot every this many EMA updates (None: only on demand).
        storage_options: fsspec options (endpoint_url, key, secret, ...); default: environment.
        dtype: storage dtype, "float32" (default, exact resume), "bfloat16" or "float16"
            (the ``storage_dtype`` keyword).
        compression: None (default; weights barely compress), "blosc-lz4" or "zstd".
        keep: None keeps every snapshot; an integer K >= 2 thins to at most K snapshots
            spread evenly over the run (never only the last K: that ruins synthesis).
        max_object_bytes: size of one inner chunk (default 1 MiB): a rank's data of one profile is
            ONE object (a zarr shard) of such chunks, each with its own crc32c, the unit of a
            partial read and of a checksum.
        writer: "process" (default: off the training process's GIL), "thread" or "sync".
        slots: staging buffers (2: one snapshot in flight beyond the one being staged).
        when_behind: what a snapshot does when a staging slot is still busy on some rank:
            "block" (default) waits for the oldest write (backpressure, nothing skipped);
            "skip" skips that snapshot on every rank, logs it and lists it in
            ``ema.snapshots.skipped`` (training never waits for a slow or unreachable store).
        on_error: a write that failed after retries: "raise" (default) raises StoreError on
            every rank at the next snapshot()/close() (or halfway between snapshots);
            "warn" logs it, lists the snapshot in ``skipped`` and keeps training.
        timeout: seconds dist-ema's own collectives (start-up, snapshot exchanges and commits)
            wait for a rank before every other rank raises (default 300).
    """

    url: str
    snapshot_every: int | None = None
    storage_options: dict | None = None
    dtype: StorageDtype = "float32"
    compression: Compression | None = None
    keep: int | None = None
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    writer: Writer = "process"
    slots: int = 2
    when_behind: WhenBehind = "block"
    on_error: OnError = "raise"
    timeout: float = 300.0

    def __repr__(self) -> str:  # never show credentials
        fields = ", ".join(
            f"{k}={_redact(v) if k == 'storage_options' and v else v!r}" for k, v in self.__dict__.items()
        )
        return f"SnapshotConfig({fields})"

    def __post_init__(self) -> None:
        if self.url is None:
            raise ConfigError("store must be a URL string (a local path, file://, s3://bucket/prefix); got None")
        _validate(self, renamed={"url": "store", "dtype": "storage_dtype"})


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

    storage_dtype: StorageDtype = "float32"
    """Snapshot dtype: "float32" (exact resume), "bfloat16" or "float16" (half the bytes;
    synthesis still accumulates in float64)."""

    compression: Compression | None = None
    """Compression of stored snapshots: None / "none" (default; weights barely compress),
    "blosc-lz4" or "zstd"."""

    keep: int | None = None
    """Retention: None / "all" keeps every snapshot; an integer K >= 2 thins the store to at
    most K snapshots spread evenly over the run (never only the last K: that ruins
    synthesis of long profiles)."""

    writer: Writer = "process"
    """Who writes snapshots: "process" (default: a child process per rank, off the training
    loop's GIL), "thread", or "sync" (in the training loop; for debugging)."""

    when_behind: WhenBehind = "block"
    """A snapshot due while the previous one is still being written on some rank: "block"
    (default: wait for it; nothing is skipped) or "skip" (skip this snapshot on every rank and
    log it: training never waits for a slow or unreachable store)."""

    on_error: OnError = "raise"
    """A snapshot write that failed after retries: "raise" (default: StoreError on every rank)
    or "warn" (log it, leave that snapshot out, keep training)."""

    timeout: float = 300.0
    """Seconds dist-ema's own collectives (start-up, snapshot exchanges and commits) wait for a
    rank that stopped responding before every other rank raises a clear error (default 300; a
    rank stuck inside the engine's own collectives is the process group's timeout)."""

    def __post_init__(self) -> None:
        _validate(self, prefix=f"{TABLE}.")
        if self.store is not None and self.store.startswith("memory://"):
            # a config file describes a real (multi-process) run
            raise ConfigError(f"dist_ema.store = {self.store!r}: memory:// is private to one process, so the "
                              f"ranks could never see each other's snapshots. Fix: use a local path or s3://")

    def ema_config(self) -> EMAConfig:
        """The tracking part of these settings."""
        return EMAConfig(sigma_rels=self.sigma_rels, update_every=self.update_every)

    def snapshot_config(self) -> SnapshotConfig | None:
        """The snapshot part of these settings; None without a store."""
        if self.store is None:
            return None
        return SnapshotConfig(url=self.store, snapshot_every=self.snapshot_every,
                              storage_options=self.storage_options, dtype=self.storage_dtype,
                              compression=self.compression, keep=self.keep, writer=self.writer,
                              when_behind=self.when_behind, on_error=self.on_error, timeout=self.timeout)

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
                      writer=self.writer, when_behind=self.when_behind, on_error=self.on_error,
                      timeout=self.timeout)
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


# ---------------------------------------------------------------------------------- helpers


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
    "--timeout": "timeout",
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
