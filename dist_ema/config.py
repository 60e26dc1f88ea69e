"""The settings of dist-ema, from one source: each field of a component's config dataclass.

Two frozen dataclasses list every setting, each field with one docstring (its reference text):

* :class:`EMAConfig`: what a :class:`~dist_ema.PostHocEMA` tracks and how often;
* :class:`SnapshotConfig`: where and how its snapshots are written.

Everything else is made from those fields, so nothing can drift from them:

* :class:`DistEMAConfig`, the ``[dist_ema]`` table of a config file: both parts in one flat
  table, one key per field (its PostHocEMA keyword; ``SnapshotConfig.url`` is ``store``,
  ``SnapshotConfig.dtype`` is ``storage_dtype``);
* the command-line flags of :func:`add_config_arguments` (``--snapshot-every`` for
  ``snapshot_every``; a field's metadata may spell its flag otherwise);
* :func:`field_docs` (help texts) and the README's config table (:func:`readme_table`,
  ``python -m dist_ema.config --readme``; a test checks that the README holds it).

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
import functools
import inspect
import json
import math
import os
import re
import sys
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from dist_ema import phema
from dist_ema.errors import ConfigError
from dist_ema.store.format import DEFAULT_INNER_BYTES
from dist_ema.store.multipart import DEFAULT_CONCURRENCY, DEFAULT_PART_BYTES, MAX_PART_BYTES, MIN_PART_BYTES

MAX_CONCURRENCY = 64  # parts in flight per rank (upload_concurrency)

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_INNER_BYTES",
    "DEFAULT_PART_BYTES",
    "DEFAULT_SIGMA_RELS",
    "Buffers",
    "Compression",
    "ConfigError",
    "DistEMAConfig",
    "EMAConfig",
    "OnError",
    "Params",
    "SnapshotConfig",
    "StorageDtype",
    "UpdateImpl",
    "WhenBehind",
    "Writer",
    "add_config_arguments",
    "apply_overrides",
    "config_from_args",
    "field_docs",
    "flag_of",
    "inner_chunk_bytes_of",
    "load_config",
    "load_toml",
    "parse_args",
    "readme_table",
    "unknown_flags_message",
]

TABLE = "dist_ema"  # the TOML table this module reads
DEFAULT_SIGMA_RELS = (0.05, 0.10)  # tracked when neither sigma_rels nor gammas is given, as in EDM2

Buffers = Literal["copy", "ignore"]
UpdateImpl = Literal["auto", "fused", "foreach"]
StorageDtype = Literal["float32", "bfloat16", "float16"]
Compression = Literal["blosc-lz4", "zstd"]  # or None: uncompressed
Writer = Literal["process", "thread", "sync"]
WhenBehind = Literal["block", "skip"]
OnError = Literal["raise", "warn"]
Params = tuple[str, ...] | str | list[str] | Callable[[str, Any], bool] | None  # PostHocEMA(params=...)

# kept in step with dist_ema.store (tests check it); repeated here so that reading a
# config file never imports zarr
_STORAGE_DTYPES: tuple[str, ...] = get_args(StorageDtype)
_COMPRESSIONS: tuple[str, ...] = get_args(Compression)
_WRITERS: tuple[str, ...] = get_args(Writer)
_WHEN_BEHIND: tuple[str, ...] = get_args(WhenBehind)
_ON_ERROR: tuple[str, ...] = get_args(OnError)
# old key -> new key: still accepted (keyword, config key), with a DeprecationWarning naming the new one
RENAMED = {"max_object_bytes": "inner_chunk_bytes"}


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
               extra: str = "", maximum: tuple[int, str] | None = None) -> int | None:
    """An integer >= minimum; ``maximum``: (the largest value, why) where there is one."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        hint = " (a string: drop the quotes)" if isinstance(value, str) and value.strip().isdigit() else ""
        leave = " or leave it out" if optional else ""
        raise ConfigError(f"{name} must be an integer >= {minimum} ({unit}){extra}; got {value!r}{hint}. "
                          f"Fix: {example}{leave}")
    if maximum is not None and value > maximum[0]:
        raise ConfigError(f"{name} must be at most {maximum[0]} ({maximum[1]}); got {value!r}. Fix: {example}")
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


