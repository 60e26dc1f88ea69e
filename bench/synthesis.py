"""Benchmark 5: synthesis.

- throughput of ``synthesize`` (one process) vs a raw read of the same snapshot objects;
- peak RSS per rank for two model sizes x two snapshot counts (fresh process each);
- speedup from 1 to 2 synthesis ranks (``torchrun -m dist_ema synthesize``);
- dist-ema vs ema-pytorch's ``synthesize_ema_model`` on the same model and snapshot count,
  each from its own format (dist-ema: zarr store -> safetensors file; ema-pytorch: one
  ``torch.save`` file per profile and snapshot -> a model in memory).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
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
TARGET = 0.15
SMALL_UNIT = 32 * MiB  # synthesis units smaller than the stored objects: each read fetches its whole object


def _max_object_mib() -> float:
    from dist_ema.store.layout import DEFAULT_MAX_OBJECT_BYTES

    return DEFAULT_MAX_OBJECT_BYTES / MiB


def _default_units() -> str:
    """The library's default synthesis unit, described (it changed: fixed 32 MiB, then the stored objects)."""
    import dist_ema.synthesis as lib

    fixed = getattr(lib, "DEFAULT_UNIT_BYTES", None)
    return f"{fixed / MiB:.0f} MiB" if fixed else "one unit per stored object"


def _make_store(path: str, numel: int, snapshots: int) -> list[int]:
    """A store with ``snapshots`` snapshots of a ``numel``-parameter model; returns their steps."""
    from bench.models import Bag
    from dist_ema import PostHocEMA

    model = Bag(numel, tensors=8)
    steps = []
    with PostHocEMA(model, sigma_rels=TRACKED, store=path) as ema:
        for i in range(snapshots):
            for _ in range(10):
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
        for _ in range(10):
            model.perturb(i)
            ema.update()
        ema.checkpoint()


def _objects(store: str, steps: list[int]) -> list[Path]:
    from dist_ema.store.layout import snapshot_id

    files = []
    for s in steps:
        for dirpath, _, names in os.walk(Path(store, "snapshots", snapshot_id(s))):
            if Path(dirpath).name == "c":
                files.extend(Path(dirpath, n) for n in names)
    return files


def _raw_read(files: list[Path]) -> tuple[float, int]:
    buf = bytearray(max(f.stat().st_size for f in files))
    t0 = time.perf_counter()
    n = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            n += fh.readinto(buf)
    return time.perf_counter() - t0, n


def _child(cfg: dict, threads: int) -> dict:
    return run_json_child([sys.executable, "-m", "bench.synth_child", json.dumps({**cfg, "threads": threads})],
                          env=env_for_children(threads))


def _torchrun(nproc: int, store: str, out: str) -> tuple[float, float, float]:
    """Returns (synthesis seconds from the summary, wall seconds of the whole command, CPU seconds of it)."""
    import resource

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
    m = re.search(r"MiB in ([0-9.]+)s", res.stdout + res.stderr)
    if not m:
        raise RuntimeError(f"no summary in the torchrun output:\n{res.stdout[-1500:]}")
    return float(m.group(1)), wall, cpu


