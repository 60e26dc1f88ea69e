"""Distributed synthesis: the EMA for any sigma_rel (and time) from stored snapshots.

Map-reduce over the store:

1. Plan (rank 0, then broadcast): pick the committed snapshots with t <= target t,
   solve for all targets at once (one column per target), decide the output layout
   (the newest snapshot's) and its units of work (its stored objects).
2. Map: every synthesis rank takes its units (a deterministic, size-balanced split), reads
   each unit's elements from every snapshot that has a non-zero coefficient ONCE, and
   accumulates all targets in float64 in the same pass. Reads are prefetched on a thread
   pool so I/O and arithmetic overlap; memory per rank is a few units.
3. Reduce: each rank writes whole output objects (no two ranks write the same one); rank 0
   commits the output (metadata, then the marker) after every rank succeeded, and exports
   safetensors when asked. On any failure every rank raises and the output is removed.

A unit's result depends only on the unit, never on which rank computed it, so the output
is bitwise identical for any synthesis world size.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from dist_ema import phema
from dist_ema.collective import is_distributed, raise_if_any, run_and_check
from dist_ema.store.fs import StoreError, StoreIO
from dist_ema.store.io import (
    array_key,
    commit_snapshot,
    ensure_store,
    group_doc,
    open_rank_array,
    write_layout,
)
from dist_ema.store.layout import (
    FORMAT_VERSION,
    STORAGE_DTYPES,
    Layout,
    Read,
    Unit,
    assign_units,
    merge_reads,
    np_dtype,
    plan_units,
    snapshot_id,
    translate,
    unit_segments,
)
from dist_ema.store.reader import Snapshot, SnapshotStore

__all__ = ["SynthesisResult", "plan_coefficients", "synthesize"]

log = logging.getLogger("dist_ema")



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

    @property
    def throughput_mib_s(self) -> float:
        return self.bytes_read / 2**20 / self.seconds if self.seconds > 0 else 0.0


def plan_coefficients(
    sources: Sequence[tuple[float, Sequence[float]]], target_t: float, target_gammas: Sequence[float]
) -> tuple[np.ndarray, phema.Solution, list[tuple[int, int]]]:
    """Coefficients for sources [(t, gammas of its profiles)] -> targets at ``target_t``.

    Returns (X [rows, targets], the solver's Solution, rows as (source index, profile index)).
    Only sources with t <= target_t enter. Pure; used by synthesis and by ``PostHocEMA.swapped``.
    """
    rows = [(i, k) for i, (t, gs) in enumerate(sources) if t <= target_t for k in range(len(gs))]
    if not rows:
        first = min(t for t, _ in sources) if sources else float("nan")
        raise ValueError(f"target time {target_t:g} is before the first snapshot (t={first:g}); choose a later t")
    t = np.array([sources[i][0] for i, _ in rows], dtype=np.float64)
    g = np.array([sources[i][1][k] for i, k in rows], dtype=np.float64)
    tg = np.asarray(target_gammas, dtype=np.float64)
    sol = phema.solve_coefficients(t, g, np.full(tg.size, float(target_t)), tg)
    return sol.coefficients, sol, rows


def _targets(sigma_rels, gammas) -> tuple[list[float], list[float]]:
    s, g = phema.resolve_profiles(sigma_rels, gammas, what="targets")
    return list(s), list(g)


def _choose_time(snaps: list[Snapshot], t: float | None, step: int | None) -> float:
    if t is not None and step is not None:
        raise ValueError("give t= or step=, not both")
    if step is not None:
        for s in snaps:
            if s.step == step:
                return s.t
        raise ValueError(f"no committed snapshot at step {step}; steps: {[s.step for s in snaps][-10:]}")
    if t is None:
        return snaps[-1].t
    t = float(t)
    if not math.isfinite(t) or t < snaps[0].t:
        raise ValueError(f"target time t={t:g} is before the first snapshot (t={snaps[0].t:g}); "
                         f"choose t in [{snaps[0].t:g}, {snaps[-1].t:g}]")
    if t > snaps[-1].t:
        raise ValueError(f"target time t={t:g} is after the last snapshot (t={snaps[-1].t:g}): the EMA there is "
                         f"unknown; choose t <= {snaps[-1].t:g} (or wait for later snapshots)")
    return t


def _plan(store: SnapshotStore, sigma_rels, gammas, t, step, out_dtype: str) -> dict:
    """Rank 0: everything every rank needs (plain data, broadcast as one object)."""
    s_targets, g_targets = _targets(sigma_rels, gammas)
    if out_dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}; got {out_dtype!r}")
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
    ref = used[-1]
    ref_layout = store.layout(ref)
    fp = ref_layout.model_fingerprint()
    for s in used:
        if store.layout(s).model_fingerprint() != fp:
            raise StoreError(
                f"snapshots of different models are mixed in {store.url}: {s.id} and {ref.id} have different "
                f"parameter names or shapes; use one store per model"
            )
    return {
        "targets": [{"sigma_rel": s, "gamma": g, "t": target_t, "error": float(e), "condition": float(c)}
                    for s, g, e, c in zip(s_targets, g_targets, sol.error, sol.condition)],
        "snapshots": [s.id for s in used],
        "rows": rows,
        "X": X.tolist(),
        "ref": ref.id,
        "source": store.url,
        "unit": ref.unit,
        "step": ref.step if target_t == ref.t else None,
    }


def _init_dist() -> bool:
    """Join the torchrun job if there is one (gloo: synthesis is host-side work)."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group("gloo")
    return True


def _broadcast(obj: object) -> object:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
    prefetch: int = 4,
    max_file_bytes: int = 4 * 2**30,
    progress: bool = True,
) -> SynthesisResult:
    """Synthesize the EMA for target sigma_rels at time t from the snapshots in ``url``.

    Runs in one process or on every rank of a torchrun job (any world size, independent
    of the training world size); all ranks must call it with the same arguments.

    Args:
        url: the snapshot store.
        sigma_rels / gammas: target profiles (one output per target).
        t / step: target time (default: the newest snapshot's); ``step`` picks a snapshot's time.
        out: output location: for ``format="zarr"`` a new store URL; for ``"safetensors"`` a
            directory that receives ``zarr/`` (the synthesized store) and, per target,
            ``sigma_rel-<s>/model.safetensors`` (or shards + ``model.safetensors.index.json``).
        dtype: output dtype ("float32", "bfloat16", "float16"); accumulation is float64.
        storage_options: fsspec options of the store (default: the environment, AWS_*, FSSPEC_S3_*).
        out_storage_options: options of the output (default: storage_options when ``out`` uses the
            same protocol as ``url``, otherwise the environment).
        overwrite: replace an existing output (never done silently).
        unit_bytes: size of one unit of work (and of one output object). Default: the size of the
            newest snapshot's stored objects, so that every object is fetched exactly once.
        prefetch: snapshot reads in flight per rank.
        max_file_bytes: safetensors shard size.

    Example:
        >>> res = synthesize("runs/x/snapshots", sigma_rels=[0.1, 0.15], out="out/")
        >>> res.targets[0]["error"], res.files
    """
    if format not in ("zarr", "safetensors"):
        raise ValueError(f"format must be 'zarr' or 'safetensors'; got {format!r}")
    if out is None:
        raise ValueError("out= is required: a directory (safetensors) or store URL (zarr) for the result")
    if (unit_bytes is not None and unit_bytes < 4) or prefetch < 1:
        raise ValueError(f"unit_bytes must be >= 4 and prefetch >= 1; got {unit_bytes}, {prefetch}")
    if out_storage_options is None and storage_options and out.split("://")[0] == url.split("://")[0] and "://" in out:
        out_storage_options = storage_options  # same backend: same credentials by default
    joined = _init_dist()
    try:
        return _synthesize(url, sigma_rels, gammas, t, step, out, format, dtype, storage_options,
                           out_storage_options, overwrite, unit_bytes, prefetch, max_file_bytes, progress)
    finally:
        if joined:
            dist.destroy_process_group()


