"""A full disk under a local store: a clear StoreError on every rank, nothing torn visible, and
with ``on_error="warn"`` training goes on and commits again once space is back.

The disk fills through RLIMIT_FSIZE (works without privileges): each rank lowers the limit of
its snapshot writer process (the only process that writes snapshot data) below the size of
one shard, so writes fail with EFBIG (SIGXFSZ is ignored, as CPython does by default).
Where this machine lets a test mount a small tmpfs (root), the same runs on a real full file
system (ENOSPC), with a ballast file that is removed to give the space back.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from dist_ema import PostHocEMA, open_store
from dist_ema.store.fs import StoreError
from tests.dist_harness import ROOT, run_workers

pytestmark = pytest.mark.dist

LIMIT = 4096  # bytes: every JSON object of the store fits, no data shard does (8 KiB per rank and profile)
EVERY = 2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(64, 64)  # 4160 parameters: each of 2 ranks owns ~8 KiB per profile


def _set_fsize(limit: int) -> int:
    """RLIMIT_FSIZE of this rank's writer process(es); returns how many processes it was set on."""
    import psutil

    n = 0
    for child in psutil.Process().children(recursive=True):
        try:
            if "dist_ema.store.writer" in " ".join(child.cmdline()):
                resource.prlimit(child.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
                n += 1
        except psutil.NoSuchProcess:
            pass
    return n


def _fill(ballast: Path, full: bool) -> None:
    """tmpfs: fill every free byte but 2 KiB with a ballast file (full), or remove it (free)."""
    if not full:
        ballast.unlink(missing_ok=True)
        return
    st = os.statvfs(ballast.parent)
    with open(ballast, "wb") as f:
        try:
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 2048))
        except OSError:
            pass  # full: as intended


def _space(how: str, rank: int, url: str, full: bool, writers: int = 1) -> None:
    """Fill (or free) the store's disk between two snapshots, the same on every rank."""
    torch.distributed.barrier()
    if how == "rlimit":
        n = _set_fsize(LIMIT if full else resource.RLIM_INFINITY)
        assert n == writers, f"rank {rank}: {n} writer processes"
    elif rank == 0:
        _fill(Path(url).parent / "ballast", full)
    torch.distributed.barrier()


def _train(ema: PostHocEMA, m: torch.nn.Module, upto: int, expected: dict) -> None:
    while ema.step < upto:
        g = torch.Generator().manual_seed(ema.step)  # the same on every rank (a replicated model)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        ema.update()
        if ema.updates % EVERY == 0:
            expected[ema.step] = ema.full_state_dict(sigma_rel=0.10)


def worker_disk_full(rank, ws, out, url, how):
    """Job 1 (on_error="raise") stops at a full disk; job 2 resumes the store with on_error="warn",
    trains through a second full period and commits again once space is back."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, not a signal
    m, expected, result = _model(), {}, {"rank": rank}
    ema = PostHocEMA(m, sigma_rels=(0.05, 0.10), store=url, snapshot_every=EVERY, on_error="raise")
    _train(ema, m, 3, expected)
    ema.flush()
    _space(how, rank, url, full=True)
    try:
        _train(ema, m, 4, expected)  # the snapshot of step 4 is written to a full disk
        ema.flush()
    except StoreError as e:
        result["error"] = str(e)
        ema.snapshots.abandon()
    _space(how, rank, url, full=False, writers=0)  # job 1's writer is gone; job 2's starts with no limit
    # job 2: resume (from step 2, the newest committed), keep training through a full disk
    ema = PostHocEMA(m, sigma_rels=(0.05, 0.10), store=url, snapshot_every=EVERY, on_error="warn", resume=True)
    result["resumed_at"] = ema.step
    _train(ema, m, 5, expected)
    ema.flush()
    _space(how, rank, url, full=True)
    _train(ema, m, 9, expected)  # snapshots 6 and 8 are lost
    ema.flush()
    _space(how, rank, url, full=False)
    _train(ema, m, 12, expected)
    ema.close()
    result["skipped"] = list(ema.snapshots.skipped)
    Path(out, f"r{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        torch.save(expected, Path(out, "expected.pt"))


def _ls_verify(url: str) -> str:
    r = subprocess.run([sys.executable, "-m", "dist_ema.cli", "ls", "--verify", url], capture_output=True,
                       text=True, cwd=str(ROOT), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _check_committed(url: str, out: Path) -> list[int]:
    """Every committed snapshot verifies and holds what the tracker held; no temp file is left."""
    expected = torch.load(out / "expected.pt", weights_only=True)
    store = open_store(url)
    steps = []
    for s in store.snapshots():
        assert store.verify(s) == [], s.id
        for name, ref in expected[s.step].items():
            torch.testing.assert_close(store.read(s.step, 0.10, name), ref, rtol=0, atol=0, msg=f"{s.id} {name}")
        steps.append(s.step)
    assert not [p for p in Path(url).rglob("*.tmp-*")], "a failed write left a temp file"
    assert f"{len(steps)} committed snapshot(s)" in _ls_verify(url)
    return steps


@pytest.fixture(params=["rlimit", "tmpfs"])
def small_disk(request, tmp_path):
    """(how, folder of the store): RLIMIT_FSIZE anywhere, a 1 MiB tmpfs where mounting is allowed."""
    if request.param == "rlimit":
        yield "rlimit", tmp_path
        return
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or not hasattr(os, "statvfs"):
        pytest.skip("mounting a tmpfs needs root here; the RLIMIT_FSIZE variant covers the case")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", f"dist-ema-{uuid.uuid4().hex[:6]}", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the RLIMIT_FSIZE variant covers the case")
    try:
        yield "tmpfs", mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.timeout(200)
def test_disk_full_error_on_every_rank_store_consistent_warn_continues(tmp_path, small_disk):
    how, where = small_disk
    url = str(where / "store")
    out = tmp_path / "w"
    run_workers("tests.test_disk_full:worker_disk_full", 2, out, kwargs=dict(url=url, how=how), timeout=170)
    res = [json.loads((out / f"r{r}.json").read_text()) for r in range(2)]
    # job 1: one clear error, the same on every rank, naming the store, the snapshot and the cause
    cause = "file too large" if how == "rlimit" else "no space left on the device"
    msg = res[0].get("error", "")
    assert res[1].get("error") == msg, res
    assert url in msg and cause in msg and "step-000000000004" in msg and "on_error='warn'" in msg, msg
    assert "rank 0" in msg and "rank 1" in msg  # both writers hit the full disk
    # job 2 resumed from the newest committed snapshot: step 4 was never visible
    assert res[0]["resumed_at"] == res[1]["resumed_at"] == 2
    # with on_error="warn" training went on: the snapshots written to a full disk are reported lost ...
    assert res[0]["skipped"] == res[1]["skipped"] == ["step-000000000006", "step-000000000008"]
    # ... and every other one is committed, intact, and holds what the tracker held (step 4: job 2's)
    assert _check_committed(url, out) == [2, 4, 10, 12]