def check_inner_chunk_bytes(value: object, name: str = "inner_chunk_bytes") -> int:
    return _check_int(name, value, minimum=4, example=f"inner_chunk_bytes = {DEFAULT_INNER_BYTES}",
                      unit="bytes per inner chunk")


def inner_chunk_bytes_of(inner_chunk_bytes: int, max_object_bytes: int | None, stacklevel: int = 2) -> int:
    """``inner_chunk_bytes``, or the value given under its old name ``max_object_bytes``.

    The old name warns (DeprecationWarning naming the new one); both names with different
    values is a ConfigError.

    Example:
        >>> inner_chunk_bytes_of(DEFAULT_INNER_BYTES, 4096)  # DeprecationWarning: use inner_chunk_bytes
        4096
    """
    if max_object_bytes is None:
        return inner_chunk_bytes
    warnings.warn(_renamed_message("max_object_bytes", ""), DeprecationWarning, stacklevel=stacklevel + 1)
    if inner_chunk_bytes not in (DEFAULT_INNER_BYTES, max_object_bytes):
        raise ConfigError(f"max_object_bytes={max_object_bytes} and inner_chunk_bytes={inner_chunk_bytes} name the "
                          f"same setting. Fix: give inner_chunk_bytes only")
    return max_object_bytes


def _renamed_message(old: str, prefix: str) -> str:
    new = RENAMED[old]
    return (f"{prefix}{old} is deprecated: it is the size of one inner chunk of a snapshot's shard; "
            f"use {prefix}{new} (same value)")


def check_slots(value: object, name: str = "slots") -> int:
    return _check_int(name, value, minimum=1, example="slots = 2", unit="staging buffers")


def check_upload_part_bytes(value: object, name: str = "upload_part_bytes") -> int:
    """S3's limits: every part but the last is 5 MiB to 5 GiB."""
    example = f"upload_part_bytes = {DEFAULT_PART_BYTES} ({DEFAULT_PART_BYTES // 2**20} MiB)"
    return _check_int(name, value, minimum=MIN_PART_BYTES, example=example,  # type: ignore[return-value]
                      unit="bytes per part; 5 MiB is S3's smallest",
                      maximum=(MAX_PART_BYTES, "5 GiB, S3's largest part"))


def check_upload_concurrency(value: object, name: str = "upload_concurrency") -> int:
    return _check_int(name, value, minimum=1, example=f"upload_concurrency = {DEFAULT_CONCURRENCY}",  # type: ignore[return-value]
                      unit="parts in flight per rank",
                      maximum=(MAX_CONCURRENCY, "parts in flight per rank: each holds a part in memory"))


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


def check_params(value: object, name: str = "params") -> tuple[str, ...] | Callable[[str, Any], bool] | None:
    """None, glob patterns (a string or a list of them: a tuple of non-empty strings) or, from Python, a
    predicate (name, param) -> bool (kept as it is; see dist_ema.sharding.select)."""
    example = 'params = ["*.lora_*"] (glob patterns on the parameter names), or params=lambda name, p: ... in Python'
    if value is None or callable(value):
        return value  # type: ignore[return-value]
    if isinstance(value, str):
        value = (value,)
    if isinstance(value, (list, tuple)) and not value:
        raise ConfigError(f"{name} is empty: it would track nothing. Fix: {example}, or leave it out to track "
                          f"every parameter")
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v.strip() for v in value):
        return tuple(value)
    raise ConfigError(f"{name} must be a glob pattern, a list of them or a callable (name, param) -> bool; got "
                      f"{value!r}. Fix: {example}")


def check_include_frozen(value: object, name: str = "include_frozen") -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false; got {value!r}. Fix: {name} = true (no quotes)")
    return value


