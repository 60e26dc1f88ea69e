"""Benchmark "many": a store with 1,000 snapshots x 2 profiles stays fast to list, open and read.

Stores of 100 and 1,000 snapshots (``--quick``: 50) of a small model (66K parameters, 2 profiles),
written through the real API (``PostHocEMA`` + ``snapshot()``), then, locally and on S3 (a moto
server on loopback in its own process; the local store copied up object by object):

- ``open_store(url).snapshots()`` (the listing), ``store.layout(newest)`` and ``store.read(step, ...)``
  of one parameter of a middle snapshot, each in a fresh process (imports excluded from the time);
- ``dist-ema ls STORE``, ``dist-ema inspect STORE`` and ``dist-ema ls --verify STORE``: the whole command;
- ``synthesize(...)`` of one target: the whole call, in a fresh process;
- the peak RSS of each (VmHWM of the fresh process; ``os.wait4`` for the commands) and, on S3, the
  requests each made (every botocore API call, counted in the process).

Medians of a few rounds. The goal: the time per snapshot of a listing does not grow from 100 to
1,000 snapshots (no per-snapshot repeated listing), a command that prints one snapshot does not
read every marker, and memory stays flat.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, Goal, Result, Table, env_for_children, med, run_json_child

TRACKED = (0.05, 0.10)
TARGET = 0.08
NUMEL = 2**16  # the model: 8 matrices of 8 x 1024 and a bias of 1024 (66,560 parameters)
S3_KEY, S3_SECRET = "dist-ema-bench-key", "dist-ema-bench-secret"


# ----------------------------------------------------------------------------- stores


def _make_store(path: str, n: int) -> float:
    """A store of ``n`` snapshots written through the API (synchronous writer); returns seconds."""
    import torch

    from bench.models import Bag
    from dist_ema import PostHocEMA

    torch.manual_seed(0)
    model = Bag(NUMEL, tensors=8)
    t0 = time.perf_counter()
    with PostHocEMA(model, sigma_rels=TRACKED, store=path, update_impl="foreach", writer="sync") as ema:
        for i in range(n):
            model.perturb(i)
            ema.update()
            ema.snapshot()
    return time.perf_counter() - t0


def _upload(fs, local: str, dest: str) -> tuple[float, int]:
    """Copy a local store to S3 object by object (concurrent PUTs); returns (seconds, objects)."""
    files = {}
    for root, _, names in os.walk(local):
        for name in names:
            p = os.path.join(root, name)
            files[f"{dest}/{os.path.relpath(p, local)}"] = Path(p).read_bytes()
    t0 = time.perf_counter()
    fs.pipe(files)
    return time.perf_counter() - t0, len(files)


# ----------------------------------------------------------------------------- the child


def _count_requests() -> dict[str, int]:
    """Count every S3 API call this process makes (paginated listings included), by operation."""
    counts: dict[str, int] = {}
    try:
        from aiobotocore.client import AioBaseClient
    except ImportError:
        return counts
    orig = AioBaseClient._make_api_call

    async def counted(self, operation_name, api_params):
        counts[operation_name] = counts.get(operation_name, 0) + 1
        return await orig(self, operation_name, api_params)

    AioBaseClient._make_api_call = counted
    return counts


def _peak_rss_mib() -> float:
    """Peak RSS of this process (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def child(cfg: dict) -> dict:
    """Operations on a store in this (fresh) process: seconds, peak RSS, requests (torch only where used)."""
    from dist_ema import open_store

    url, opts, op = cfg["store"], cfg.get("storage_options"), cfg["op"]
    counts = _count_requests()
    if op == "synthesize":
        import torch

        from dist_ema import synthesize

        torch.set_num_threads(1)

        before = _peak_rss_mib()
        t0 = time.perf_counter()
        r = synthesize(url, sigma_rels=[TARGET], out=cfg["out"], format="zarr", progress=False,
                       storage_options=opts)
        return {"seconds": time.perf_counter() - t0, "peak_rss_mib": _peak_rss_mib(), "rss_before_mib": before,
                "requests": counts, "snapshots": len(r.snapshots), "bytes_read": r.bytes_read}
    if op == "command":  # the command's requests (its time and RSS: _command, the command alone)
        import contextlib
        import io

        from dist_ema.cli import main

        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(cfg["args"])
        return {"rc": rc, "requests": counts}
    # the API, in order: open, listing, the newest snapshot's layout, one parameter of a middle snapshot
    out = {"rss_before_mib": _peak_rss_mib()}

    def timed(name: str, fn):
        counts.clear()
        t0 = time.perf_counter()
        v = fn()
        out[name] = {"seconds": time.perf_counter() - t0, "peak_rss_mib": _peak_rss_mib(), "requests": dict(counts),
                     "rss_before_mib": out["rss_before_mib"]}
        return v

    store = timed("open", lambda: open_store(url, opts))
    snaps = timed("listing", store.snapshots)
    timed("layout", lambda: store.layout(snaps[-1]))
    import torch  # store.read returns a torch tensor: its import is not the read's

    torch.set_num_threads(1)
    timed("read", lambda: store.read(cfg["step"], TRACKED[0], "b"))
    out["snapshots"] = len(snaps)
    out["steps_in_order"] = [s.step for s in snaps] == sorted(s.step for s in snaps)
    return out


def _child(cfg: dict, env: dict) -> dict:
    return run_json_child([sys.executable, "-m", "bench.many", json.dumps(cfg)], env=env)


# the command as `python -m dist_ema` runs it, reporting its peak RSS at exit (VmHWM: ru_maxrss of a child
# carries the forking parent's peak across exec)
_WITH_PEAK = ("import atexit, runpy, sys\n"
              "def peak():\n"
              "    for line in open('/proc/self/status'):\n"
              "        if line.startswith('VmHWM:'):\n"
              "            sys.stderr.write(f'BENCH-VMHWM-KB {line.split()[1]}\\n')\n"
              "atexit.register(peak)\n"
              "sys.argv[0] = 'dist-ema'\n"
              "runpy.run_module('dist_ema', run_name='__main__', alter_sys=True)\n")


def _command(args: list[str], env: dict) -> dict:
    """``python -m dist_ema ARGS`` (the whole command): wall seconds, its peak RSS, its last line."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _WITH_PEAK, *args], capture_output=True, text=True, env=env,
                       cwd=str(ROOT), timeout=900)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"dist-ema {' '.join(args)} exit {p.returncode}:\n{p.stderr[-2000:]}")
    peak = [ln.split()[1] for ln in p.stderr.splitlines() if ln.startswith("BENCH-VMHWM-KB ")]
    lines = p.stdout.strip().splitlines()
    return {"seconds": wall, "peak_rss_mib": int(peak[-1]) / 1024 if peak else float("nan"),
            "last": lines[-1] if lines else "", "lines": len(lines)}


# ----------------------------------------------------------------------------- the benchmark


OPS = ("open", "listing", "layout", "read", "ls", "inspect", "ls --verify", "synthesize")


def _measure(url: str, n: int, rounds: int, env: dict, opts: dict | None, tmp: str) -> dict[str, list[dict]]:
    """Every operation, ``rounds`` times, interleaved (round robin)."""
    runs: dict[str, list[dict]] = {k: [] for k in OPS}
    base = {"store": url, "storage_options": opts}
    for r in range(rounds):
        api = _child({**base, "op": "api", "step": max(1, n // 2)}, env)
        for op in ("open", "listing", "layout", "read"):
            runs[op].append(api[op])
        for op, args in (("ls", ["ls", url]), ("inspect", ["inspect", url]), ("ls --verify", ["ls", "--verify", url])):
            runs[op].append(_command(args, env))
            if r == 0 and opts is not None:
                runs[op][0]["requests"] = _child({**base, "op": "command", "args": args}, env)["requests"]
        out = str(Path(tmp, f"synth-{n}-{r}"))
        runs["synthesize"].append(_child({**base, "op": "synthesize", "out": out}, env))
        shutil.rmtree(out, ignore_errors=True)
        if api["snapshots"] != n or not api["steps_in_order"]:
            raise RuntimeError(f"{url}: listed {api['snapshots']} snapshots (in order: {api['steps_in_order']}); "
                               f"{n} were committed")
    return runs


def _requests(run: dict) -> str:
    req = run.get("requests") or {}
    return ", ".join(f"{k} {v}" for k, v in sorted(req.items())) or "-"


def _rows(where: str, n: int, runs: dict[str, list[dict]]) -> list[list]:
    rows = []
    for op in OPS:
        v = runs[op]
        s = med([x["seconds"] for x in v])
        rss = med([x["peak_rss_mib"] for x in v])
        grew = med([x["peak_rss_mib"] - x["rss_before_mib"] for x in v]) if "rss_before_mib" in v[0] else None
        rows.append([where, n, op, f"{s:.3f}", f"{1e3 * s / n:.2f}", f"{rss:.0f}",
                     "" if grew is None else f"{grew:.0f}", _requests(v[0])])
    return rows


def _start_moto():
    from bench.servers import start_moto

    return start_moto()


def run(quick: bool = False, threads: int = 1) -> Result:
    counts = (50,) if quick else (100, 1000)
    rounds = 1 if quick else 3
    res = Result("many", "Many snapshots: listing, open, ls, verify and synthesis of 100 and 1,000 snapshots")
    res.config = {"snapshots": list(counts), "model_params": NUMEL + 1024, "profiles": len(TRACKED),
                  "rounds": rounds, "threads_per_process": threads}
    tmp = tempfile.mkdtemp(prefix="bench-many-")
    table = Table("Fresh processes (a command: the whole command; open, listing, layout, read: one process, the calls "
                  "in that order after imports; synthesize: the whole call); medians of the rounds; requests: S3 API "
                  "calls of the first round",
                  ["store", "snapshots", "operation", "seconds", "ms per snapshot", "peak RSS MiB",
                   "RSS growth MiB (API: over the process after imports)", "requests"])
    data: dict = {"local": {}, "s3": {}}
    proc = None
    try:
        stores = {}
        for n in counts:
            path = str(Path(tmp, f"store-{n}"))
            sec = _make_store(path, n)
            stores[n] = path
            res.data[f"write_{n}_s"] = round(sec, 2)
            res.notes.append(f"{n} snapshots written through PostHocEMA + snapshot() (writer='sync') in {sec:.1f} s "
                             f"({1e3 * sec / n:.1f} ms per snapshot).")
        env = env_for_children(threads)
        for n in counts:
            runs = _measure(stores[n], n, rounds, env, None, tmp)
            data["local"][n] = runs
            table.rows += _rows("local", n, runs)
        try:
            import moto  # noqa: F401
            import s3fs
        except ImportError:
            res.notes.append("moto or s3fs not installed: the S3 rows were skipped")
            s3fs = None
        if s3fs is not None:
            proc, endpoint = _start_moto()
            opts = {"key": S3_KEY, "secret": S3_SECRET, "endpoint_url": endpoint}
            s3env = {**env, "FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_KEY,
                     "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
            fs = s3fs.S3FileSystem(**opts)
            fs.mkdir("bench")
            for n in counts:
                sec, objects = _upload(fs, stores[n], f"bench/store-{n}")
                res.notes.append(f"S3: the {n}-snapshot store ({objects} objects) copied up in {sec:.1f} s.")
                runs = _measure(f"s3://bench/store-{n}", n, rounds, s3env, opts, tmp)
                data["s3"][n] = runs
                table.rows += _rows("S3 (moto)", n, runs)
    finally:
        if proc is not None:
            if proc.stdin:
                proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    res.tables.append(table)
    res.data["runs"] = {w: {str(n): v for n, v in d.items()} for w, d in data.items()}
    _goals(res, data, counts)
    return res


def _goals(res: Result, data: dict, counts: tuple[int, ...]) -> None:
    lo, hi = counts[0], counts[-1]
    for where, label in (("local", "local"), ("s3", "S3 (moto)")):
        d = data.get(where) or {}
        if hi not in d:
            continue
        per = {n: med([x["seconds"] for x in d[n]["listing"]]) / n for n in (lo, hi)}
        growth = per[hi] / per[lo] if per[lo] > 0 else float("nan")
        ok = growth <= 1.5 if hi != lo else None
        res.goals.append(Goal(f"{label}: listing time per snapshot at {hi} within 1.5x of that at {lo} snapshots",
                              f"{1e3 * per[lo]:.2f} -> {1e3 * per[hi]:.2f} ms per snapshot ({growth:.2f}x)", ok,
                              "" if ok in (True, None) else "see the table"))
        ls = med([x["seconds"] for x in d[hi]["ls"]])
        lst = med([x["seconds"] for x in d[hi]["listing"]])
        res.goals.append(Goal(f"{label}: dist-ema ls of {hi} snapshots (whole command) vs the listing call alone",
                              f"{ls:.2f} s vs {lst:.2f} s", None, "the command adds the interpreter, the imports "
                              "and printing"))
        if where == "s3":
            req = d[hi]["listing"][0]["requests"]
            gets, lists = req.get("GetObject", 0), req.get("ListObjectsV2", 0)
            ok = gets <= hi + 2 and lists <= 2 + hi // 1000
            res.goals.append(Goal(f"S3: a listing of {hi} snapshots makes one LIST page per 1,000 folders and at "
                                  f"most one GET per marker", f"{lists} LIST, {gets} GET", ok,
                                  "" if ok else "requests repeated per snapshot"))
            ins = d[hi]["inspect"][0]
            res.goals.append(Goal(f"S3: dist-ema inspect (the newest snapshot) of a {hi}-snapshot store",
                                  f"{med([x['seconds'] for x in d[hi]['inspect']]):.2f} s, {_requests(ins)}", None,
                                  "the command prints one snapshot"))
        grew = {op: med([x["peak_rss_mib"] for x in d[hi][op]]) - med([x["peak_rss_mib"] for x in d[lo][op]])
                for op in ("listing", "ls", "inspect")}
        flat = max(grew.values()) <= 16.0
        res.goals.append(Goal(f"{label}: peak RSS of the listing, ls and inspect grows by at most 16 MiB from {lo} "
                              f"to {hi} snapshots", ", ".join(f"{op} {g:+.0f} MiB" for op, g in grew.items()),
                              flat if hi != lo else None, "" if flat else "see the table"))


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
