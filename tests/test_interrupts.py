"""Interrupts and forgotten close(): Ctrl-C, a SIGKILLed trainer, a garbage-collected EMA, a job that stops
calling update(). None of them may lose a snapshot, leak a process or shared memory, or hand a live job's
store to another job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dist_ema.store.io as store_io
from dist_ema.store import StoreError, open_store
from dist_ema.tracker import PostHocEMA
from tests.dist_harness import ROOT, free_port, run_workers

psutil = pytest.importorskip("psutil")


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its parent's wait() does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _leaked(names: list[str]) -> list[str]:
    return [n for n in names if Path("/dev/shm", n).exists()]


def _kill_group(p) -> None:
    """A failed test leaves no training process behind (its group, whatever it still holds)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def _until(cond, seconds: float = 60.0) -> bool:
    """Wait for ``cond()`` (an event, not a duration: the bound only keeps a broken run from hanging)."""
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ----------------------------------------------------------------------------- Ctrl-C and SIGKILL

# Trains, snapshots at steps 3 and 6 (6 stays pending: no exchange follows it), saves the EMA of step 6,
# says so, then trains on until interrupted.
_TRAIN = r"""
import sys, time, torch
from dist_ema import PostHocEMA
url, want = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
opt = torch.optim.SGD(m.parameters(), lr=0.01)
ema = PostHocEMA(m, sigma_rels=(0.05, 0.10), store=url, writer="process")

def step():
    m(torch.randn(8, 64)).pow(2).mean().backward(); opt.step(); opt.zero_grad(); ema.update()

for i in range(6):
    step()
    if (i + 1) % 3 == 0:
        ema.snapshot()
torch.save(ema.full_state_dict(sigma_rel=0.10), want)
w = ema.snapshots.writer
print("SNAP", ema.step, w._proc.pid, *[s.name for s in w._shms], flush=True)
while True:
    step()
    time.sleep(0.01)
"""