def check_offload(value: object, name: str = "offload") -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false; got {value!r}. Fix: {name} = true (no quotes)")
    return value


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
    "include_frozen": check_include_frozen,
    "params": check_params,
    "buffers": check_buffers,
    "update_impl": check_update_impl,
    "offload": check_offload,
    "snapshot_every": check_snapshot_every,
    "store": check_store,
    "storage_options": check_storage_options,
    "storage_dtype": check_storage_dtype,
    "compression": check_compression,
    "keep": check_keep,
    "inner_chunk_bytes": check_inner_chunk_bytes,
    "slots": check_slots,
    "upload_part_bytes": check_upload_part_bytes,
    "upload_concurrency": check_upload_concurrency,
    "writer": check_writer,
    "when_behind": check_when_behind,
    "on_error": check_on_error,
    "timeout": check_timeout,
}


def _key(f: dataclasses.Field) -> str:
    """The field's key: its PostHocEMA keyword and config key (``SnapshotConfig.url`` is ``store``)."""
    return f.metadata.get("key", f.name)


def _validate(obj: object, prefix: str = "", skip: Sequence[str] = ()) -> None:
    """Check every field of the frozen dataclass ``obj`` and store the normalized value.

    Each field is checked by FIELD_CHECKS[its key] and named ``prefix + key`` in errors.
    """
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        if f.name not in skip:
            value = FIELD_CHECKS[_key(f)](getattr(obj, f.name), prefix + _key(f))
            object.__setattr__(obj, f.name, value)


# ---------------------------------------------------------------------------------- the configs
#
# Each field: a default, one docstring (the reference text: help, field_docs(), the README's table)
# and, where the generated key or flag needs it, metadata from setting().


def setting(default: Any, *, key: str | None = None, flag: str | None = None, aliases: Sequence[str] = (),
            metavar: str | None = None, parse: Callable[[str], Any] | None = None, shown: Any = None,
            unset: str | None = None, hash: bool | None = None) -> Any:
    """A config field with what its key, flag and README row need beyond its type and docstring.

    key: the keyword and config key when it is not the field's name; flag: the command-line
    flag when it is not ``--`` + the key with dashes (say, when a training script's own flag
    takes that name); aliases: more flags; metavar / parse: argparse's ``metavar`` / ``type``;
    shown: the default as documented when the field's default (None) stands for it; unset: the
    words for a None default ("the environment").
    """
    meta = {"key": key, "flag": flag, "aliases": tuple(aliases), "metavar": metavar, "parse": parse,
            "shown": shown, "unset": unset}
    return field(default=default, hash=hash, metadata={k: v for k, v in meta.items() if v not in (None, ())})


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