def run(quick: bool = False, threads: int = 1) -> Result:
    torch.set_num_threads(threads)
    sizes = {"small": 2**19, "large": 2**21} if quick else {"small": 8 * 2**20, "large": 24 * 2**20}
    nsnap = 4 if quick else 8
    few = 2 if quick else 4
    reps = 1 if quick else 2
    res = Result("synthesis", "5. Synthesis")
    res.config = {"params_m": {k: round(v / 1e6, 1) for k, v in sizes.items()}, "snapshots": [few, nsnap],
                  "tracked": list(TRACKED), "target": TARGET, "reps": reps, "threads_per_process": threads}
    tmp = tempfile.mkdtemp(prefix="bench-synth-")
    try:
        steps = {}
        for name, numel in sizes.items():
            t0 = time.perf_counter()
            steps[name] = _make_store(str(Path(tmp, name)), numel, nsnap)
            res.data[f"store_{name}_write_s"] = time.perf_counter() - t0
        _throughput(res, tmp, steps, reps, threads)
        _rss(res, tmp, sizes, steps, few, nsnap, threads, quick)
        _ranks(res, tmp, reps)
        _vs_ema_pytorch(res, tmp, sizes["small"], steps["small"], nsnap, reps, threads)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def _throughput(res: Result, tmp: str, steps: dict, reps: int, threads: int) -> None:
    store = str(Path(tmp, "large"))
    files = _objects(store, steps["large"])
    _raw_read(files)  # page cache: every variant reads warm data
    # (unit_bytes, proposed _map_units): the library as it is (its default units), 32 MiB units (the default
    # before units followed the stored objects), and the library default plus bench/proposed.py
    variants = {"default": (None, False), "32mib": (SMALL_UNIT, False), "proposed": (None, True)}
    thr = {k: [] for k in variants}
    amp = {k: [] for k in variants}
    rss = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    digests = {}
    raw = []
    for r in range(reps):
        for name, (ub, proposed) in variants.items():
            out = str(Path(tmp, f"o-{name}-{r}"))
            o = _child({"kind": "dist-ema", "store": store, "sigma_rels": [TARGET], "out": out, "unit_bytes": ub,
                        "count_fetch": True, "proposed": proposed, "digest": r == 0}, threads)
            shutil.rmtree(out, ignore_errors=True)
            thr[name].append(o["bytes_read"] / o["seconds"])
            amp[name].append(o["bytes_fetched"] / o["bytes_read"])
            rss[name].append(o["peak_rss_mib"] - o["rss_before_mib"])
            cpu[name].append((o["user_s"], o["sys_s"], o["minor_faults"], o["wall"]))
            if o["digest"]:
                digests[name] = o["digest"]
        dt, n = _raw_read(files)
        raw.append(n / dt)
    tab = Table(f"Throughput, large model, {len(steps['large'])} snapshots x 2 profiles, 1 process "
                f"(MiB of snapshot data per second)", ["what", "MiB/s", "vs raw read", "fetched / needed",
                                                       "work RSS MiB", "CPU user / sys per wall s",
                                                       "page faults (k)"])
    labels = {"default": f"synthesize, library default units ({_default_units()})",
              "32mib": f"synthesize, unit_bytes = {SMALL_UNIT / MiB:.0f} MiB",
              "proposed": "library default + proposed _map_units (bench/proposed.py: no per-read allocations)"}
    for name in variants:
        u = med([c[0] / c[3] for c in cpu[name]])
        sy = med([c[1] / c[3] for c in cpu[name]])
        tab.rows.append([labels[name], f"{med(thr[name]) / MiB:.0f}", fmt_x(paired_ratio(thr[name], raw)),
                         f"{med(amp[name]):.2f}x", f"{med(rss[name]):.0f}", f"{u:.2f} / {sy:.2f}",
                         f"{med([c[2] for c in cpu[name]]) / 1e3:.0f}"])
    tab.rows.append(["raw read of the same objects (baseline)", f"{med(raw) / MiB:.0f}", "1.00x", "1.00x", "", "",
                     ""])
    res.tables.append(tab)
    ratio = paired_ratio(thr["default"], raw)
    res.goals.append(Goal("synthesis fetches each stored byte once", f"{med(amp['default']):.2f}x the bytes",
                          med(amp["default"]) <= 1.05,
                          f"objects are checksummed whole, so a read of part of one fetches all of it, and zarr "
                          f"stores a rank array's last chunk full-size (here the 96 MiB array is 2 x 64 MiB "
                          f"objects); {SMALL_UNIT / MiB:.0f} MiB units fetch {med(amp['32mib']):.2f}x"))
    res.goals.append(Goal("synthesis throughput vs a raw read of the same bytes (page cache)", fmt_x(ratio), None,
                          f"proposed fixes: {fmt_x(paired_ratio(thr['proposed'], raw))}; CPU-bound here: fresh "
                          f"buffers per read (zarr's object bytes, its decoded copy, our float32 and float64 copies) "
                          f"are page-faulted in by the kernel: sys time > user time"))
    same = len(set(digests.values())) == 1
    res.notes.append(f"Synthesis outputs of the three variants are bitwise identical: {same} (sha256 of every "
                     f"output tensor: {digests}).")
    res.data["throughput"] = {"synth_bps": thr, "raw_bps": raw, "fetch_amplification": amp, "work_rss_mib": rss,
                              "digests": digests, "cpu_user_sys_faults_wall": cpu}


