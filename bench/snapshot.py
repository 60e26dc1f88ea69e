"""Benchmark 4: snapshot cost (single process, 2 profiles, fp32).

- Training-thread stall per snapshot (``PostHocEMA.snapshots.stall_seconds``: wait for a free
  staging slot + copy into shared memory) vs a plain memcpy of the same bytes
  (``torch.Tensor.copy_`` into a preallocated buffer), interleaved.
- Write throughput of the background writer (its own timing of the data job) vs raw
  file writes of the same bytes in objects of the same size (local), and vs raw s3fs
  ``pipe_file`` puts of the same objects to a moto S3 server on loopback (in its own process).
  On S3 the writer runs twice, interleaved: with its default upload settings (shards of up
  to ``upload_part_bytes`` in one PUT) and with 16 MiB parts, 4 in flight (multipart); the raw
  baselines are ``pipe_file`` one object after another, all objects at once (``pipe`` of a
  dict), and ``pipe_file`` with 16 MiB parts, 4 in flight.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import GiB, Goal, MiB, Result, Table, fmt_ms, fmt_x, med, paired_ratio

SIGMA_RELS = (0.05, 0.10)
KEY, SECRET = "bench-key", "bench-secret"

_MOTO = r"""
import sys, time
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
s.start()
host, port = s.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()   # runs until the parent closes stdin
s.stop()
"""


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's threaded S3 server in a child process (port 0), so its threads never share our GIL."""
    proc = subprocess.Popen([sys.executable, "-c", _MOTO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    url = ""
    for _ in range(20):  # moto prints a banner line first
        url = proc.stdout.readline().strip()
        if url.startswith("http") or not url:
            break
    if not url.startswith("http"):
        proc.kill()
        raise RuntimeError("moto server did not start (pip install 'moto[server]')")
    host, port = url.rsplit(":", 1)
    for _ in range(100):
        try:
            socket.create_connection((host.split("//")[1], int(port)), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, url


def _ema(numel: int, store: str, storage_options: dict | None, **settings):
    from bench.models import Bag
    from dist_ema import PostHocEMA

    model = Bag(numel, tensors=8)
    ema = PostHocEMA(model, sigma_rels=SIGMA_RELS, store=store, storage_options=storage_options, **settings)
    return model, ema


def _snapshot_once(ema, model, step: int) -> dict:
    model.perturb(step)
    ema.update()
    ema.snapshot()
    mgr = ema.snapshots
    stall = mgr.stall_seconds[-1]
    mgr.submit_staged(block=True)  # on CPU the copy is done: the data job is with the writer
    jobs = [r.jid for r in mgr.ledger.in_flight if r.jid is not None and r.jid >= 0]
    wres = mgr.writer.wait(jobs[-1]) if jobs else None
    mgr.exchange(block=True)  # commit, so the next snapshot never waits for a slot
    mgr.exchange(block=True)
    return {"stall": stall, "write_s": wres.seconds if wres else float("nan"), "bytes": wres.bytes if wres else 0}


def _objects(ema) -> list[int]:
    """Sizes (bytes) of the data objects one snapshot writes: one shard object per profile (format 2)."""
    n = ema.owned_numel
    return [n * 4 for _ in SIGMA_RELS]


def run(quick: bool = False, threads: int = 1) -> Result:
    torch.set_num_threads(threads)
    numel = 2**20 if quick else 48 * 2**20
    s3_numel = 2**19 if quick else 8 * 2**20
    reps = 3 if quick else 6
    s3_reps = 2 if quick else 3
    res = Result("snapshot", "4. Snapshot cost (single process, 2 profiles, fp32)")
    res.config = {"local_params_m": round(numel / 1e6, 1), "s3_params_m": round(s3_numel / 1e6, 1), "reps": reps,
                  "s3_reps": s3_reps, "writer": "process (default)", "threads": threads}
    tmp = tempfile.mkdtemp(prefix="bench-snapshot-")
    try:
        _local(res, numel, reps, tmp)
        _s3(res, s3_numel, s3_reps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def _local(res: Result, numel: int, reps: int, tmp: str) -> None:
    model, ema = _ema(numel, str(Path(tmp, "store")), None)
    n = ema.owned_numel
    nbytes = n * 4 * len(SIGMA_RELS)
    dst = torch.empty(n * len(SIGMA_RELS), dtype=torch.float32)
    dst.fill_(0)  # touch the pages once, like the writer's reused staging slots
    sizes = _objects(ema)
    payload = [bytes(s) for s in sizes]  # raw-write source, same object sizes
    stalls, memcpys, writes, raws = [], [], [], []
    raw_dir = Path(tmp, "raw")
    for r in range(reps + 1):
        snap = _snapshot_once(ema, model, r)
        t0 = time.perf_counter()
        for k, prof in enumerate(ema.profiles):
            dst[k * n : (k + 1) * n].copy_(prof.flat[:n])
        mc = time.perf_counter() - t0
        # raw files are kept, like the snapshots: both face the same dirty-page writeback
        (raw_dir / str(r)).mkdir(parents=True)
        t0 = time.perf_counter()
        for i, data in enumerate(payload):
            with open(raw_dir / str(r) / f"obj{i}", "wb") as f:
                f.write(data)
        raw = time.perf_counter() - t0
        if r == 0:
            continue  # first snapshot: fresh shared memory pages, writer start-up
        stalls.append(snap["stall"])
        memcpys.append(mc)
        writes.append(snap["write_s"])
        raws.append(raw)
    ema.close()
    shutil.rmtree(raw_dir, ignore_errors=True)
    snaps = sorted(Path(tmp, "store", "snapshots").glob("step-*"))
    on_disk = sum(f.stat().st_size for f in snaps[-1].rglob("*") if f.is_file()) if snaps else 0
    res.notes.append(f"one snapshot takes {on_disk / MiB:.1f} MiB on disk for {nbytes / MiB:.1f} MiB of EMA data "
                     f"({on_disk / nbytes:.3f}x: shard objects with their inner-chunk checksums, and the JSON "
                     f"documents)")
    tab = Table(f"Local store: {nbytes / MiB:.0f} MiB per snapshot ({len(sizes)} data objects)",
                ["what", "median", "vs baseline"])
    tab.rows.append(["training-thread stall per snapshot", f"{fmt_ms(med(stalls))} ms", ""])
    tab.rows.append(["memcpy of the same bytes (baseline)", f"{fmt_ms(med(memcpys))} ms", ""])
    r_stall = paired_ratio(stalls, memcpys)
    tab.rows.append(["stall / memcpy", "", fmt_x(r_stall)])
    tab.rows.append(["writer throughput (zarr, writer process)", f"{nbytes / med(writes) / GiB:.2f} GiB/s", ""])
    tab.rows.append(["raw file writes, same objects (baseline)", f"{nbytes / med(raws) / GiB:.2f} GiB/s", ""])
    r_w = paired_ratio(raws, writes)  # throughput ratio = inverse time ratio
    tab.rows.append(["writer / raw throughput", "", fmt_x(r_w)])
    res.tables.append(tab)
    res.goals.append(Goal("snapshot stall close to a memcpy of the same bytes (training never waits for I/O)",
                          fmt_x(r_stall), r_stall <= 1.5,
                          "stall = slot wait + copy into the writer's shared memory"))
    res.goals.append(Goal("local write throughput vs raw file writes", fmt_x(r_w), None,
                          "informational: runs in the background writer process, off the training thread"))
    res.data["local"] = {"stall_s": stalls, "memcpy_s": memcpys, "write_s": writes, "raw_s": raws, "bytes": nbytes}


def _s3(res: Result, numel: int, reps: int) -> None:
    try:
        import s3fs
    except ImportError:
        res.notes.append("s3fs not installed: S3 part skipped (pip install 'dist-ema[s3]')")
        return
    try:
        proc, url = start_moto()
    except Exception as e:  # noqa: BLE001 - report, keep the rest of the suite
        res.notes.append(f"moto server unavailable ({e}): S3 part skipped")
        return
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1")
    try:
        fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": url})
        fs.mkdir("bench")
        opts = {"endpoint_url": url, "key": KEY, "secret": SECRET}
        from dist_ema.store.multipart import DEFAULT_CONCURRENCY, DEFAULT_PART_BYTES

        part, inflight = 16 * MiB, 4
        model, ema = _ema(numel, "s3://bench/store", opts)
        mp_model, mp_ema = _ema(numel, "s3://bench/parts", opts, upload_part_bytes=part, upload_concurrency=inflight)
        n = ema.owned_numel
        nbytes = n * 4 * len(SIGMA_RELS)
        payload = [bytes(s) for s in _objects(ema)]
        t = {k: [] for k in ("write", "parts", "raw", "raw_all", "raw_parts")}
        for r in range(reps + 1):
            got = {"write": _snapshot_once(ema, model, r)["write_s"],
                   "parts": _snapshot_once(mp_ema, mp_model, r)["write_s"]}
            t0 = time.perf_counter()
            for i, data in enumerate(payload):
                fs.pipe_file(f"bench/raw/{r}/obj{i}", data)
            got["raw"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            fs.pipe({f"bench/raw-all/{r}/obj{i}": data for i, data in enumerate(payload)})
            got["raw_all"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            for i, data in enumerate(payload):  # s3fs goes multipart from 2 parts on
                fs.pipe_file(f"bench/raw-parts/{r}/obj{i}", data, chunksize=part, max_concurrency=inflight)
            got["raw_parts"] = time.perf_counter() - t0
            if r == 0:
                continue
            for k, v in got.items():
                t[k].append(v)
        ema.close()
        mp_ema.close()
        mib = f"{part // MiB} MiB"
        how = "one PUT per shard" if len(payload[0]) < DEFAULT_PART_BYTES else "multipart"
        tab = Table(f"S3 (moto server on loopback): {nbytes / MiB:.0f} MiB per snapshot ({len(payload)} shard objects "
                    f"of {len(payload[0]) / MiB:.0f} MiB)", ["what", "median", "vs baseline"])

        def row(what: str, k: str) -> None:
            tab.rows.append([what, f"{nbytes / med(t[k]) / MiB:.0f} MiB/s", ""])

        row(f"writer, default settings ({DEFAULT_PART_BYTES // MiB} MiB parts, {DEFAULT_CONCURRENCY} in flight: "
            f"{how})", "write")
        row(f"writer, {mib} parts, {inflight} in flight ({'multipart' if len(payload[0]) > part else 'one PUT'})",
            "parts")
        row("raw s3fs pipe_file, one object after another (baseline)", "raw")
        row("raw s3fs pipe of all objects at once", "raw_all")
        row(f"raw s3fs pipe_file, {mib} parts, {inflight} in flight", "raw_parts")
        ratios = {"write": paired_ratio(t["raw"], t["write"]), "write_all": paired_ratio(t["raw_all"], t["write"]),
                  "parts": paired_ratio(t["raw_parts"], t["parts"]),
                  "parts_raw": paired_ratio(t["raw"], t["parts"])}  # throughput ratios: inverse times
        tab.rows.append(["writer (default) / raw pipe_file", "", fmt_x(ratios["write"])])
        tab.rows.append(["writer (default) / raw pipe of all at once", "", fmt_x(ratios["write_all"])])
        tab.rows.append([f"writer ({mib} parts) / raw pipe_file with the same parts", "", fmt_x(ratios["parts"])])
        tab.rows.append([f"writer ({mib} parts) / raw pipe_file", "", fmt_x(ratios["parts_raw"])])
        res.tables.append(tab)
        res.goals.append(Goal("S3 write throughput vs raw s3fs puts", fmt_x(ratios["write"]), ratios["write"] >= 0.8,
                              "goal >= 0.8x; the writer also PUTs 3 zarr.json documents per rank and snapshot and "
                              "checksums every inner chunk; moto (in RAM, one process) is the bottleneck on loopback"))
        res.data["s3"] = {"write_s": t["write"], "parts_s": t["parts"], "raw_s": t["raw"],
                          "raw_all_s": t["raw_all"], "raw_parts_s": t["raw_parts"], "bytes": nbytes,
                          "default_part_bytes": DEFAULT_PART_BYTES, "part_bytes": part, "concurrency": inflight}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