def _synthesize(url, sigma_rels, gammas, t, step, out, format, dtype, storage_options, out_storage_options,
                overwrite, unit_bytes, prefetch, max_file_bytes, progress) -> SynthesisResult:
    t0 = time.perf_counter()
    rank = dist.get_rank() if is_distributed() else 0
    world = dist.get_world_size() if is_distributed() else 1
    store_url = out if format == "zarr" else f"{out.rstrip('/')}/zarr"
    out_io = StoreIO(store_url, out_storage_options)

    # ---- plan on rank 0, broadcast plan or error
    plan, err = None, None
    if rank == 0:
        try:
            store = SnapshotStore(url, storage_options)
            plan = _plan(store, sigma_rels, gammas, t, step, dtype)
            plan["clear"] = _check_output(out_io, out, format, out_storage_options, overwrite, plan)
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            err = e
    msg = _broadcast(None if err is None else f"{type(err).__name__}: {err}")
    if msg is not None:
        if err is not None:
            raise err
        raise StoreError(f"synthesis planning failed on rank 0: {msg}")
    plan = _broadcast(plan)
    store = SnapshotStore(url, storage_options)
    snaps = {s.id: s for s in store.snapshots() if s.id in set(plan["snapshots"])}
    used = [snaps[i] for i in plan["snapshots"]]
    X = np.asarray(plan["X"], dtype=np.float64)  # => [rows, targets]
    rows = [tuple(r) for r in plan["rows"]]
    ref = snaps[plan["ref"]]
    layout = store.layout(ref)
    m = X.shape[1]
    if unit_bytes is None:  # one unit per stored object of the newest snapshot: each object is fetched once
        per_object = int(ref.meta["max_object_bytes"]) // STORAGE_DTYPES[ref.dtype]
        unit_bytes = per_object * STORAGE_DTYPES[dtype]
    units = plan_units(layout, dtype, unit_bytes)
    mine = assign_units(units, world)[rank]

    # ---- output skeleton (rank 0), then every rank writes its units
    snap_name = snapshot_id(plan["step"] if plan["step"] is not None else int(round(plan["targets"][0]["t"])))
    if rank == 0:
        def prepare() -> None:
            if plan["clear"]:
                _cleanup(out_io, out, format, out_storage_options)
            _prepare_output(out_io, layout)

        run_and_check(prepare, f"creating {store_url}", None, StoreError)
    else:
        run_and_check(lambda: None, f"creating {store_url}", None, StoreError)

    stats = {"bytes": 0}
    err = None
    try:
        _map_units(store, used, rows, X, layout, mine, out_io, snap_name, dtype, unit_bytes, prefetch, stats,
                   progress and rank == 0, m)
    except Exception as e:  # noqa: BLE001
        err = e
    try:
        raise_if_any(err, "synthesis", None, StoreError)
    except Exception as e:  # a StoreError from a rank, or the process group losing a dead peer
        if rank == 0:
            _cleanup(out_io, out, format, out_storage_options)
        if isinstance(e, StoreError):
            raise
        raise StoreError(f"synthesis failed: a rank stopped responding ({type(e).__name__}: {e}); the partial "
                         f"output was removed, rerun the job") from e

    # ---- commit (rank 0), export
    meta = {
        "format": "dist-ema-snapshot", "version": FORMAT_VERSION, "kind": "synthesized",
        "step": ref.step if plan["step"] is not None else int(round(plan["targets"][0]["t"])),
        "t": plan["targets"][0]["t"], "t_now": plan["targets"][0]["t"], "updates": 0, "unit": plan["unit"],
        "profiles": [{"sigma_rel": tg["sigma_rel"], "gamma": tg["gamma"], "array": f"p{j}", "error": tg["error"],
                      "condition": tg["condition"]} for j, tg in enumerate(plan["targets"])],
        "dtype": dtype, "compression": None, "max_object_bytes": unit_bytes, "world_size": layout.world_size,
        "engine": layout.engine, "layout": layout.layout_id(), "model": layout.model_fingerprint(),
        "buffers": ref.meta.get("buffers", []), "source": store.url, "snapshots": plan["snapshots"],
        "coefficients": plan["X"], "rows": plan["rows"], "created": time.time(),
    }

    def commit() -> None:
        for r in range(layout.world_size):
            for j in range(m):
                if layout.rank_numel(r):
                    _, _, doc = _array_doc(layout.rank_numel(r), dtype, unit_bytes)
                    out_io.put(f"{array_key(snap_name, r, j)}/zarr.json", doc)
            out_io.put(f"snapshots/{snap_name}/r{r:05d}/zarr.json", group_doc({"rank": r}))
        if meta["buffers"]:
            _copy_buffers(store, ref, out_io, snap_name)
        commit_snapshot(out_io, snap_name, meta)

    if rank == 0:
        run_and_check(commit, f"committing {store_url}", None, StoreError)
    else:
        run_and_check(lambda: None, f"committing {store_url}", None, StoreError)

    files: list[str] = []
    if format == "safetensors":
        files = _export_safetensors(out_io, out, out_storage_options, plan, snap_name, rank, world, max_file_bytes)

    everyone = [stats["bytes"], _peak_rss_mib()]
    if is_distributed():
        gathered: list = [None] * world
        dist.all_gather_object(gathered, everyone)
    else:
        gathered = [everyone]
    res = SynthesisResult(
        targets=plan["targets"], snapshots=plan["snapshots"], out=out, files=files,
        bytes_read=int(sum(g[0] for g in gathered)), seconds=time.perf_counter() - t0,
        peak_rss_mib=[float(g[1]) for g in gathered],
    )
    if rank == 0:
        log.info("dist-ema synthesis: %s", summary(res))
    return res