@dataclass(frozen=True)
class EMAConfig:
    """What to track and how often: the tracking keywords of :class:`~dist_ema.PostHocEMA`.

    Give ``sigma_rels`` or ``gammas`` (not both); after construction both are set, one
    derived from the other. Validation runs on construction; errors name the field and the fix.
    """

    sigma_rels: tuple[float, ...] | None = setting(None, aliases=("--sigma-rel",), metavar="S",
                                                   shown=list(DEFAULT_SIGMA_RELS))
    """Tracked profiles: relative standard deviation of each power-function EMA, each in
    (0, 0.2887). Synthesis can later produce any sigma_rel from these; EDM2 tracks 0.05 and
    0.10 (the default, unless gammas is given). More profiles cost one fp32 copy of the
    (sharded) model each."""

    update_every: int = 1
    """Update the EMAs every this many optimizer steps (>= 1). Exact for any value (the
    skipped steps enter t_delta); larger values save update time on very large models."""

    gammas: tuple[float, ...] | None = setting(None, metavar="G")
    """The tracked profiles as power-function exponents (each >= 0) instead of sigma_rels;
    give one of the two. gamma = 0 is the uniform average; sigma_rels 0.05 and 0.10 are
    gammas 16.97 and 6.94."""

    batch_size: int | None = setting(None, flag="--ema-batch-size")
    """Samples per optimizer step, all ranks together. When given, time is counted in samples
    ("nimg", as in EDM2) instead of optimizer steps; the synthesized EMAs do not depend on it.
    None: time in steps. Its flag is --ema-batch-size (a training script's --batch-size is
    usually its own, per rank)."""

    include_frozen: bool = True
    """Also track parameters with requires_grad=False: their EMA equals the parameter, and
    tracking them keeps synthesized state dicts complete (--no-include-frozen leaves them out)."""

    params: tuple[str, ...] | Callable[[str, Any], bool] | None = setting(
        None, flag="--ema-params", metavar="PATTERN", unset="every parameter")
    """Track only these parameters: glob patterns on the model's clean parameter names (fnmatch,
    case-sensitive; one string or a list, e.g. ["*.lora_*"]), or in Python a predicate
    ``params=lambda name, p: ...``. Buffers follow the same rule (kept when the name matches). A
    pattern matching no name is an error; every rank must choose the same; the store records the
    choice, and synthesis, exports and load_synthesized cover exactly that set. With
    include_frozen=False frozen ones are left out as well."""

    buffers: Buffers = "copy"
    """"copy" stores each buffer's current value with every snapshot and in full state dicts;
    "ignore" leaves buffers out."""

    update_impl: UpdateImpl = "auto"
    """How update() runs. "auto" (default): each source read once for all profiles where that
    helps: small tensors staged into one flat buffer (one copy call, then one flat update per
    profile), runs of >= 64Ki elements through one torch.compile'd kernel for all profiles
    (compiled once per process; if compile is unavailable or fails it is logged once and
    foreach is used). "fused": also compile the small runs. "foreach": one
    ``torch._foreach_lerp_`` per profile."""

    offload: bool = False
    """Keep the EMA buffers in host memory (pinned on CUDA) instead of beside the shards: no
    accelerator memory per profile. Each update copies the shard to a host staging buffer (on
    a side stream on CUDA) and runs on a worker thread, overlapped with the next steps; at most
    one update is in flight (the next update() waits for it, and so does anything that reads
    the EMA). The results are bitwise those of offload=false on the same hardware."""

    def __post_init__(self) -> None:
        if self.sigma_rels is not None and self.gammas is not None:
            raise ConfigError("give either sigma_rels or gammas for the tracked profiles, not both")
        if self.sigma_rels is None and self.gammas is None:
            object.__setattr__(self, "sigma_rels", DEFAULT_SIGMA_RELS)
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
    """Where and how snapshots are written: the snapshot keywords of :class:`~dist_ema.PostHocEMA`.

    ``url`` is the ``store`` keyword and ``dtype`` the ``storage_dtype`` keyword (the names
    of the config keys and flags too). Validation runs on construction.
    """

    url: str = setting(dataclasses.MISSING, key="store", metavar="URL")
    """Snapshot store URL: a local path, ``file://...``, ``s3://bucket/prefix`` or any fsspec
    URL. One store per run: a store with snapshots is only reused with resume. None: no
    snapshots (the EMAs still exist in memory)."""

    snapshot_every: int | None = setting(None, unset="none (on demand)")
    """Write a snapshot every this many EMA *updates* (so every snapshot_every x update_every
    optimizer steps). None: only when the script calls ``ema.snapshot()`` (launch/train.py then
    spreads 20 over the run). Plan it with ``dist-ema error``: with 0.05 and 0.10 tracked, 25
    snapshots spread over a run already reconstruct sigma_rel 0.06-0.15 to under 0.4%, 100
    snapshots to under 0.03%."""

    storage_options: dict[str, Any] | None = setting(None, metavar="JSON", parse=_json_object,
                                                     unset="the environment", hash=False)
    """fsspec options for the store (e.g. ``endpoint_url``, ``profile``), a TOML table
    ``[dist_ema.storage_options]`` or a JSON object on the command line. Default: the
    environment (AWS_*, FSSPEC_S3_*). Prefer the environment for credentials: config files get
    copied and committed."""

    dtype: StorageDtype = setting("float32", key="storage_dtype")
    """Snapshot dtype: "float32" (exact resume), "bfloat16" or "float16" (half the bytes;
    synthesis still accumulates in float64)."""

    compression: Compression | None = setting(None, shown="none")
    """Compression of stored snapshots: None / "none" (default; weights barely compress),
    "blosc-lz4" or "zstd"."""

    keep: int | None = setting(None, metavar="K|all", parse=_keep, shown="all")
    """Retention: None / "all" keeps every snapshot; an integer K >= 2 thins the store to at
    most K snapshots spread evenly over the run (never only the last K: that ruins
    synthesis of long profiles)."""

    inner_chunk_bytes: int = DEFAULT_INNER_BYTES
    """Size of one inner chunk in bytes (default 1 MiB): a rank's data of one profile is ONE
    object (a zarr shard) of such chunks, each with its own crc32c: the unit of a partial read
    and of a checksum. Its old name max_object_bytes is still accepted, with a
    DeprecationWarning."""

    writer: Writer = "process"
    """Who writes snapshots: "process" (default: a child process per rank, off the training
    loop's GIL), "thread", or "sync" (in the training loop; for debugging)."""

    slots: int = 2
    """Staging buffers of the snapshot writer (>= 1): host copies of this rank's EMA shards
    that a snapshot is staged into before it is written. 2 (default): one snapshot can be in
    flight while the next is staged; more ride out a slow store longer before when_behind
    applies, at the cost of host memory."""

    upload_part_bytes: int = DEFAULT_PART_BYTES
    """Object stores (S3): the largest part of a multipart upload in bytes (default 64 MiB; 5 MiB
    to 5 GiB). A shard of up to one part goes up in one PUT; a larger one as one multipart
    upload of about equal parts (the same object, visible only once complete), with larger parts
    where it would need more than S3's 10,000. Memory of the writer while it sends a shard: up
    to 2 x upload_concurrency parts (the HTTP client copies each part it sends)."""

    upload_concurrency: int = DEFAULT_CONCURRENCY
    """Object stores (S3): parts of a multipart upload in flight at a time per rank (default 4;
    1 to 64). Each part is retried by itself; a part that fails for good aborts the upload, so
    no partial object is ever visible."""

    when_behind: WhenBehind = "block"
    """A snapshot due while the previous one is still being written on some rank: "block"
    (default: wait for it; nothing is skipped) or "skip" (skip this snapshot on every rank and
    log it: training never waits for a slow or unreachable store)."""

    on_error: OnError = "raise"
    """A snapshot write that failed after retries: "raise" (default: StoreError on every rank)
    or "warn" (log it, leave that snapshot out, keep training)."""

    timeout: float = setting(300.0, metavar="SECONDS")
    """Seconds dist-ema's own collectives (start-up, snapshot exchanges and commits) wait for a
    rank that stopped responding before every other rank raises a clear error (default 300; a
    rank stuck inside the engine's own collectives is the process group's timeout)."""

    def __repr__(self) -> str:  # never show credentials
        fields = ", ".join(
            f"{k}={_redact(v) if k == 'storage_options' and v else v!r}" for k, v in self.__dict__.items()
        )
        return f"SnapshotConfig({fields})"

    def __post_init__(self) -> None:
        if self.url is None:
            raise ConfigError("store must be a URL string (a local path, file://, s3://bucket/prefix); got None")
        _validate(self)

    @property
    def max_object_bytes(self) -> int:
        """The old name of :attr:`inner_chunk_bytes`."""
        return self.inner_chunk_bytes


