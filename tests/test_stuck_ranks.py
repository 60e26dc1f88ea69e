"""A rank that stops responding (SIGSTOP) inside dist-ema's own collectives: the others fail in bounded time.

Training: rank 1 stops itself right before a snapshot's exchange; rank 0 must raise a clear
error within the ``timeout`` option (5 s here, not the process group's 30 minutes), no torn
snapshot becomes visible, and a restart resumes from the newest committed snapshot.
Synthesis: rank 1 stops before planning; rank 0 raises within synthesize's ``timeout``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from dist_ema import PostHocEMA, open_store
from tests.dist_harness import run_workers

pytestmark = pytest.mark.dist

TIMEOUT = 5.0


def _pids() -> list[int]:
    import torch.distributed as dist

    out = [None, None]
    dist.all_gather_object(out, os.getpid())
    return out


def _record_and_end(path: Path, doc: dict, pids: list[int]) -> None:
    """Record what this rank saw, then end the stopped peer and this process (the group is broken)."""
    path.write_text(json.dumps(doc))
    for pid in pids:
        if pid != os.getpid():
            os.kill(pid, signal.SIGKILL)
    os._exit(0)


def worker_train(rank: int, ws: int, out: str, url: str) -> None:
    pids = _pids()
    torch.manual_seed(0)
    m = torch.nn.Linear(16, 16)
    ema = PostHocEMA(m, store=url, snapshot_every=2, writer="sync", timeout=TIMEOUT)
    for step in range(1, 7):
        with torch.no_grad():
            m.weight.add_(0.01)
        if step == 4 and rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)  # stuck: the snapshot at step 4 never gets this rank
        t0 = time.monotonic()
        try:
            ema.update()
        except Exception as e:  # noqa: BLE001 - recorded for the test
            _record_and_end(Path(out) / f"r{rank}.json", {"step": step, "type": type(e).__name__, "error": str(e),
                                                          "seconds": time.monotonic() - t0}, pids)
    ema.close()


def test_a_stuck_rank_fails_the_others_within_the_timeout_and_a_restart_resumes(tmp_path):
    url = str(tmp_path / "s")
    run_workers("tests.test_stuck_ranks:worker_train", 2, tmp_path, kwargs={"url": url}, timeout=120,
                expect_failure=True)
    got = json.loads((tmp_path / "r0.json").read_text())
    assert got["step"] == 4 and got["type"] == "CollectiveError", got
    assert "stopped responding" in got["error"] and "resume=True" in got["error"]
    assert got["seconds"] < 4 * TIMEOUT  # bounded by the option, not by the process group's timeout
    store = open_store(url)
    assert [s.step for s in store.snapshots()] == [2] and store.torn() in ([], ["step-000000000004"])
    assert store.verify(store.snapshots()[0]) == []
    m = torch.nn.Linear(16, 16)  # a restart (one rank now) takes the dead job's store over and resumes
    ema = PostHocEMA(m, store=url, snapshot_every=2, writer="sync", resume="takeover")
    assert ema.step == 2
    ema.close()


def worker_synth(rank: int, ws: int, out: str, url: str, phase: str = "start") -> None:
    import dist_ema.synthesis as syn
    from dist_ema import synthesize

    if phase == "map" and rank == 1:  # planned with the others, then stuck in the map
        real = syn._map_units

        def stuck(*a, **k):
            os.kill(os.getpid(), signal.SIGSTOP)
            return real(*a, **k)

        syn._map_units = stuck
    pids = [int(p) for p in os.environ["STUCK_PIDS"].split(",")] if "STUCK_PIDS" in os.environ else []
    (Path(out) / f"pid{rank}").write_text(str(os.getpid()))
    if rank == 1 and phase == "start":
        os.kill(os.getpid(), signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        synthesize(url, sigma_rels=[0.1], out=str(Path(out) / "o"), progress=False, timeout=TIMEOUT)
    except Exception as e:  # noqa: BLE001
        other = int((Path(out) / "pid1").read_text()) if rank == 0 else None
        _record_and_end(Path(out) / f"s{rank}.json", {"type": type(e).__name__, "error": str(e),
                                                      "seconds": time.monotonic() - t0}, [other] if other else pids)
    os._exit(0)


@pytest.mark.parametrize("phase", ["start", "map"])
def test_a_stuck_rank_fails_a_synthesis_within_the_timeout(tmp_path, phase):
    url = str(tmp_path / "s")
    m = torch.nn.Linear(16, 16)
    with PostHocEMA(m, store=url, snapshot_every=2, writer="sync") as ema:
        for _ in range(6):
            with torch.no_grad():
                m.weight.add_(0.01)
            ema.update()
    run_workers("tests.test_stuck_ranks:worker_synth", 2, tmp_path, kwargs={"url": url, "phase": phase}, timeout=120,
                expect_failure=True, env={"DIST_HARNESS_NO_INIT": "1"})
    got = json.loads((tmp_path / "s0.json").read_text())
    assert got["type"] == "StoreError" and "stopped responding" in got["error"], got
    assert got["seconds"] < 4 * TIMEOUT + 10
    assert not list((tmp_path / "o").rglob("*.safetensors")) if (tmp_path / "o").exists() else True