def summary(res: SynthesisResult) -> str:
    tg = ", ".join(f"sigma_rel {x['sigma_rel']:.4f} (error {100 * x['error']:.3f}%)" for x in res.targets)
    return (f"{len(res.targets)} target(s) at t={res.targets[0]['t']:g}: {tg}; {len(res.snapshots)} snapshot(s) "
            f"read, {res.bytes_read / 2**20:.1f} MiB in {res.seconds:.2f}s ({res.throughput_mib_s:.1f} MiB/s); "
            f"peak RSS per rank {', '.join(f'{r:.0f}' for r in res.peak_rss_mib)} MiB; output {res.out}")


def _array_doc(numel: int, dtype: str, unit_bytes: int):
    from dist_ema.store.io import _array_template
    from dist_ema.store.layout import chunk_elems

    return _array_template(numel, dtype, chunk_elems(numel, dtype, unit_bytes), None)


def _check_output(out_io: StoreIO, out: str, format: str, opts: dict | None, overwrite: bool, plan: dict) -> bool:
    """Refuse an existing output unless ``overwrite``. Returns True when the output must be cleared first.

    A leftover of a job that died before committing (a store without any commit marker and
    no exported file) holds nothing usable: it is cleared with a warning.
    """
    exists = out_io.list_dir("") != []
    files = False
    if format == "safetensors":
        top = StoreIO(out, opts)
        files = any(n.startswith("sigma_rel-") for n in top.list_dir(""))
    if exists and not files and not overwrite:
        from dist_ema.store.io import read_commits

        if not read_commits(out_io)[0]:
            log.warning("dist-ema: %s holds an uncommitted synthesis (a failed job); replacing it", out)
            return True
    exists = exists or files
    if exists and not overwrite:
        raise FileExistsError(f"output {out} already exists; choose another out= or pass overwrite=True "
                              f"(--overwrite) to replace it")
    return exists and overwrite