PARTS = (EMAConfig, SnapshotConfig)  # the component configs: every setting is a field of one of them


def _part_fields() -> list[tuple[type, dataclasses.Field]]:
    return [(part, f) for part in PARTS for f in dataclasses.fields(part)]


def _flat_field(part: type, f: dataclasses.Field) -> tuple[str, Any, dataclasses.Field]:
    """(key, type, field) of a part's field in the flat table; a required field is optional there (None: that
    part is not built)."""
    hint = typing.get_type_hints(part)[f.name]
    required = f.default is dataclasses.MISSING
    return _key(f), (hint | None) if required else hint, field(
        default=None if required else f.default, hash=f.hash, metadata={**f.metadata, "part": part.__name__})


class _Flat:
    """The methods of :class:`DistEMAConfig` (its fields are made from the parts' fields)."""

    def __post_init__(self) -> None:
        if self.sigma_rels is not None and self.gammas is not None:
            raise ConfigError(f"{TABLE}.sigma_rels and {TABLE}.gammas are both set; give the tracked profiles one "
                              f"way. Fix: keep one of the two keys")
        if self.sigma_rels is None and self.gammas is None:
            object.__setattr__(self, "sigma_rels", DEFAULT_SIGMA_RELS)
        _validate(self, prefix=f"{TABLE}.", skip=("gammas",) if self.gammas is None else ("sigma_rels",))
        if self.store is not None and self.store.startswith("memory://"):
            # a config file describes a real (multi-process) run
            raise ConfigError(f"dist_ema.store = {self.store!r}: memory:// is private to one process, so the "
                              f"ranks could never see each other's snapshots. Fix: use a local path or s3://")

    def ema_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`dist_ema.PostHocEMA` (add ``resume=`` yourself).

        The tracked profiles (``sigma_rels`` or ``gammas``) and ``update_every`` always, the
        other tracking settings where they differ from the default, every snapshot setting when
        there is a store. Raises ConfigError when ``snapshot_every`` or ``keep`` is set without a
        ``store``: checked here, not on construction, because the store often comes from a flag.
        """
        if self.store is None and (self.snapshot_every is not None or self.keep is not None):
            which = "snapshot_every" if self.snapshot_every is not None else "keep"
            raise ConfigError(f"dist_ema.{which} is set but dist_ema.store is not: snapshots need a place to go. "
                              f'Fix: store = "runs/exp1/snapshots" in [dist_ema], or pass --store URL')
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(EMAConfig):
            value = getattr(self, f.name)
            if f.name in ("sigma_rels", "gammas") and value is not None or f.name == "update_every" \
                    or value != f.default:
                kw[f.name] = value
        if self.store is not None:
            kw.update({_key(f): getattr(self, _key(f)) for f in dataclasses.fields(SnapshotConfig)})
        return kw

    def describe(self) -> str:
        """One line for logs (credentials in storage_options masked)."""
        profiles = (f"sigma_rels={list(self.sigma_rels)}" if self.sigma_rels is not None
                    else f"gammas={list(self.gammas)}")
        head = f"{profiles} update_every={self.update_every}"
        if self.store is None:
            return f"{head} no snapshot store (the EMAs live in memory only)"
        opts = _redact(self.storage_options) if self.storage_options else None
        every = "on demand" if self.snapshot_every is None else f"every {self.snapshot_every} updates"
        return (f"{head} store={self.store} snapshots {every} dtype={self.storage_dtype} "
                f"compression={self.compression or 'none'} keep={self.keep or 'all'} writer={self.writer} "
                f"when_behind={self.when_behind} on_error={self.on_error}"
                + (f" storage_options={opts}" if opts else ""))


DistEMAConfig = dataclasses.make_dataclass(
    "DistEMAConfig", [_flat_field(part, f) for part, f in _part_fields()], bases=(_Flat,), frozen=True)
DistEMAConfig.__module__ = __name__
DistEMAConfig.__doc__ = """Settings of one dist-ema run, the ``[dist_ema]`` table of a config file: every field of
:class:`EMAConfig` and :class:`SnapshotConfig` under its key (``store``, ``storage_dtype``, ...), in one flat table.

