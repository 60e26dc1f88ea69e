"""Distributed synthesis: the EMA for any sigma_rel (and time) from stored snapshots.

A job in named phases, the way torch.distributed.checkpoint names its steps:

1. **plan** (rank 0, then broadcast): pick the committed snapshots with t <= target t (above
   ``phema.MAX_ROWS`` rows, the subset ``phema.choose_snapshots`` picks), solve for all
   targets at once (one column per target), and cut the newest snapshot's rank
   arrays into units of work at stored chunk boundaries: a frozen :class:`SynthesisPlan`.
   The units depend on the store only, never on the synthesis world size.
2. **prepare** (rank 0): claim the output with its marker, write the output store's skeleton.
3. **map** (every rank): its units (one run of adjacent units, a deterministic split by
   size), read in spans of adjacent blocks: every needed inner chunk of every snapshot with a
   non-zero coefficient is fetched ONCE, a row of a span in one ranged read of up to
   ``read_bytes``, ``prefetch`` reads in flight ahead of the compute (checksums checked as
   they arrive); the compute thread converts each row to float64 per sub-block and
   accumulates all targets in one matrix product per group of rows. Each unit is one output
   rank array: the rank that computed it writes it (one shard per target).
4. **commit** (rank 0, after every rank succeeded): the output's metadata, then its marker.
5. **export** (every rank): safetensors files, split across ranks (``format="peft"``: a PEFT adapter
   folder per target, see :mod:`dist_ema.adapters`).
On any failure every rank raises and the output is removed.

The output folder is claimed by a marker (``MARKER``) written before anything else; only
what a marked synthesis wrote is ever removed or replaced (see ``_check_output``). A
snapshot that disappears while it is read (retention of a running training job) makes
every rank re-plan from a fresh listing, for the same target time (``REPLANS`` times).

A unit's result depends only on the unit, never on which rank computed it or how it was
read (the compute runs on one thread per rank, in blocks and sub-blocks fixed by the plan),
so the output is bitwise identical for any synthesis world size and read settings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import resource
import socket
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from dist_ema import phema
from dist_ema.collective import all_gather_object, broadcast_object, is_distributed, raise_if_any, run_and_check
from dist_ema.errors import ConfigError, LayoutError, OutputExistsError, TargetError
from dist_ema.store.format import (
    BOX_VERSION,
    FORMAT_VERSION,
    STORAGE_DTYPES,
    STORE_MARKER,
    SnapshotMeta,
    array_doc,
    commit_key,
    data_prefix,
    geometry,
    np_dtype,
    rank_key,
    shard_key,
    snapshot_id,
)
from dist_ema.store.fs import StoreError, StoreIO
from dist_ema.store.io import (
    commit_snapshot,
    ensure_store,
    write_buffers,
    write_layout,
    write_shard,
)
from dist_ema.store.layout import (
    Layout,
    Read,
    Unit,
    assign_units,
    merge_reads,
    plan_units,
    translate,
    unit_segments,
)
from dist_ema.store.reader import Snapshot, SnapshotStore

__all__ = ["HIGH_ERROR", "MARKER", "SynthesisResult", "high_error_warnings", "plan_coefficients", "synthesize",
           "target_folder"]

log = logging.getLogger("dist_ema")
T = TypeVar("T")

MARKER = ".dist-ema-synthesis.json"  # at the top of an output: written first, names the job and what it owns
HIGH_ERROR = 0.10                    # a target's reconstruction error above this is logged as a WARNING
REPLANS = 3                          # re-plans when planned snapshots disappear while they are read



@dataclass
class SynthesisResult:
    """What a synthesis produced (the same on every rank)."""

    targets: list[dict]  # per target: sigma_rel, gamma, t, error, condition
    snapshots: list[str]  # snapshot ids read
    out: str | None
    files: list[str] = field(default_factory=list)  # safetensors files (or index json)
    bytes_read: int = 0  # all ranks
    seconds: float = 0.0
    peak_rss_mib: list[float] = field(default_factory=list)  # per rank
    replans: int = 0  # times the job re-planned because planned snapshots disappeared (retention)

    @property
    def throughput_mib_s(self) -> float:
        return self.bytes_read / 2**20 / self.seconds if self.seconds > 0 else 0.0


def plan_coefficients(
    sources: Sequence[tuple[float, Sequence[float]]], target_t: float, target_gammas: Sequence[float],
    max_rows: int = phema.MAX_ROWS,
) -> tuple[np.ndarray, phema.Solution, list[tuple[int, int]]]:
    """Coefficients for sources [(t, gammas of its profiles)] -> targets at ``target_t``.

    Returns (X [rows, targets], the solver's Solution over those rows, rows as (source index,
    profile index)). The rows are those that entered the solve: every profile of every source
    with t <= target_t, or, with more than ``phema.MAX_ROWS`` of them, the subset the solver
    picks (``phema.choose_snapshots``; ``max_rows`` is that bound); so X stays small with any
    number of snapshots. Pure;
    used by synthesis, ``PostHocEMA.swapped`` and ``load_synthesized``.
    """
    n_prof = np.fromiter((len(gs) for _, gs in sources), dtype=np.int64, count=len(sources))
    t_src = np.fromiter((t for t, _ in sources), dtype=np.float64, count=len(sources))
    src = np.repeat(np.arange(len(sources)), n_prof)  # => [all rows]: source of each row
    prof = np.arange(src.size) - np.repeat(np.cumsum(n_prof) - n_prof, n_prof)  # profile of each row
    keep = t_src[src] <= target_t
    if not keep.any():
        first = t_src.min() if t_src.size else float("nan")
        raise TargetError(f"target time {target_t:g} is before the first snapshot (t={first:g}); choose a later t")
    src, prof = src[keep], prof[keep]
    t = t_src[src]
    g = np.fromiter((x for _, gs in sources for x in gs), dtype=np.float64, count=keep.size)[keep]
    tg = np.asarray(target_gammas, dtype=np.float64)
    sol = phema.solve_coefficients(t, g, np.full(tg.size, float(target_t)), tg, max_rows=max_rows)
    entered = np.flatnonzero(sol.used[:, 0])  # one target time: every target has the same rows
    if entered.size < t.size:
        sol = phema.Solution(coefficients=sol.coefficients[entered], error=sol.error, condition=sol.condition,
                             used=sol.used[entered], subset=sol.subset)
    rows = [(int(i), int(k)) for i, k in zip(src[entered], prof[entered])]
    return sol.coefficients, sol, rows


def only_planned(sources: Sequence[T], rows: Sequence[tuple[int, int]]) -> tuple[list[T], list[tuple[int, int]]]:
    """The sources the rows name (oldest first, the newest always among them) and the rows renumbered to them.

    With more than ``phema.MAX_ROWS`` rows the solver uses a subset of the snapshots: a plan
    then holds (and a job opens, checks and reads) only those.
    """
    named = sorted({i for i, _ in rows})
    pos = {i: j for j, i in enumerate(named)}
    if len(named) < len(sources):
        log.info("dist-ema: %d snapshots at or before the target time: solved over %d of them (at most %d rows, "
                 "spread over the run and dense before the target); the errors reported are that subset's",
                 len(sources), len(named), phema.MAX_ROWS)
    return [sources[i] for i in named], [(pos[i], k) for i, k in rows]


def _targets(sigma_rels, gammas) -> tuple[list[float], list[float]]:
    s, g = phema.resolve_profiles(sigma_rels, gammas, what="targets")
    return list(s), list(g)


def _choose_time(snaps: list[Snapshot], t: float | None, step: int | None) -> float:
    if t is not None and step is not None:
        raise ConfigError("give t= or step=, not both")
    if step is not None:
        for s in snaps:
            if s.step == step:
                return s.t
        raise TargetError(f"no committed snapshot at step {step}; steps: {[s.step for s in snaps][-10:]}")
    if t is None:
        return snaps[-1].t
    t = float(t)
    if not math.isfinite(t) or t < snaps[0].t:
        raise TargetError(f"target time t={t:g} is before the first snapshot (t={snaps[0].t:g}); "
                          f"choose t in [{snaps[0].t:g}, {snaps[-1].t:g}]")
    if t > snaps[-1].t:
        raise TargetError(f"target time t={t:g} is after the last snapshot (t={snaps[-1].t:g}): the EMA there is "
                          f"unknown; choose t <= {snaps[-1].t:g} (or wait for later snapshots)")
    return t


UNIT_BYTES_MAX = 64 * 2**20  # a unit (one output rank array per target): at most this, in output bytes
UNIT_BYTES_MIN = 1 * 2**20
BLOCK_BYTES = 1 * 2**20  # elements per compute block, in float32 bytes: fixed, so results never depend on ranks


@dataclass(frozen=True)
class SynthesisPlan:
    """Everything every rank needs, made on rank 0 from one listing and broadcast (immutable)."""

    targets: tuple[dict, ...]  # per target: sigma_rel, gamma, t, error, condition
    used: tuple[Snapshot, ...]  # the snapshots with t <= target t, oldest first
    rows: tuple[tuple[int, int], ...]  # row of X -> (index in used, profile)
    X: tuple[tuple[float, ...], ...]  # coefficients [rows, targets]
    out_layout: Layout  # the output's layout: one "rank" per unit of the newest snapshot
    units: tuple[Unit, ...]  # unit u = output rank u: (rank of the newest snapshot, start, numel)
    block: int  # elements per compute block (rounded to the newest snapshot's inner chunks of a rank)
    dtype: str  # output dtype
    source: str
    ties: dict
    unit: str  # time unit of the snapshots
    step: int | None  # the newest snapshot's step when the target time is its time
    peft: dict | None = None  # the newest snapshot's PEFT adapter record (dist_ema.adapters), if any

    @property
    def ref(self) -> Snapshot:
        return self.used[-1]

    @property
    def snapshot_ids(self) -> list[str]:
        return [s.id for s in self.used]

    @property
    def params(self):
        return self.out_layout.params

    @property
    def target_t(self) -> float:
        return self.targets[0]["t"]

    @property
    def out_step(self) -> int:
        return self.step if self.step is not None else int(round(self.target_t))


def _plan(store: SnapshotStore, s_targets: list[float], g_targets: list[float], t, step, out_dtype: str,
          unit_bytes: int | None) -> SynthesisPlan:
    """Rank 0: the plan. The snapshots are listed here once; the other ranks never list the store
    themselves (a listing taken later could disagree while training thins it)."""
    if out_dtype not in STORAGE_DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(STORAGE_DTYPES)}; got {out_dtype!r}")
    snaps = store.snapshots()
    if not snaps:
        raise StoreError(f"no committed snapshot in {store.url}: nothing to synthesize from")
    units = {s.unit for s in snaps}
    if len(units) > 1:
        raise StoreError(f"snapshots in {store.url} count time in different units {sorted(units)}; "
                         f"they come from different runs: use one store per run")
    target_t = _choose_time(snaps, t, step)
    used = [s for s in snaps if s.t <= target_t]
    ts = [s.t for s in used]
    if len(set(ts)) != len(ts):
        dup = sorted({x for x in ts if ts.count(x) > 1})
        raise StoreError(f"several snapshots in {store.url} share the time t={dup[:3]}: snapshots of different "
                         f"runs are mixed in one store; use one store per run")
    X, sol, rows = plan_coefficients([(s.t, s.gammas) for s in used], target_t, g_targets)
    used, rows = only_planned(used, rows)
    ref = used[-1]
    ref_layout = store.layout(ref)
    fp = ref_layout.model_fingerprint()
    for s in used:
        if store.layout(s).model_fingerprint() != fp:
            raise StoreError(
                f"snapshots of different models are mixed in {store.url}: {s.id} and {ref.id} have different "
                f"parameter names or shapes; use one store per model"
            )
    # units: the newest snapshot's rank arrays cut at its inner chunks, about 1/16 of a profile each
    # (so that ranks balance), at most UNIT_BYTES_MAX; a function of the store only
    chunk = [store.geometry(ref, r).inner for r in range(ref_layout.world_size)]
    total = ref_layout.total_numel * STORAGE_DTYPES[out_dtype]
    ub = unit_bytes or min(UNIT_BYTES_MAX, max(UNIT_BYTES_MIN, total // 16))
    work = plan_units(ref_layout, chunk, max(1, ub // STORAGE_DTYPES[out_dtype]))
    block = BLOCK_BYTES // 4  # aligned down to each source rank's inner chunks in the map
    out_pieces = []
    for u in work:
        segs = unit_segments(ref_layout, u)
        out_pieces.append([(ref_layout.params[p][0], start, numel, box) for p, start, numel, _, box in segs])
    out_layout = Layout.build(ref_layout.params, out_pieces, "synthesized")
    return SynthesisPlan(
        targets=tuple({"sigma_rel": s, "gamma": g, "t": target_t, "error": float(e), "condition": float(c)}
                      for s, g, e, c in zip(s_targets, g_targets, sol.error, sol.condition)),
        used=tuple(used), rows=tuple((int(i), int(k)) for i, k in rows),
        X=tuple(tuple(float(x) for x in row) for row in X), out_layout=out_layout, units=tuple(work),
        block=block, dtype=out_dtype, source=store.url, ties=dict(ref.meta.get("ties") or {}), unit=ref.unit,
        step=ref.step if target_t == ref.t else None, peft=ref.meta.get("peft"),
    )


def _init_dist(timeout: float) -> bool:
    """Join the torchrun job if there is one (gloo: synthesis is host-side work), with ``timeout``."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from datetime import timedelta

    try:
        dist.init_process_group("gloo", timeout=timedelta(seconds=float(timeout)))
    except RuntimeError as e:  # a rank that never joins (stuck, or started with other arguments)
        raise StoreError(f"synthesis could not start: a rank stopped responding or never joined the job within "
                         f"{timeout:g} s ({type(e).__name__}: {str(e)[:200]}); check every rank runs and rerun") from e
    return True