def _rss(res: Result, tmp: str, sizes: dict, steps: dict, few: int, nsnap: int, threads: int,
         quick: bool) -> None:
    tab = Table("Peak RSS of one synthesis rank (fresh process; 'work' = peak minus RSS before synthesize)",
                ["model", "snapshots", "snapshot MiB", "peak RSS MiB", "work MiB"])
    work = []
    combos = [(n, c) for n in sizes for c in (few, nsnap)]
    if quick:
        combos = [("small", few), ("large", nsnap)]
    for name, count in combos:
        numel = sizes[name]
        out = _child({"kind": "dist-ema", "store": str(Path(tmp, name)), "sigma_rels": [TARGET],
                      "step": steps[name][count - 1], "out": str(Path(tmp, f"rss-{name}-{count}"))}, threads)
        shutil.rmtree(Path(tmp, f"rss-{name}-{count}"), ignore_errors=True)
        w = out["peak_rss_mib"] - out["rss_before_mib"]
        work.append(w)
        tab.rows.append([f"{name} ({numel / 1e6:.1f}M params)", out["snapshots"],
                         f"{numel * 8 / MiB:.0f}", f"{out['peak_rss_mib']:.0f}", f"{w:.0f}"])
    res.tables.append(tab)
    by_count = {}
    for (name, _count), w in zip(combos, work):
        by_count.setdefault(name, []).append(w)
    indep = all(max(ws) <= 1.1 * min(ws) + 16 for ws in by_count.values())
    res.goals.append(Goal("peak memory per rank independent of the snapshot count",
                          "; ".join(f"{n}: {', '.join(f'{w:.0f}' for w in ws)} MiB" for n, ws in by_count.items()),
                          indep, "reads stream through a bounded prefetch queue"))
    res.goals.append(Goal("peak memory per rank vs model size", f"work {min(work):.0f}-{max(work):.0f} MiB", None,
                          f"grows until stored objects reach max_object_bytes ({_max_object_mib():.0f} MiB): each "
                          f"in-flight read holds its whole object and zarr's decoded copy, plus float64 "
                          f"accumulators per unit; prefetch 4"))


def _ranks(res: Result, tmp: str, reps: int) -> None:
    store = str(Path(tmp, "large"))
    t = {1: [], 2: []}
    wall = {1: [], 2: []}
    cpu = {1: [], 2: []}
    for r in range(reps):
        for n in (1, 2):
            out = str(Path(tmp, f"tr{n}-{r}"))
            s, w, c = _torchrun(n, store, out)
            shutil.rmtree(out, ignore_errors=True)
            t[n].append(s)
            wall[n].append(w)
            cpu[n].append(c / w)
    sp = paired_ratio(t[1], t[2])
    spw = paired_ratio(wall[1], wall[2])
    tab = Table("torchrun -m dist_ema synthesize, large model, all snapshots (1 thread per rank)",
                ["ranks", "synthesis s", "speedup", "wall s (with start-up)", "speedup (wall)",
                 "cores busy (CPU s / wall s)"])
    tab.rows.append([1, f"{med(t[1]):.2f}", "1.00x", f"{med(wall[1]):.1f}", "1.00x", f"{med(cpu[1]):.2f}"])
    tab.rows.append([2, f"{med(t[2]):.2f}", fmt_x(sp), f"{med(wall[2]):.1f}", fmt_x(spw), f"{med(cpu[2]):.2f}"])
    res.tables.append(tab)
    res.goals.append(Goal("speedup from 1 to 2 synthesis ranks", fmt_x(sp), sp >= 1.5,
                          f"one rank already keeps {med(cpu[1]):.1f} of the 2 cores busy (reader threads; mostly "
                          f"kernel time faulting in fresh per-read buffers, see the throughput table), and "
                          f"other jobs share the machine"))
    res.data["ranks"] = {"seconds": t, "wall": wall, "cores_busy": cpu}