def _prepare_output(out_io: StoreIO, layout: Layout) -> None:
    ensure_store(out_io, create=True)
    for r in range(layout.world_size):
        write_layout(out_io, layout, r)


def _cleanup(out_io: StoreIO, out: str, format: str, opts: dict | None) -> None:
    """Remove a failed synthesis' partial output."""
    try:
        out_io.remove("")
        if format == "safetensors":
            top = StoreIO(out, opts)
            for n in top.list_dir(""):
                if n.startswith("sigma_rel-"):
                    top.remove(n)
    except Exception as e:  # noqa: BLE001 - the original error matters more
        log.error("dist-ema: could not remove the partial output %s: %s", out, e)


def _map_units(store: SnapshotStore, used: list[Snapshot], rows, X: np.ndarray, layout: Layout, units: list[Unit],
               out_io: StoreIO, snap_name: str, dtype: str, unit_bytes: int, prefetch: int, stats: dict,
               show: bool, m: int) -> None:
    # which (snapshot, profile) rows matter: skip snapshots whose coefficients are all zero
    by_snap: dict[int, list[tuple[int, int]]] = {}
    for row, (i, k) in enumerate(rows):
        if np.any(X[row] != 0):
            by_snap.setdefault(i, []).append((row, k))
    order = sorted(by_snap)
    indexes = {s.layout_id: store.layout(s).piece_index() for s in used}
    pool = ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="dist-ema-read")
    bar = None
    if show:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(u.numel for u in units) * sum(len(v) for v in by_snap.values()), unit="elem",
                       unit_scale=True,
                       desc="synthesize")
        except ImportError:  # pragma: no cover
            bar = None

    def read(unit: Unit, i: int, k: int) -> tuple[np.ndarray, int]:
        snap = used[i]
        segs = unit_segments(layout, unit)
        if snap.layout_id == layout.layout_id():  # same layout: the unit is one range of one rank array
            reads = [Read(unit.rank, unit.start, 0, unit.numel)]
        else:  # written at another world size: gather the unit's parameter segments from that layout
            reads = merge_reads(translate(indexes[snap.layout_id], segs))
        buf = np.empty(unit.numel, dtype=np.float32)
        nbytes = store.read_reads(snap, k, reads, buf)
        return buf, nbytes

    try:
        jobs = [(u, i, row, k) for u in units for i in order for row, k in by_snap[i]]
        q: deque = deque()
        it = iter(jobs)
        acc = None
        cur = None
        for _ in range(prefetch):
            j = next(it, None)
            if j is None:
                break
            q.append((j, pool.submit(read, j[0], j[1], j[3])))
        while q:
            (u, i, row, k), fut = q.popleft()
            j = next(it, None)
            if j is not None:
                q.append((j, pool.submit(read, j[0], j[1], j[3])))
            if cur is None or cur.key != u.key:
                if cur is not None:
                    _write_unit(out_io, layout, snap_name, cur, acc, dtype, unit_bytes)
                cur, acc = u, torch.zeros((m, u.numel), dtype=torch.float64)
            vals, nbytes = fut.result()
            stats["bytes"] += nbytes
            v = torch.from_numpy(vals)  # float32; add_ into the float64 accumulator promotes, no copy
            for jt in range(m):
                x = float(X[row, jt])
                if x != 0.0:
                    acc[jt].add_(v, alpha=x)
            if bar is not None:
                bar.update(u.numel)
        if cur is not None:
            _write_unit(out_io, layout, snap_name, cur, acc, dtype, unit_bytes)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()