def _peak_rss_mib() -> float:
    """Peak RSS of this process. VmHWM, since ru_maxrss carries a large parent's peak across exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthesize(
    url: str,
    sigma_rels: Sequence[float] | None = None,
    *,
    gammas: Sequence[float] | None = None,
    t: float | None = None,
    step: int | None = None,
    out: str | None = None,
    format: str = "safetensors",
    dtype: str = "float32",
    storage_options: dict | None = None,
    out_storage_options: dict | None = None,
    overwrite: bool = False,
    unit_bytes: int | None = None,
    prefetch: int | None = None,
    read_bytes: int | None = None,
    max_file_bytes: int = 4 * 2**30,
    progress: bool = True,
    timeout: float = 300.0,
    adapter_config: object = None,
    adapter_name: str = "default",
) -> SynthesisResult:
    """Synthesize the EMA for target sigma_rels at time t from the snapshots in ``url``.

    Runs in one process or on every rank of a torchrun job (any world size, independent
    of the training world size); all ranks must call it with the same arguments. Safe to
    run while training writes (and thins) the store: a snapshot removed while it is read
    makes the job re-plan from a fresh listing (up to 3 times).

    Args:
        url: the snapshot store.
        sigma_rels / gammas: target profiles (one output per target).
        t / step: target time (default: the newest snapshot's); ``step`` picks a snapshot's time.
        out: output location, a new or empty folder outside the store: for ``format="zarr"`` the
            synthesized store itself; for ``"safetensors"`` a directory that receives ``zarr/`` (the
            synthesized store), ``synthesis.json`` and, per target, ``sigma_rel-<s>/model.safetensors``
            (or shards + ``model.safetensors.index.json``); for ``"peft"`` the same with, per target,
            a PEFT adapter folder ``sigma_rel-<s>/`` (``adapter_model.safetensors`` with PEFT's keys and
            ``adapter_config.json``: ``PeftModel.from_pretrained(base, folder)`` loads it). The job first writes
            ``<out>/.dist-ema-synthesis.json`` (its marker); only what a marked synthesis wrote is
            ever removed or replaced.
        dtype: output dtype ("float32", "bfloat16", "float16"); accumulation is float64.
        storage_options: fsspec options of the store (default: the environment, AWS_*, FSSPEC_S3_*).
        out_storage_options: options of the output (default: storage_options when ``out`` uses the
            same protocol as ``url``, otherwise the environment).
        overwrite: replace a complete earlier synthesis in ``out`` (never done silently; never
            files that a synthesis did not write).
        unit_bytes: size of one unit of work (and of one output object). Default: the size of the
            newest snapshot's stored objects, so that every object is fetched exactly once.
        prefetch: ranged reads in flight per rank (default: 8 on object stores, 1 on local disk).
        read_bytes: the largest ranged read (default: 16 MiB on object stores, 4 MiB on local
            disk): adjacent stored chunks of a row are fetched in reads up to this size. A rank
            holds about ``(prefetch + 8) * read_bytes`` of read buffers (more where the snapshots
            have another layout than the newest: those rows are decoded to float64 as they are read).
        max_file_bytes: safetensors shard size.
        timeout: seconds a rank waits for another in the job's collectives before every rank fails
            with a clear error (when this call starts the process group, as under ``torchrun -m
            dist_ema synthesize``; a group you started keeps its own timeout).
        adapter_config / adapter_name: ``format="peft"`` only: the adapter's ``PeftConfig`` (or its dict),
            needed when the snapshots recorded none (the tracked model was not a ``PeftModel``), and then the
            adapter name in the tracked names (default "default"). See :mod:`dist_ema.adapters`.

    Example:
        >>> res = synthesize("runs/x/snapshots", sigma_rels=[0.1, 0.15], out="runs/x/synth")
        >>> res.targets[0]["error"], res.files
    """
    if format not in ("zarr", "safetensors", "peft"):
        raise ConfigError(f"format must be 'zarr', 'safetensors' or 'peft'; got {format!r}")
    if format != "peft" and adapter_config is not None:
        raise ConfigError("adapter_config= is for format='peft' (a PEFT adapter export) only")
    if not isinstance(out, str) or not out:
        raise ConfigError("out= is required: a new or empty folder (safetensors) or store URL (zarr) for the result")
    for name, v, least in (("unit_bytes", unit_bytes, 4), ("prefetch", prefetch, 1), ("read_bytes", read_bytes, 4)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            raise ConfigError(f"{name} must be an integer >= {least} (or None for the default); got {v!r}")
    s_targets, g_targets = _targets(sigma_rels, gammas)
    if format in ("safetensors", "peft"):
        _check_folder_names(s_targets)
    _check_not_store(out, url)
    if out_storage_options is None and storage_options and out.split("://")[0] == url.split("://")[0] and "://" in out:
        out_storage_options = storage_options  # same backend: same credentials by default
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigError(f"timeout must be a positive number of seconds; got {timeout!r}")
    joined = _init_dist(timeout)
    try:
        return _synthesize(url, s_targets, g_targets, t, step, out, format, dtype, storage_options,
                           out_storage_options, overwrite, unit_bytes, (prefetch, read_bytes), max_file_bytes,
                           progress, (adapter_config, adapter_name))
    finally:
        if joined:
            dist.destroy_process_group()


class _SnapshotGone(StoreError):
    """A planned snapshot lost its commit marker while it was read: retention removed it. Re-plan."""


def _guarded(store: SnapshotStore, snap: Snapshot, fn: Callable[[], T]) -> T:
    """Run a read of ``snap``; a failure after the snapshot's marker went away is :class:`_SnapshotGone`.

    Retention deletes the marker first and the data after it, so missing objects under a
    present marker are damage (raised as is), and missing objects without one are a removal.
    """
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - classified, then re-raised
        try:
            gone = not store.io.exists(commit_key(snap.id))
        except Exception:  # noqa: BLE001 - cannot tell: report the read error itself
            gone = False
        if gone:
            raise _SnapshotGone(f"snapshot {snap.id} was removed while it was read (its commit marker is gone: "
                                f"retention of a training job, or a user); {type(e).__name__}: {e}") from e
        if isinstance(e, StoreError):
            raise
        raise StoreError(f"snapshot {snap.id}: read failed ({type(e).__name__}: {e})") from e


def _share_plan(store: SnapshotStore | None, store_url: str, storage_options: dict | None, args: tuple, rank: int,
                check: Callable[[SynthesisPlan], None] | None) -> tuple[SynthesisPlan, SnapshotStore | None]:
    """Rank 0 plans from a fresh listing (and runs ``check`` on the plan); every rank gets the plan or the error.

    A planning error is raised on every rank as the same type (ConfigError or TargetError for bad
    arguments, OutputExistsError for an output that may not be written, the same builtin for a
    ValueError, FileExistsError or KeyError of another kind, StoreError otherwise).
    """
    plan, err = None, None
    if rank == 0:
        try:
            store = store or SnapshotStore(store_url, storage_options)
            plan = _plan(store, *args)
            if check is not None:
                check(plan)
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            err = e
    msg = broadcast_object(None if err is None else (_kind_of(err), str(err)))
    if msg is not None:
        if err is not None:
            raise err
        kind, text = msg
        raise kind(f"{text} (on rank 0, where the synthesis is planned)")
    return broadcast_object(plan), store  # type: ignore[return-value]


_PLAN_KINDS = (ConfigError, TargetError, LayoutError, OutputExistsError, StoreError, ValueError, FileExistsError,
               KeyError)


def _kind_of(err: BaseException) -> type[Exception]:
    """The type another rank raises for rank 0's planning error: the first of ``_PLAN_KINDS`` it is, else StoreError.

    Each kind is built from a message alone (an error with another constructor maps to its kind).
    """
    return next((k for k in _PLAN_KINDS if isinstance(err, k)), StoreError)


@dataclass
class _Job:
    """One synthesis job's own state (owned here, by phase)."""

    rank: int
    world: int
    top: StoreIO  # the output location
    out_io: StoreIO  # the output store (top for zarr, top/zarr for safetensors)
    store_url: str
    id: str = field(default_factory=lambda: f"s{uuid.uuid4().hex}")
    marker: dict | None = None
    prev: dict | None = None
    claimed: bool = False
    bytes_read: int = 0


def _synthesize(url, s_targets, g_targets, t, step, out, format, dtype, storage_options, out_storage_options,
                overwrite, unit_bytes, reads, max_file_bytes, progress, adapter=(None, "default")) -> SynthesisResult:
    t0 = time.perf_counter()
    rank = dist.get_rank() if is_distributed() else 0
    world = dist.get_world_size() if is_distributed() else 1
    top = StoreIO(out, out_storage_options)
    store_url = out if format == "zarr" else f"{out.rstrip('/')}/zarr"
    job = _Job(rank, world, top, top if format == "zarr" else StoreIO(store_url, out_storage_options), store_url)
    job.id = broadcast_object(job.id)  # one id for the whole job: it names the output's attempt folder

    def check(plan: SynthesisPlan) -> None:  # rank 0, first plan: may the output be written at all?
        if format == "peft":  # the adapter's tensors are all tracked, its config known: before anything is written
            from dist_ema.adapters import export_keys

            export_keys(plan.peft, [f for f, _, _ in plan.params], *adapter)
        owned = _owned(format, plan, dtype, max_file_bytes)
        job.prev, made = _check_output(top, out, overwrite)
        job.marker = _marker_doc(job.id, url, format, plan, owned, job.prev, made)

    store: SnapshotStore | None = None
    try:
        # ---- plan, prepare, map; again from a fresh listing when planned snapshots disappear
        for attempt in range(REPLANS + 1):
            plan, store0 = _share_plan(store, url, storage_options, (s_targets, g_targets, t, step, dtype, unit_bytes),
                                       rank, check if attempt == 0 else None)
            if store is None:  # rank 0 opened it to plan; the others open it now, errors exchanged
                store = run_and_check(lambda s=store0: s if s is not None else SnapshotStore(url, storage_options),
                                      f"opening {url}", None, StoreError)
            run_and_check((lambda a=attempt, p=plan: _prepare(job, p, first=a == 0)) if rank == 0 else (lambda: None),
                          f"creating {store_url}", None, StoreError)
            gone = _map(job, store, plan, reads, progress and rank == 0)
            if gone is None:
                break
            if rank == 0:
                log.warning("dist-ema: %s; re-planning (%d of %d) from a fresh listing", gone, attempt + 1, REPLANS)
            t, step = plan.target_t, None  # keep the target time: the same EMA, from the snapshots that are left
        else:
            raise StoreError(
                f"synthesis from {url}: planned snapshots disappeared while they were read under {REPLANS + 1} "
                f"plans ({gone}); a training job with keep=K removes them faster than this job reads them. "
                f"Synthesize after training, from a copy of the store, or at an earlier step= that is kept"
            )
        if rank == 0:
            for line in high_error_warnings(plan.targets):
                log.warning("dist-ema: %s", line)
        run_and_check((lambda: _commit(job, store, plan)) if rank == 0 else (lambda: None),
                      f"committing {store_url}", None, StoreError)
        files: list[str] = []
        if format == "safetensors":
            files = _export_safetensors(job.out_io, top, out, plan, rank, world, max_file_bytes)
        elif format == "peft":
            files = _export_peft(job.out_io, top, out, plan, rank, world, adapter)

        def finish() -> None:  # the marker, rewritten last: this output is complete
            doc = dict(job.marker, state="complete", owned=_owned(format, plan, dtype, max_file_bytes),
                       finished=time.time())
            top.put(MARKER, json.dumps(doc, indent=1).encode())

        run_and_check(finish if rank == 0 else (lambda: None), f"finishing {out}", None, StoreError)
    except Exception as e:
        # rank 0 removes what this job wrote (only where its own marker is); then every rank raises
        if rank == 0 and job.claimed:
            _cleanup(top, job.id)
        if isinstance(e, (StoreError, ValueError, FileExistsError, KeyError)):
            raise
        if is_distributed() and isinstance(e, RuntimeError):  # a collective failed: the process group lost a peer
            raise StoreError(f"synthesis failed: a rank stopped responding ({type(e).__name__}: {e}); the partial "
                             f"output was removed, rerun the job") from e
        raise StoreError(f"synthesis failed ({type(e).__name__}: {e}); the partial output was removed") from e

    gathered = all_gather_object([job.bytes_read, _peak_rss_mib()])
    res = SynthesisResult(
        targets=list(plan.targets), snapshots=plan.snapshot_ids, out=out, files=files,
        bytes_read=int(sum(g[0] for g in gathered)), seconds=time.perf_counter() - t0,
        peak_rss_mib=[float(g[1]) for g in gathered], replans=attempt,
    )
    if rank == 0:
        log.info("dist-ema synthesis: %s", summary(res))
    return res


# ----------------------------------------------------------------------------- phases


def _prepare(job: _Job, plan: SynthesisPlan, first: bool) -> None:
    """Rank 0: claim the output (the marker first), then the output store's skeleton."""
    if first:
        _claim(job.top, job.marker, job.prev)
        job.claimed = True
    else:  # a re-plan: start the store over (it is this job's own)
        _remove_owned(job.top, job.marker["owned"])
    ensure_store(job.out_io, create=True)
    for r in range(plan.out_layout.world_size):
        write_layout(job.out_io, plan.out_layout, r)


def _out_meta(job: _Job, store: SnapshotStore, plan: SynthesisPlan) -> SnapshotMeta:
    ref = plan.ref
    return SnapshotMeta(
        step=plan.out_step, t=plan.target_t, t_now=plan.target_t, updates=0, unit=plan.unit,
        profiles=tuple((tg["sigma_rel"], tg["gamma"]) for tg in plan.targets), dtype=plan.dtype,
        world_size=plan.out_layout.world_size, layout=plan.out_layout.layout_id(),
        model=plan.out_layout.model_fingerprint(), engine="synthesized", inner_bytes=_out_inner_bytes(plan),
        attempt=job.id, ties=dict(plan.ties), buffers=tuple(tuple(b) for b in ref.meta.get("buffers") or []),
        kind="synthesized", created=time.time(),
        version=BOX_VERSION if plan.out_layout.has_boxes else FORMAT_VERSION,
        extra={"errors": [tg["error"] for tg in plan.targets], "conditions": [tg["condition"] for tg in plan.targets],
               "source": store.url, "snapshots": plan.snapshot_ids, "coefficients": [list(r) for r in plan.X],
               "rows": [list(r) for r in plan.rows]},
    )


def _out_inner_bytes(plan: SynthesisPlan) -> int:
    return plan.block * STORAGE_DTYPES[plan.dtype]


def _commit(job: _Job, store: SnapshotStore, plan: SynthesisPlan) -> None:
    """Rank 0, after every rank wrote its units: the buffers, the metadata, then the marker."""
    meta = _out_meta(job, store, plan)
    snap = snapshot_id(plan.out_step)
    if meta.buffers:
        bufs = _guarded(store, plan.ref, lambda: store.read_buffers(plan.ref))
        from dist_ema.store.format import pack_buffers

        dtypes = {r[0]: r[2] for r in plan.ref.meta.get("buffers") or []}  # bfloat16 is read as uint16 bits
        raw, records = pack_buffers(list(bufs.items()), dtypes)
        meta = SnapshotMeta(**{**meta.__dict__, "buffers": tuple(tuple(r) for r in records)})
        write_buffers(job.out_io, data_prefix(snap, job.id), raw)
    commit_snapshot(job.out_io, snap, meta.to_doc())


def _map(job: _Job, store: SnapshotStore, plan: SynthesisPlan, reads: tuple[int | None, int | None],
         show: bool) -> str | None:
    """Every rank: compute and write its units. Returns None, or why planned snapshots are gone (re-plan).

    Errors of any rank are raised on every rank.
    """
    err: BaseException | None = None
    try:
        mine = assign_units(plan.units, job.world)[job.rank]
        where = {u: i for i, u in enumerate(plan.units)}
        prefetch, read_bytes = reads[0] or store.prefetch, reads[1] or store.read_bytes
        _map_units(job, store, plan, [where[u] for u in mine], prefetch, read_bytes, show)
    except Exception as e:  # noqa: BLE001 - exchanged below
        err = e
    everyone = all_gather_object(None if err is None else (isinstance(err, _SnapshotGone), str(err)))
    if all(x is None for x in everyone):
        return None
    if any(x is not None and not x[0] for x in everyone):  # real errors: every rank raises them
        raise_if_any(err, "synthesis", None, StoreError)
    return next(x[1] for x in everyone if x is not None)


class _Sources:
    """Where each (snapshot, profile) row reads a block of a unit: straight ranges in the newest
    snapshot's layout, translated reads in another one (cached per layout)."""

    def __init__(self, store: SnapshotStore, plan: SynthesisPlan) -> None:
        self.store, self.plan = store, plan
        self.ref_layout = store.layout(plan.ref)
        self.indexes = {s.layout_id: store.layout(s).piece_index(self.ref_layout) for s in plan.used}
        self._last: tuple = (None, None)  # the block last translated: its rows (profiles, snapshots) reuse it

    def reads(self, snap: Snapshot, rank: int, lo: int, hi: int) -> list[Read]:
        if snap.layout_id == self.plan.ref.layout_id:
            return [Read(rank, lo, 0, hi - lo)]
        key = (snap.layout_id, rank, lo, hi)
        last = self._last  # one read: reader threads may replace it meanwhile
        if last[0] == key:
            return last[1]
        segs = unit_segments(self.ref_layout, Unit(rank, lo, hi - lo))
        reads = merge_reads(translate(self.indexes[snap.layout_id], segs))
        self._last = (key, reads)
        return reads


ROW_GROUP = 8  # snapshot rows summed per matrix product: memory stays flat in the snapshot count
SUB_BLOCK = 32768  # elements per matrix product, from each block's start: the rows' float64 copies stay in cache


@dataclass(frozen=True)
class _Span:
    """Adjacent compute blocks of one rank array of the newest snapshot: each row reads it at once."""

    rank: int
    lo: int
    hi: int
    subs: tuple[tuple[int, int, int], ...]  # (unit index, a, b): the matrix products, [a, b) from lo


def _spans(store: SnapshotStore, plan: SynthesisPlan, mine: list[int], read_bytes: int, groups: int) -> list[_Span]:
    """This rank's units as spans of at most ``read_bytes`` of the newest snapshot. On local disk with
    one group of rows, at least four spans where the units allow, so that reads overlap the compute
    (on object stores a GET's own cost favours the largest reads: measured on moto, 16 MiB read in
    4 MiB ranges took 1.6x as long as in one). Blocks start at unit starts and sub-blocks at block
    starts: every element's arithmetic is fixed by the plan, whatever the spans."""
    blocks = []
    for ui in mine:
        u = plan.units[ui]
        inner = store.geometry(plan.ref, u.rank).inner
        step = max(1, plan.block // inner) * inner
        blocks.extend((ui, a, min(a + step, u.start + u.numel)) for a in range(u.start, u.start + u.numel, step))
    total = sum(hi - lo for _, lo, hi in blocks)
    cap = max(1, read_bytes // STORAGE_DTYPES[plan.ref.dtype])
    if groups == 1 and store.io.protocol == "file":
        cap = min(cap, -(-total // 4))
    spans: list[_Span] = []
    cur: list[tuple[int, int, int]] = []

    def close() -> None:
        lo = cur[0][1]
        subs = tuple((ui, a - lo, min(a + SUB_BLOCK, hi) - lo) for ui, blo, hi in cur
                     for a in range(blo, hi, SUB_BLOCK))
        spans.append(_Span(plan.units[cur[0][0]].rank, lo, cur[-1][2], subs))
        cur.clear()

    for ui, lo, hi in blocks:
        if cur and (plan.units[ui].rank != plan.units[cur[0][0]].rank or cur[-1][2] != lo or hi - cur[0][1] > cap):
            close()
        cur.append((ui, lo, hi))
    if cur:
        close()
    return spans


class _Row:
    """One (snapshot, profile) row's values over a span: stored bytes (decoded on the copy) or float64."""

    __slots__ = ("raw", "values")

    def __init__(self, raw=None, values: np.ndarray | None = None) -> None:
        self.raw, self.values = raw, values

    def copy_to(self, a: int, b: int, out: np.ndarray) -> None:
        if self.raw is not None:
            self.raw.copy_to(a, b, out)
        else:
            np.copyto(out, self.values[a:b])


class _RowReader:
    """Reads rows of spans into reused buffers, ``prefetch`` reads in flight, ahead of the compute.

    A row of the newest snapshot's layout (uncompressed format 2) is one ranged read of its whole
    inner chunks, kept as stored bytes and decoded by the compute thread; any other row (another
    layout, compressed or format 1) is read and decoded here. ``slots`` sets of ROW_GROUP buffers:
    the one being computed and the ones being filled.
    """

    def __init__(self, store: SnapshotStore, plan: SynthesisPlan, tasks: list[tuple[_Span, int, list[int]]],
                 prefetch: int, gw: int) -> None:
        self.store, self.plan, self.tasks = store, plan, tasks
        self.src = _Sources(store, plan)
        self.ahead = max(1, -(-prefetch // max(1, gw)))  # tasks in flight while one is computed
        self.slots = [[bytearray() for _ in range(gw)] for _ in range(self.ahead + 1)]
        self.decoded: dict[tuple[int, int], np.ndarray] = {}
        self.pool = ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="dist-ema-read")
        self.futures: dict[int, list] = {}
        self.failed = False

    def _row(self, t: int, j: int, row: int) -> tuple[_Row, int]:
        if self.failed:  # no new reads once one failed: its error is what the job reports
            raise StoreError("synthesis: an earlier read failed")
        try:
            return self._read_row(t, j, row)
        except BaseException:
            self.failed = True
            raise

    def _read_row(self, t: int, j: int, row: int) -> tuple[_Row, int]:
        span = self.tasks[t][0]
        i, k = self.plan.rows[row]
        snap = self.plan.used[i]
        slot = t % len(self.slots)
        buf = self.slots[slot][j]
        if snap.layout_id == self.plan.ref.layout_id:
            got = _guarded(self.store, snap, lambda: self.store.fetch_raw(snap, span.rank, k, span.lo, span.hi, buf))
            if got is not None:
                return _Row(raw=got[0]), got[1]
        n = span.hi - span.lo
        vals = self.decoded.get((slot, j))
        if vals is None or vals.shape[0] < n:
            vals = self.decoded[(slot, j)] = np.empty(n, dtype=np.float64)
        reads = self.src.reads(snap, span.rank, span.lo, span.hi)
        got = _guarded(self.store, snap, lambda: self.store.read_reads(snap, k, reads, vals[:n], buf))
        return _Row(values=vals[:n]), got

    def submit(self, t: int) -> None:
        if t < len(self.tasks) and t not in self.futures:
            self.futures[t] = [self.pool.submit(self._row, t, j, row) for j, row in enumerate(self.tasks[t][2])]

    def take(self, t: int) -> tuple[list[_Row], int]:
        """Task t's rows (waiting for them); the reads of the next tasks go out first."""
        for n in range(t, t + self.ahead + 1):
            self.submit(n)
        got = [f.result() for f in self.futures.pop(t)]
        return [r for r, _ in got], sum(n for _, n in got)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _map_units(job: _Job, store: SnapshotStore, plan: SynthesisPlan, mine: list[int], prefetch: int,
               read_bytes: int, show: bool) -> None:
    """Compute this rank's units, span by span, rows in fixed groups of ROW_GROUP.

    Per span (adjacent blocks of the newest snapshot's rank array, up to ``read_bytes`` per row),
    for each group of rows: the reader threads fetch the group's rows (one ranged read each, every
    chunk's crc32c checked), ahead of the compute; then, per sub-block of SUB_BLOCK elements, the
    rows are converted to float64 into a small buffer and ``acc += X[:, group] @ V`` runs on this
    thread. Finished units are written by a writer thread while the next span is computed.
    Blocks, sub-blocks and groups come from the plan, and the compute runs on one thread, so every
    element's arithmetic is the same whichever rank computes it and whatever the read sizes.
    """
    X = np.asarray(plan.X, dtype=np.float64)  # [rows, targets]
    live = [row for row in range(X.shape[0]) if np.any(X[row] != 0)]  # rows with a coefficient
    Xt = torch.from_numpy(np.ascontiguousarray(X[live].T))  # [targets, live rows]
    m = Xt.shape[0]
    groups = [live[g:g + ROW_GROUP] for g in range(0, len(live), ROW_GROUP)]
    prefix = data_prefix(snapshot_id(plan.out_step), job.id)
    spans = _spans(store, plan, mine, read_bytes, len(groups))
    tasks = [(s, g, grp) for s in spans for g, grp in enumerate(groups)]
    gw = min(ROW_GROUP, len(live)) if live else 1
    itemsize = {i: STORAGE_DTYPES[s.dtype] for i, s in enumerate(plan.used)}
    need = [(s.hi - s.lo) * sum(itemsize[plan.rows[row][0]] for row in grp) for s, _, grp in tasks]
    V = torch.empty((gw, SUB_BLOCK), dtype=torch.float64)
    Vn = V.numpy()
    nsub = max((len(s.subs) for s in spans), default=0)
    acc = torch.empty((nsub, m, SUB_BLOCK), dtype=torch.float64)
    out_dtype = torch.float32 if plan.dtype == "float32" else torch.float64
    reader = _RowReader(store, plan, tasks, prefetch, gw)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist-ema-write")
    bar = None
    if show:
        with contextlib.suppress(ImportError):
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(need), unit="iB", unit_scale=True, unit_divisor=1024, desc="synthesize")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one compute thread per rank: the same arithmetic whichever rank runs a block
    out_units: dict[int, torch.Tensor] = {}
    pending: list = []  # the previous span's unit writes
    try:
        for t, (span, g, grp) in enumerate(tasks):
            rows, fetched = reader.take(t)
            job.bytes_read += fetched
            n = len(grp)
            cols = slice(g * ROW_GROUP, g * ROW_GROUP + n)
            for si, (_, a, b) in enumerate(span.subs):
                w = b - a
                for j, row in enumerate(rows):
                    row.copy_to(a, b, Vn[j, :w])
                if g == 0:
                    torch.mm(Xt[:, cols], V[:n, :w], out=acc[si, :, :w])
                else:
                    acc[si, :, :w].addmm_(Xt[:, cols], V[:n, :w])
            del rows  # its buffers are refilled from here on
            if bar is not None:
                bar.update(need[t])
            if g < len(groups) - 1:
                continue
            for f in pending:  # at most one span's units wait for their writes
                f.result()
            pending = []
            for si, (ui, a, b) in enumerate(span.subs):
                u = plan.units[ui]
                if ui not in out_units:
                    out_units[ui] = torch.empty((m, u.numel), dtype=out_dtype)
                at = span.lo + a - u.start
                out_units[ui][:, at:at + b - a] = acc[si, :, :b - a]
                if at + b - a == u.numel:
                    pending.append(writer.submit(_write_unit, job.out_io, prefix, plan, ui, out_units.pop(ui)))
        for f in pending:
            f.result()
    finally:
        torch.set_num_threads(threads)
        reader.close()
        writer.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()


def _write_unit(out_io: StoreIO, prefix: str, plan: SynthesisPlan, ui: int, vals: torch.Tensor) -> None:
    """Output rank array ``ui``: one shard per target, then its zarr.json."""
    n = vals.shape[1]
    g = geometry(n, plan.dtype, _out_inner_bytes(plan))
    for j in range(vals.shape[0]):
        v = vals[j]
        if plan.dtype == "float32":
            data = v.numpy()
        elif plan.dtype == "bfloat16":
            data = v.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        else:
            data = v.to(torch.float16).numpy()
        write_shard(out_io, shard_key(prefix, ui, j), np.ascontiguousarray(data, dtype=np_dtype(plan.dtype)), g)
    out_io.put(f"{rank_key(prefix, ui)}/zarr.json", array_doc(vals.shape[0], g, {"rank": ui}))


def high_error_warnings(targets: Sequence[dict], limit: float = HIGH_ERROR) -> list[str]:
    """One line per target whose reconstruction error is above ``limit`` (what it is, and the fix)."""
    return [
        f"target sigma_rel {tg['sigma_rel']:.4f} has a reconstruction error of {100 * tg['error']:.1f}% (above "
        f"{100 * limit:g}%): the synthesized weights are far from that EMA. Use more snapshots (a smaller "
        f"snapshot_every) or tracked profiles closer to it; check a schedule with `dist-ema error`"
        for tg in targets if tg["error"] > limit
    ]


def summary(res: SynthesisResult) -> str:
    tg = ", ".join(f"sigma_rel {x['sigma_rel']:.4f} (error {100 * x['error']:.3f}%)" for x in res.targets)
    return (f"{len(res.targets)} target(s) at t={res.targets[0]['t']:g}: {tg}; {len(res.snapshots)} snapshot(s) "
            f"read, {res.bytes_read / 2**20:.1f} MiB in {res.seconds:.2f}s ({res.throughput_mib_s:.1f} MiB/s); "
            f"peak RSS per rank {', '.join(f'{r:.0f}' for r in res.peak_rss_mib)} MiB; output {res.out}")


# ----------------------------------------------------------------------------- the output and its marker
#
# Nothing is ever removed or replaced in ``out`` unless a synthesis marked it as its own: the
# marker (MARKER, at the top of ``out``) is the first object a job writes and lists every key
# the job owns ("owned"; a folder there is the job's as a whole). A failed job removes exactly
# those, a later job replaces a leftover ("writing") or, with overwrite, a complete output, and
# anything else in ``out`` makes the job refuse before it writes a byte.

_ZARR_OWNED = ("zarr.json", STORE_MARKER, "snapshots", "layouts")


def target_folder(sigma_rel: float) -> str:
    """The folder of one target's safetensors file(s): ``sigma_rel-0.1500``."""
    return f"sigma_rel-{sigma_rel:.4f}"


def _check_folder_names(sigma_rels: Sequence[float]) -> None:
    seen: dict[str, float] = {}
    for s in sigma_rels:
        f = target_folder(s)
        if f in seen:
            raise ConfigError(
                f"targets sigma_rel {seen[f]:g} and {s:g} would both be written to {f}/ (folder names keep 4 "
                f"decimals); give targets that differ in the first 4 decimals, synthesize them into different "
                f"out= folders, or use format='zarr' (one array per target)"
            )
        seen[f] = s


def _location(url: str) -> tuple[str, str]:
    """(scheme, normalized absolute path) of a URL: local paths resolved (symlinks, ``..``), others as keys."""
    if "://" not in url or url.startswith("file://"):
        path = url[len("file://"):] if url.startswith("file://") else url
        return "file", os.path.realpath(os.path.expanduser(path))
    scheme, rest = url.split("://", 1)
    scheme = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}.get(scheme, scheme)
    return scheme, posixpath.normpath("/" + rest.strip("/"))  # "/bucket/prefix"


def _check_not_store(out: str, url: str) -> None:
    """Refuse an output that is the store, lies inside it, or contains it (compared as normalized locations)."""
    (so, o), (ss, s) = _location(out), _location(url)
    if so != ss:
        return

    def within(a: str, b: str) -> bool:
        return a == b or a.startswith(b.rstrip("/") + "/")

    parent = url.rstrip("/").rsplit("/", 1)[0]
    sibling = f"{parent}/synth" if "/" in url.rstrip("/") and not parent.endswith(":/") else f"{url.rstrip('/')}-synth"
    fix = f"choose a folder outside the store, e.g. out={sibling!r}"
    if o == s:
        raise ConfigError(f"out={out!r} is the snapshot store {url!r} itself; synthesis never writes into the store "
                          f"it reads: {fix}")
    if within(o, s):
        raise ConfigError(f"out={out!r} is inside the snapshot store {url!r}; synthesis never writes into the store "
                          f"it reads: {fix}")
    if within(s, o):
        raise ConfigError(f"out={out!r} contains the snapshot store {url!r} (and may hold more of your run); "
                          f"synthesis never writes around the store it reads: {fix}")


def _owned(format: str, plan: SynthesisPlan, dtype: str, max_file_bytes: int) -> list[str]:
    """Keys (under ``out``) that this job writes; a folder is owned as a whole."""
    if format == "zarr":
        return list(_ZARR_OWNED)
    if format == "peft":
        from dist_ema.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

        return ["zarr", "synthesis.json", *(f"{target_folder(tg['sigma_rel'])}/{n}" for tg in plan.targets
                                             for n in (ADAPTER_WEIGHTS, ADAPTER_CONFIG))]
    _, names = _pack_files(plan.params, STORAGE_DTYPES[dtype], max_file_bytes)
    per = names + (["model.safetensors.index.json"] if len(names) > 1 else [])
    return ["zarr", "synthesis.json", *(f"{target_folder(tg['sigma_rel'])}/{n}" for tg in plan.targets
                                         for n in per)]


def _read_marker(top: StoreIO, out: str) -> dict:
    try:
        doc = json.loads(top.get(MARKER))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - a marker we cannot read protects nothing: refuse
        raise OutputExistsError(f"the synthesis marker {out}/{MARKER} is unreadable ({type(e).__name__}: {e}); "
                                f"check {out} and remove it by hand if it is a synthesis output") from e
    if not isinstance(doc, dict) or doc.get("format") != "dist-ema-synthesis" or not isinstance(doc.get("owned"),
                                                                                                list):
        raise OutputExistsError(f"{out}/{MARKER} is not a dist-ema synthesis marker; check {out} and remove it by "
                                f"hand if it is a synthesis output")
    return doc


def _check_output(top: StoreIO, out: str, overwrite: bool) -> tuple[dict | None, bool]:
    """May this job write ``out``? Returns (the previous synthesis' marker to replace or None, folder is new).

    Raises OutputExistsError (a FileExistsError) for a file, a folder with anything a synthesis
    did not write, and a complete synthesis without ``overwrite``.
    """
    if top.protocol == "file" and os.path.isfile(top.root):
        raise OutputExistsError(f"out={out!r} is a file; a synthesis writes a folder: give a new or empty folder")
    made = top.protocol == "file" and not os.path.exists(top.root)
    names = top.list_dir("")
    if not names:
        return None, made
    if MARKER not in names:
        raise OutputExistsError(
            f"output folder {out} is not empty and was not written by a dist-ema synthesis (no {MARKER}; it holds "
            f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); dist-ema never deletes or overwrites it, "
            f"even with overwrite=True: choose a new or empty folder for out="
        )
    prev = _read_marker(top, out)
    _check_owned_keys(top, out, prev["owned"])  # before anything is written or removed
    claimed = {k.split("/", 1)[0] for k in prev["owned"]} | {MARKER}
    foreign = [n for n in names if n not in claimed and not any(n.startswith(c + ".tmp-") for c in claimed)]
    if foreign:
        raise OutputExistsError(
            f"output folder {out} holds files that no dist-ema synthesis wrote ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}) next to a synthesis output; dist-ema never removes them, even "
            f"with overwrite=True: move them away or choose another out="
        )
    if prev.get("state") == "complete":
        if not overwrite:
            what = ", ".join(f"{x:g}" for x in prev.get("targets", []))
            raise OutputExistsError(f"output {out} already exists (a complete synthesis of sigma_rel {what}); choose "
                                    f"another out= or pass overwrite=True (--overwrite) to replace it")
    else:
        log.warning("dist-ema: %s holds the partial output left by a synthesis that did not finish (job %s, "
                    "started %s); replacing it", out, prev.get("job"), time.ctime(prev.get("created", 0)))
    return prev, False


def _marker_doc(job: str, url: str, format: str, plan: SynthesisPlan, owned: list[str], prev: dict | None,
                made: bool) -> dict:
    # while writing, the marker also claims what the replaced synthesis owned: a job that dies
    # half-way through the replacement leaves a leftover that the next job can still clear
    claimed = list(dict.fromkeys([*owned, *(prev["owned"] if prev else [])]))
    return {"format": "dist-ema-synthesis", "version": 1, "job": job, "state": "writing", "created": time.time(),
            "host": socket.gethostname(), "source": url, "output": format,
            "targets": [tg["sigma_rel"] for tg in plan.targets], "t": plan.target_t,
            "owned": claimed, "made_folder": made or bool(prev and prev.get("made_folder"))}


def _claim(top: StoreIO, marker: dict, prev: dict | None) -> None:
    """Write the marker, before any other output; then remove what the replaced synthesis wrote."""
    try:
        top.put(MARKER, json.dumps(marker, indent=1).encode(), exclusive=prev is None)
    except FileExistsError:
        raise OutputExistsError(f"another synthesis started writing {top.url} at the same time; give each job its "
                                f"own out=") from None
    if prev is not None:
        _remove_owned(top, prev["owned"])


def _outside_key(top: StoreIO, key: object) -> str | None:
    """Why a key a marker lists does not lie inside the output folder (None: it does).

    A key is relative to ``out`` and normalized: no absolute path, no drive or URL, no empty,
    ``.`` or ``..`` part. On a local disk it must also resolve (links followed) inside ``out``.
    """
    if not isinstance(key, str) or not key:
        return "it is not a non-empty key"
    if key.startswith("/") or "\\" in key or "://" in key or (len(key) > 1 and key[1] == ":"):
        return "it is an absolute path"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "it is not a normalized key inside the output (an empty, '.' or '..' part)"
    if top.protocol == "file":
        root = os.path.realpath(top.root)
        real = os.path.realpath(top.path(key))
        if not real.startswith(root.rstrip(os.sep) + os.sep):
            return f"it resolves to {real}, outside {root} (through a link)"
    return None


def _check_owned_keys(top: StoreIO, out: str, owned: Sequence[object]) -> None:
    """Refuse a marker that lists anything outside ``out``: only what lies inside it may ever be removed."""
    for key in owned:
        why = _outside_key(top, key)
        if why is not None:
            raise OutputExistsError(
                f"the synthesis marker {out}/{MARKER} lists {key!r} among the keys it owns, but {why}; dist-ema "
                f"only ever removes what lies inside out= and removed nothing. The marker was edited or damaged: "
                f"check {out}, and remove its content by hand or choose another out="
            )


def _remove_owned(top: StoreIO, owned: Sequence[str]) -> None:
    _check_owned_keys(top, top.url, owned)  # all of them first: a bad marker removes nothing
    for key in owned:
        top.remove(key)
    if top.protocol == "file":  # folders of owned files, once empty (a user's file keeps its folder)
        for d in sorted({k.rsplit("/", 1)[0] for k in owned if "/" in k}, key=len, reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(top.path(d))


def _cleanup(top: StoreIO, job: str) -> None:
    """Remove a failed job's partial output: what its marker lists, then the marker. Nothing else, ever."""
    try:
        try:
            doc = _read_marker(top, top.url)
        except FileNotFoundError:
            doc = None
        if doc is None or doc.get("job") != job:
            log.error("dist-ema: not removing the partial output in %s: its marker is not this job's", top.url)
            return
        _remove_owned(top, doc["owned"])
        top.remove(MARKER)
        if doc.get("made_folder") and top.protocol == "file":
            with contextlib.suppress(OSError):
                os.rmdir(top.root)
    except Exception as e:  # noqa: BLE001 - the original error matters more
        log.error("dist-ema: could not remove the partial output %s: %s", top.url, e)


def _pack_files(params, itemsize: int, max_file_bytes: int) -> tuple[list[list[str]], list[str]]:
    """Parameters per safetensors file (greedy, in parameter order: the sharded-checkpoint convention), names."""
    files: list[list[str]] = [[]]
    size = 0
    for f, shape, _ in params:
        b = math.prod(shape) * itemsize
        if files[-1] and size + b > max_file_bytes:
            files.append([])
            size = 0
        files[-1].append(f)
        size += b
    n = len(files)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return files, names


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def safetensors_parts(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list:
    """A safetensors file as buffers to write back to back: its header, then each tensor's own bytes
    (no serialized copy of the whole file). The format: an 8-byte little-endian header size, a JSON
    header (dtype, shape and data offsets per tensor; ``__metadata__``) padded with spaces to 8 bytes,
    then the data, contiguous in header order."""
    header: dict = {"__metadata__": metadata}
    data, off = [], 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise ConfigError(f"{name}: dtype {t.dtype} has no safetensors code; convert it before export")
        t = t.detach().cpu().contiguous()
        raw = memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        data.append(raw)
        off += len(raw)
    doc = json.dumps(header, separators=(",", ":")).encode()
    doc += b" " * (-len(doc) % 8)
    return [struct.pack("<Q", len(doc)) + doc, *data]


def _export_safetensors(out_io: StoreIO, top: StoreIO, out: str, plan: SynthesisPlan, rank: int, world: int,
                        max_file_bytes: int) -> list[str]:
    """Per target, safetensors file(s) keyed by the model's parameter names; files split across ranks.

    Writes only the keys that ``_owned`` lists (the marker claimed them before the job began).
    """
    reader = SnapshotStore(out_io.url, io=out_io)
    snap = reader.snapshot()
    params = reader.layout(snap).params
    buffers = snap.meta.get("buffers", [])
    itemsize = STORAGE_DTYPES[snap.dtype]
    files, names = _pack_files(params, itemsize, max_file_bytes)
    nfiles = len(files)
    ties = plan.ties
    shapes = {f: s for f, s, _ in params}
    jobs = [(j, fi) for j in range(len(plan.targets)) for fi in range(nfiles)]

    def mine() -> None:
        bufvals = reader.buffer_tensors(snap) if buffers else {}
        for n, (j, fi) in enumerate(jobs):
            if n % world != rank:
                continue
            tg = plan.targets[j]
            tensors = {}
            for f in files[fi]:
                vals = reader.read_region(snap, j, f, 0, math.prod(shapes[f])).reshape(shapes[f])
                tensors[f] = torch.from_numpy(vals).to(getattr(torch, snap.dtype)).contiguous()
            for alias, name in ties.items():  # safetensors stores no shared tensors: a copy per name
                if name in tensors:
                    tensors[alias] = tensors[name].clone()
            if fi == nfiles - 1:
                for bname, bval in bufvals.items():
                    tensors[bname] = bval
            md = {"format": "pt", "dist_ema": json.dumps({
                "sigma_rel": tg["sigma_rel"], "gamma": tg["gamma"], "t": tg["t"], "error": tg["error"],
                "unit": plan.unit, "snapshots": plan.snapshot_ids, "source_store": plan.source,
                "ties": ties})}
            top.put(f"{target_folder(tg['sigma_rel'])}/{names[fi]}", safetensors_parts(tensors, md))

    def index() -> None:  # rank 0, after every rank wrote its files
        for tg in plan.targets:
            if nfiles > 1:
                total = sum(math.prod(shapes[f]) * itemsize for f in shapes)
                doc = {"metadata": {"total_size": total},
                       "weight_map": {f: names[fi] for fi, fs in enumerate(files) for f in fs}}
                doc["weight_map"].update({b[0]: names[-1] for b in buffers})
                doc["weight_map"].update({a: doc["weight_map"][n] for a, n in ties.items() if n in doc["weight_map"]})
                top.put(f"{target_folder(tg['sigma_rel'])}/model.safetensors.index.json",
                        json.dumps(doc, indent=1).encode())
        top.put("synthesis.json", json.dumps({
            "source": plan.source, "targets": plan.targets, "snapshots": plan.snapshot_ids, "zarr": "zarr",
            "files": {target_folder(tg["sigma_rel"]): names for tg in plan.targets}}, indent=1).encode())

    run_and_check(mine, "safetensors export", None, StoreError)
    run_and_check(index if rank == 0 else (lambda: None), "safetensors index", None, StoreError)
    return [f"{out.rstrip('/')}/{target_folder(tg['sigma_rel'])}/{n}" for tg in plan.targets for n in names]


def _export_peft(out_io: StoreIO, top: StoreIO, out: str, plan: SynthesisPlan, rank: int, world: int,
                 adapter: tuple) -> list[str]:
    """Per target, a PEFT adapter folder: ``adapter_model.safetensors`` (PEFT's keys) and ``adapter_config.json``.

    Targets are split across ranks; writes only the keys that ``_owned`` lists.
    """
    from dist_ema.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config_bytes, export_keys

    reader = SnapshotStore(out_io.url, io=out_io)
    snap = reader.snapshot()
    params = reader.layout(snap).params
    shapes = {f: s for f, s, _ in params}
    keys, config = export_keys(plan.peft, list(shapes), *adapter)

    def mine() -> None:
        for j, tg in enumerate(plan.targets):
            if j % world != rank:
                continue
            tensors = {}
            for f, key in sorted(keys.items(), key=lambda kv: kv[1]):
                vals = reader.read_region(snap, j, f, 0, math.prod(shapes[f])).reshape(shapes[f])
                tensors[key] = torch.from_numpy(vals).to(getattr(torch, snap.dtype)).contiguous()
            md = {"format": "pt", "dist_ema": json.dumps({
                "sigma_rel": tg["sigma_rel"], "gamma": tg["gamma"], "t": tg["t"], "error": tg["error"],
                "unit": plan.unit, "snapshots": plan.snapshot_ids, "source_store": plan.source})}
            folder = target_folder(tg["sigma_rel"])
            top.put(f"{folder}/{ADAPTER_WEIGHTS}", safetensors_parts(tensors, md))
            top.put(f"{folder}/{ADAPTER_CONFIG}", adapter_config_bytes(config))

    def index() -> None:  # rank 0, after every rank wrote its files
        top.put("synthesis.json", json.dumps({
            "source": plan.source, "targets": plan.targets, "snapshots": plan.snapshot_ids, "zarr": "zarr",
            "format": "peft", "files": {target_folder(tg["sigma_rel"]): [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
                                        for tg in plan.targets}}, indent=1).encode())

    run_and_check(mine, "PEFT adapter export", None, StoreError)
    run_and_check(index if rank == 0 else (lambda: None), "synthesis index", None, StoreError)
    return [f"{out.rstrip('/')}/{target_folder(tg['sigma_rel'])}/{n}" for tg in plan.targets
            for n in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)]