def _vs_ema_pytorch(res: Result, tmp: str, numel: int, steps: list[int], nsnap: int, reps: int,
                    threads: int) -> None:
    try:
        import ema_pytorch  # noqa: F401
    except ImportError:
        res.notes.append("ema-pytorch not installed: comparison skipped")
        return
    folder = str(Path(tmp, "ema_pytorch"))
    _make_ema_pytorch(folder, numel, nsnap)
    de, ep, dp = [], [], []
    rss = {}
    for r in range(reps):
        out = str(Path(tmp, f"cmp{r}"))
        a = _child({"kind": "dist-ema", "store": str(Path(tmp, "small")), "sigma_rels": [TARGET], "out": out,
                    "format": "safetensors"}, threads)
        shutil.rmtree(out, ignore_errors=True)
        c = _child({"kind": "dist-ema", "store": str(Path(tmp, "small")), "sigma_rels": [TARGET], "out": out,
                    "format": "safetensors", "proposed": True}, threads)
        shutil.rmtree(out, ignore_errors=True)
        dp.append(c["seconds"])
        b = _child({"kind": "ema-pytorch", "folder": folder, "numel": numel, "tracked": list(TRACKED),
                    "sigma_rels": [TARGET]}, threads)
        de.append(a["seconds"])
        ep.append(b["seconds"])
        rss = {"dist-ema": a["peak_rss_mib"] - a["rss_before_mib"],
               "ema-pytorch": b["peak_rss_mib"] - b["rss_before_mib"]}
    prof = _child({"kind": "dist-ema", "store": str(Path(tmp, "small")), "sigma_rels": [TARGET],
                   "out": str(Path(tmp, "cmp-prof")), "format": "safetensors", "profile": True}, threads)["profile"]
    shutil.rmtree(Path(tmp, "cmp-prof"), ignore_errors=True)
    ratio = paired_ratio(de, ep)
    tab = Table(f"Same model ({numel / 1e6:.1f}M params) and snapshot count ({nsnap} x 2 profiles), 1 process",
                ["library", "seconds", "vs ema-pytorch", "work RSS MiB"])
    tab.rows.append(["dist-ema synthesize -> safetensors file", f"{med(de):.2f}", fmt_x(ratio),
                     f"{rss['dist-ema']:.0f}"])
    tab.rows.append(["dist-ema + proposed _map_units", f"{med(dp):.2f}",
                     fmt_x(paired_ratio(dp, ep)), ""])
    tab.rows.append(["ema-pytorch synthesize_ema_model -> model in memory", f"{med(ep):.2f}", "1.00x",
                     f"{rss['ema-pytorch']:.0f}"])
    res.tables.append(tab)
    res.goals.append(Goal("dist-ema synthesis vs ema-pytorch (time)", fmt_x(ratio), ratio <= 1.0,
                          f"with the proposed fixes {fmt_x(paired_ratio(dp, ep))}. cProfile of dist-ema (main "
                          f"thread own time; lock acquire = waiting for reads): " + "; ".join(prof or [])))
    res.data["vs_ema_pytorch"] = {"dist_ema_s": de, "ema_pytorch_s": ep, "dist_ema_proposed_s": dp, "rss": rss}