def _write_unit(out_io: StoreIO, layout: Layout, snap_name: str, unit: Unit, acc: torch.Tensor, dtype: str,
                unit_bytes: int) -> None:
    n = layout.rank_numel(unit.rank)
    for j in range(acc.shape[0]):
        arr = open_rank_array(out_io, array_key(snap_name, unit.rank, j), n, dtype, None, unit_bytes)
        vals = acc[j].to(torch.float32 if dtype == "float32" else getattr(torch, dtype))
        if dtype == "bfloat16":
            data = vals.view(torch.int16).numpy().view(np.uint16)
        else:
            data = vals.numpy().astype(np_dtype(dtype), copy=False)
        arr[unit.start : unit.start + unit.numel] = data  # exactly one whole object (units are objects)


def _copy_buffers(store: SnapshotStore, ref: Snapshot, out_io: StoreIO, snap_name: str) -> None:
    import zarr

    from dist_ema.store.io import buffer_key

    for i, (name, values) in enumerate(store.read_buffers(ref).items()):
        flat = np.ascontiguousarray(values).reshape(-1)
        z = zarr.create_array(out_io.zarr_store, name=buffer_key(snap_name, i), shape=flat.shape, dtype=flat.dtype,
                              chunks=(max(1, flat.size),), overwrite=True, zarr_format=3)
        z[:] = flat
        del name