Every field has a default, so an empty ``[dist_ema]`` table (or no file) is valid: it tracks
sigma_rel 0.05 and 0.10 every step and writes no snapshots. Validation runs on construction
(and on every :func:`apply_overrides`); errors name the field and the fix.
"""


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


def _tuples(values: Mapping[str, Any]) -> dict[str, Any]:
    """TOML and argparse give lists; the profile fields are tuples."""
    return {k: tuple(v) if k in ("sigma_rels", "gammas") and isinstance(v, list) else v for k, v in values.items()}


def _renamed(values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``values`` with old keys (:data:`RENAMED`) under their new names; a DeprecationWarning names the new key."""
    out = dict(values)
    for old, new in RENAMED.items():
        if old in out:
            warnings.warn(_renamed_message(old, prefix), DeprecationWarning, stacklevel=4)
            if new in out and out[new] != out[old]:
                raise ConfigError(f"{prefix}{old} and {prefix}{new} name the same setting. Fix: keep {prefix}{new}")
            out[new] = out.pop(old)
    return out


def _from_table(table: object, where: str) -> DistEMAConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: [{TABLE}] must be a table; got {type(table).__name__}")
    names = keys()
    unknown = [k for k in table if k not in names and k not in RENAMED]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{where}: unknown key {TABLE}.{k}; {hint}valid keys: {', '.join(names)}")
    try:
        return DistEMAConfig(**_tuples(_renamed(table, f"{TABLE}.")))
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
    the file sets the defaults and the flags win; profiles given one way (``gammas``) replace
    those of the file given the other way (``sigma_rels``). The result is validated again.

    Example:
        >>> cfg = apply_overrides(load_config("configs/dist_ema.toml"), {"store": "runs/x", "keep": None})
    """
    given = _renamed({k: v for k, v in overrides.items() if v is not None}, "")
    unknown = sorted(set(given) - set(keys()))
    if unknown:
        raise ConfigError(f"unknown dist-ema setting(s) {unknown}; valid: {', '.join(sorted(keys()))}")
    for one, other in (("sigma_rels", "gammas"), ("gammas", "sigma_rels")):
        if one in given and other not in given:
            given[other] = None
    try:
        return dataclasses.replace(config, **_tuples(given))
    except ConfigError as e:
        raise ConfigError(f"command-line override: {e}") from None


# ---------------------------------------------------------------------------------- keys, flags, docs


def keys() -> list[str]:
    """The keys of the ``[dist_ema]`` table (= PostHocEMA's keywords), in order."""
    return [f.name for f in dataclasses.fields(DistEMAConfig)]


def _field(key: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(DistEMAConfig)}[key]


def flag_of(key: str) -> str:
    """The command-line flag of a key: ``--snapshot-every`` for ``snapshot_every`` unless the field says otherwise."""
    return _field(key).metadata.get("flag", "--" + key.replace("_", "-"))


def _dest(key: str) -> str:
    return flag_of(key)[2:].replace("-", "_")


def _flag_kwargs(f: dataclasses.Field) -> dict[str, Any]:
    """argparse keywords of a flat field, from its type (Literal: choices, "none" too when None is allowed; a
    tuple: one or more values; bool: --x / --no-x) and metadata. Every flag defaults to None: a flag that was not
    given never overrides the file."""
    hint = typing.get_type_hints(DistEMAConfig)[f.name]
    optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    base = [a for a in get_args(hint) if a is not type(None)][0] if optional else hint
    kw: dict[str, Any] = {"default": None, "dest": _dest(f.name), "help": _help(f.name)}
    if "parse" in f.metadata:
        kw["type"] = f.metadata["parse"]
    elif typing.get_origin(base) is Literal:
        kw["choices"] = (("none",) if optional else ()) + get_args(base)
    elif base is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(base) is tuple:
        kw.update(type=get_args(base)[0], nargs="+")
    else:
        kw["type"] = base
    if "choices" not in kw and "action" not in kw:
        kw["metavar"] = f.metadata.get("metavar", "N" if base is int else None)
    return {k: v for k, v in kw.items() if v is not None or k == "default"}


def _shown_default(key: str) -> tuple[str, bool]:
    """(the default as documented, whether it is a value): ``[0.05, 0.1]``, ``"all"``; or words: ``the environment``."""
    f = _field(key)
    if "shown" in f.metadata:
        return json.dumps(f.metadata["shown"]), True
    if f.default is None:
        return f.metadata.get("unset", "none"), False
    return json.dumps(f.default), True


def _help(key: str) -> str:
    """A flag's help: the first sentence of its docstring and the default."""
    doc = " ".join(field_docs()[key].split()).replace("``", "")
    first = re.match(r'(.+?)\.(\s+[A-Z"]|$)', doc)  # not at "e.g. endpoint_url"
    text = first.group(1) if first else doc
    if "default" not in text:
        text += f" (default {_shown_default(key)[0]})"
    return text.replace("%", "%%")


def add_config_arguments(parser: argparse.ArgumentParser, config_flag: bool = True) -> None:
    """Add ``--config`` and one flag per setting (each overrides the file when given).

    Made from the fields of :class:`EMAConfig` and :class:`SnapshotConfig`. A flag the parser
    already has is argparse's "conflicting option string" error here: give the field a ``flag``.
    """
    g = parser.add_argument_group("dist-ema (override the [dist_ema] table of --config)")
    if config_flag:
        g.add_argument("--config", metavar="FILE.toml", default=None,
                       help="dist-ema config file with a [dist_ema] table (flags below override it)")
    for f in dataclasses.fields(DistEMAConfig):
        g.add_argument(flag_of(f.name), *f.metadata.get("aliases", ()), **_flag_kwargs(f))


def config_from_args(args: argparse.Namespace) -> DistEMAConfig:
    """The file named by ``args.config`` (or the defaults) with the flags that were given applied."""
    cfg = load_config(getattr(args, "config", None))
    return apply_overrides(cfg, {key: getattr(args, _dest(key), None) for key in keys()})


class FieldDocs(dict):
    """{key: docstring}; printed, one entry per key with its default and flag."""

    def __str__(self) -> str:
        import textwrap

        out = []
        for name, doc in self.items():
            out.append(f"{name} (default {_shown_default(name)[0]}; flag {flag_of(name)})")
            out += textwrap.wrap(" ".join(doc.split()), 96, initial_indent="    ", subsequent_indent="    ",
                                 break_on_hyphens=False)
        return "\n".join(out)


def _attribute_docs(cls: type) -> dict[str, str]:
    """{field name: the string literal under it} in a dataclass's source."""
    body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def field_docs() -> FieldDocs:
    """The docstring of every setting, by key (for help texts and the README's config table).

    Read from the fields of :class:`EMAConfig` and :class:`SnapshotConfig`. A dict;
    ``print(field_docs())`` shows each key with its default, flag and text::

        >>> print(field_docs())
        sigma_rels (default [0.05, 0.1]; flag --sigma-rels)
            Tracked profiles: ...
    """
    return FieldDocs(_read_field_docs())


@functools.lru_cache(maxsize=1)
def _read_field_docs() -> tuple[tuple[str, str], ...]:
    """The docstrings, read once per process (parsing the source takes ~50 ms; every flag's help needs them)."""
    docs = []
    for part in PARTS:
        mine = _attribute_docs(part)
        docs += [(_key(f), mine[f.name]) for f in dataclasses.fields(part)]
    return tuple(docs)


def _flag_cell(f: dataclasses.Field) -> str:
    kw = _flag_kwargs(f)
    flag = flag_of(f.name)
    if kw.get("action") is argparse.BooleanOptionalAction:
        return f"`{flag}` / `--no-{flag[2:]}`"
    if "metavar" in kw:
        flag += f" {kw['metavar']}" + (" ..." if kw.get("nargs") == "+" else "")
    return "`" + flag.replace("|", "\\|") + "`"


def readme_table() -> str:
    """The README's config table (markdown): key, default, flag and docstring of every setting.

    ``python -m dist_ema.config --readme`` prints it; a test checks that README.md holds it.
    """
    rows = ["| Key | Default | Flag | Meaning |", "| --- | --- | --- | --- |"]
    docs = field_docs()
    for f in dataclasses.fields(DistEMAConfig):
        shown, value = _shown_default(f.name)
        meaning = " ".join(docs[f.name].split()).replace("``", "`")
        rows.append(f"| `{f.name}` | {f'`{shown}`' if value else shown} | {_flag_cell(f)} | {meaning} |")
    return "\n".join(rows)


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


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dist_ema.config", description="dist-ema's settings, from the code.")
    p.add_argument("--readme", action="store_true", help="print the README's config table (markdown)")
    args = p.parse_args(argv)
    print(readme_table() if args.readme else field_docs())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main())