def _start_training(tmp_path: Path, i: int):
    url, want = str(tmp_path / f"s{i}"), str(tmp_path / f"want{i}.pt")
    # its own process group, as a shell runs a foreground job: Ctrl-C signals the whole group
    p = subprocess.Popen([sys.executable, "-c", _TRAIN, url, want], cwd=str(ROOT), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    return p, url, want


def _snap_line(p) -> tuple[int, int, list[str]]:
    line = p.stdout.readline()
    assert line.startswith("SNAP"), line + p.stderr.read()
    _, step, pid, *shms = line.split()
    return int(step), int(pid), shms


@pytest.mark.dist
def test_ctrl_c_commits_the_newest_snapshot_and_leaves_nothing_behind(tmp_path):
    runs = [_start_training(tmp_path, i) for i in range(6)]
    try:
        seen, errs = [], []
        for p, _, _ in runs:
            step, writer, shms = _snap_line(p)
            os.killpg(p.pid, signal.SIGINT)  # the terminal's Ctrl-C: the whole foreground group
            seen.append((step, writer, shms))
        for p, _, _ in runs:
            errs.append(p.communicate(timeout=120)[1])
    finally:
        for p, _, _ in runs:
            _kill_group(p)
    for (_, url, want), (step, writer, shms), err in zip(runs, seen, errs):
        assert "KeyboardInterrupt" in err, err  # the trainer was interrupted
        assert "failed" not in err, err
        store = open_store(url)
        assert [s.step for s in store.snapshots()] == [3, step], err
        for name, v in torch.load(want).items():
            assert torch.equal(store.read(step, 0.10, name), v), name
        assert not _running(writer)
        assert _leaked(shms) == []
        assert not (Path(url) / "owner.json").exists()


# Two ranks: step 3 committed, step 6 taken and pending; then idle (no collective to be interrupted inside).
_TRAIN_RANKS = r"""
import sys, time, torch.distributed as dist
from dist_ema import PostHocEMA
from tests.engines import build
dist.init_process_group("gloo")
setup = build("replicated", seed=0)
ema = PostHocEMA(setup.target, sigma_rels=(0.05, 0.10), store=sys.argv[1], writer="process")
for i in range(6):
    setup.step()
    ema.update()
    if i == 2:
        ema.snapshot()
        ema.flush()
ema.snapshot()
w = ema.snapshots.writer
line = " ".join(map(str, ["SNAP", dist.get_rank(), ema.step, w._proc.pid, *[s.name for s in w._shms]]))
sys.stdout.write(line + "\n")  # one write: the two ranks share the pipe
sys.stdout.flush()
while True:
    time.sleep(0.01)
"""


# A launcher in a terminal's foreground: its ranks share its process group (Ctrl-C reaches them all).
_LAUNCH = r"""
import os, signal, subprocess, sys
ps = [subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]],
                       env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r))) for r in range(2)]
signal.signal(signal.SIGINT, signal.SIG_IGN)  # after the start: the ranks keep Python's KeyboardInterrupt
sys.exit(max(p.wait() != 0 for p in ps))
"""


@pytest.mark.dist
def test_ctrl_c_on_two_ranks_names_the_pending_snapshot_on_each(tmp_path):
    url = str(tmp_path / "s")
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-c", _LAUNCH, _TRAIN_RANKS, url], cwd=str(ROOT), env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        seen = {}
        for _ in range(2):
            line = p.stdout.readline()
            assert line.startswith("SNAP"), line + p.stderr.read()
            _, r, step, writer, *shms = line.split()
            seen[int(r)] = (int(step), int(writer), shms)
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        _kill_group(p)
    assert err.count("KeyboardInterrupt") >= 2, err
    for r, (step, writer, shms) in seen.items():
        assert step == 6
        assert f"rank {r}: the program ended without ema.close()" in err, err
        assert not _running(writer)
        assert _leaked(shms) == []
    assert "['step-000000000006']" in err, err
    assert [s.step for s in open_store(url).snapshots()] == [3]  # step 6 not committed: named, not torn open
    assert not (Path(url) / "owner.json").exists()


@pytest.mark.dist
def test_the_writer_does_not_outlive_a_sigkilled_trainer(tmp_path):
    p, url, _ = _start_training(tmp_path, 0)
    try:
        _, writer, shms = _snap_line(p)
    finally:
        _kill_group(p)
    # (above) the trainer's whole group, its resource tracker too, which would unlink leaked shared memory;
    # the writer, in a session of its own, is not signalled: it must notice and clean up by itself
    p.communicate(timeout=60)
    assert _until(lambda: not _running(writer)), "the writer outlived its trainer"
    assert _until(lambda: not _leaked(shms)), _leaked(shms)


# ----------------------------------------------------------------------------- garbage collection

_GC = r"""
import gc, json, os, sys, torch
from dist_ema import PostHocEMA, open_store
url, want = sys.argv[1], sys.argv[2]

def train():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ema = PostHocEMA(m, sigma_rels=(0.10,), store=url, writer="process")
    for _ in range(3):
        m(torch.randn(4, 8)).pow(2).mean().backward(); opt.step(); opt.zero_grad(); ema.update()
    ema.snapshot()
    torch.save(ema.full_state_dict(sigma_rel=0.10), want)
    w = ema.snapshots.writer
    return w._proc.pid, [s.name for s in w._shms], ema.snapshots.job  # no close()

writer, shms, job = train()
gc.collect()
print("RESULT", json.dumps({"writer": writer, "shms": shms, "job": job,
                            "steps": [s.step for s in open_store(url).snapshots()],
                            "owner": os.path.exists(os.path.join(url, "owner.json")),
                            "job_record": os.path.exists(os.path.join(url, "jobs", job + ".json"))}), flush=True)
m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Linear(32, 4))
PostHocEMA(m, sigma_rels=(0.10,), store=url, writer="sync", resume=True).close()  # a new job opens the store
print("REOPENED", flush=True)
"""


@pytest.mark.dist
def test_a_garbage_collected_ema_commits_and_releases_everything(tmp_path):
    url, want = str(tmp_path / "s"), str(tmp_path / "want.pt")
    p = subprocess.Popen([sys.executable, "-c", _GC, url, want], cwd=str(ROOT), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("RESULT"), line + p.stderr.read()
    got = json.loads(line.split(" ", 1)[1])
    # checked while that process still runs: nothing of the collected EMA may wait for interpreter exit
    assert not _running(got["writer"])
    assert _leaked(got["shms"]) == []
    out, err = p.communicate(timeout=120)
    assert got["steps"] == [3], err
    assert not got["owner"] and not got["job_record"], err
    assert "REOPENED" in out, err
    assert "garbage-collected" in err and "close()" in err, err
    store = open_store(url)
    for name, v in torch.load(want).items():
        assert torch.equal(store.read(3, 0.10, name), v), name


def worker_gc(rank, ws, out, url):
    import gc

    from tests.engines import build

    def train() -> list:
        setup = build("replicated", seed=0)
        ema = PostHocEMA(setup.target, sigma_rels=(0.05, 0.10), store=url, writer="process")
        for _ in range(3):
            setup.step()
            ema.update()
        ema.snapshot()
        ema.flush()  # step 3 committed
        setup.step()
        ema.update()
        ema.snapshot()  # step 4: pending, no close()
        w = ema.snapshots.writer
        return [w._proc.pid, [s.name for s in w._shms]]

    writer, shms = train()
    gc.collect()
    Path(out, f"result{rank}").write_text(json.dumps({
        "writer": _running(writer), "shms": _leaked(shms),
        "owner": rank == 0 and Path(url, "owner.json").exists(),  # rank 0 owns the store
    }))
    setup = build("replicated", seed=0)
    PostHocEMA(setup.target, sigma_rels=(0.05, 0.10), store=url, writer="sync", resume=True).close()


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_a_garbage_collected_ema_on_two_ranks_names_what_is_lost(tmp_path):
    url = str(tmp_path / "s")
    outs = run_workers("tests.test_interrupts:worker_gc", 2, tmp_path / "w", kwargs={"url": url})
    for r in range(2):
        got = json.loads((tmp_path / "w" / f"result{r}").read_text())
        assert got == {"writer": False, "shms": [], "owner": False}, (r, got, outs[r])
        assert "garbage-collected" in outs[r] and "step-000000000004" in outs[r] and "close()" in outs[r], outs[r]
    assert [s.step for s in open_store(url).snapshots()] == [3]  # step 4 never committed, the store opens again


# ----------------------------------------------------------------------------- heartbeat


def test_a_live_job_without_updates_keeps_its_store(tmp_path, monkeypatch):
    """No update() for longer than the staleness limit (evaluation, a slow checkpoint): the job still owns the store."""
    stale = 3.0
    monkeypatch.setattr(store_io, "STALE_AFTER", stale)
    monkeypatch.setattr(store_io, "HEARTBEAT_SECONDS", 0.2)
    jobs = {}
    for mode in ("process", "thread", "sync"):
        url = str(tmp_path / mode)
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 2)
        ema = PostHocEMA(m, sigma_rels=(0.1,), store=url, writer=mode)
        ema.update()
        key = Path(url, "jobs", ema.snapshots.job + ".json")
        jobs[mode] = (ema, url, key, json.loads(key.read_text())["last_seen"])
    idle_from = time.time()
    time.sleep(stale + 1.0)  # the idle period itself: longer than the staleness limit, no update()
    for mode, (ema, url, key, first) in jobs.items():
        last = json.loads(key.read_text())["last_seen"]
        assert last > first and last > idle_from + 1.0, (mode, first, last, idle_from)
        with pytest.raises(StoreError, match="owned by another job") as e:
            PostHocEMA(torch.nn.Linear(3, 2), sigma_rels=(0.1,), store=url, writer="sync", resume=True)
        assert ema.snapshots.job in str(e.value)
    for mode, (ema, url, key, _) in jobs.items():
        ema.close()
        assert not key.exists() and not Path(url, "owner.json").exists(), mode
    time.sleep(1.0)  # several heartbeat intervals after close(): no beat brings the record back
    assert [mode for mode, (_, _, key, _) in jobs.items() if key.exists()] == []