def _export_safetensors(out_io: StoreIO, out: str, opts: dict | None, plan: dict, snap_name: str, rank: int,
                        world: int, max_file_bytes: int) -> list[str]:
    """Per target, safetensors file(s) keyed by the model's parameter names; files split across ranks."""
    from safetensors.torch import save as st_save

    reader = SnapshotStore(out_io.url, io=out_io)
    snap = reader.snapshot()
    params = reader.layout(snap).params
    buffers = snap.meta.get("buffers", [])
    top = StoreIO(out, opts)
    itemsize = STORAGE_DTYPES[snap.dtype]
    # files: greedy packing in parameter order, the usual sharded-checkpoint convention
    files: list[list[str]] = [[]]
    size = 0
    for f, shape, _ in params:
        b = math.prod(shape) * itemsize
        if files[-1] and size + b > max_file_bytes:
            files.append([])
            size = 0
        files[-1].append(f)
        size += b
    nfiles = len(files)
    names = ["model.safetensors"] if nfiles == 1 else [f"model-{i + 1:05d}-of-{nfiles:05d}.safetensors"
                                                       for i in range(nfiles)]
    shapes = {f: s for f, s, _ in params}
    written: list[str] = []
    jobs = [(j, fi) for j in range(len(plan["targets"])) for fi in range(nfiles)]
    err = None
    try:
        bufvals = reader.read_buffers(snap) if buffers else {}
        for n, (j, fi) in enumerate(jobs):
            if n % world != rank:
                continue
            tg = plan["targets"][j]
            folder = f"sigma_rel-{tg['sigma_rel']:.4f}"
            tensors = {}
            for f in files[fi]:
                vals = reader.read_region(snap, j, f, 0, math.prod(shapes[f])).reshape(shapes[f])
                tensors[f] = torch.from_numpy(vals).to(getattr(torch, snap.dtype)).contiguous()
            if fi == nfiles - 1:
                for bname, bval in bufvals.items():
                    tensors[bname] = torch.from_numpy(np.ascontiguousarray(bval))
            md = {"format": "pt", "dist_ema": json.dumps({
                "sigma_rel": tg["sigma_rel"], "gamma": tg["gamma"], "t": tg["t"], "error": tg["error"],
                "unit": plan["unit"], "snapshots": plan["snapshots"], "source_store": plan["source"]})}
            top.put(f"{folder}/{names[fi]}", st_save(tensors, metadata=md))
            written.append(f"{folder}/{names[fi]}")
    except Exception as e:  # noqa: BLE001
        err = e
    try:
        raise_if_any(err, "safetensors export", None, StoreError)
    except StoreError:
        if rank == 0:
            _cleanup(out_io, out, "safetensors", opts)
        raise
    if rank == 0:
        for tg in plan["targets"]:
            folder = f"sigma_rel-{tg['sigma_rel']:.4f}"
            if nfiles > 1:
                total = sum(math.prod(shapes[f]) * itemsize for f in shapes)
                index = {"metadata": {"total_size": total},
                         "weight_map": {f: names[fi] for fi, fs in enumerate(files) for f in fs}}
                index["weight_map"].update({b[0]: names[-1] for b in buffers})
                top.put(f"{folder}/model.safetensors.index.json", json.dumps(index, indent=1).encode())
        top.put("synthesis.json", json.dumps({
            "source": plan["source"], "targets": plan["targets"], "snapshots": plan["snapshots"], "zarr": "zarr",
            "files": {f"sigma_rel-{tg['sigma_rel']:.4f}": names for tg in plan["targets"]}}, indent=1).encode())
    out_files = [f"sigma_rel-{tg['sigma_rel']:.4f}/{n}" for tg in plan["targets"] for n in names]
    return [f"{out.rstrip('/')}/{f}" for f in out_files]
