"""Committed snapshots never change, whoever else writes the store (docs/commit-protocol.md).

Every job writes under its own attempt folder; the commit marker is create-only and names the
attempt it commits; a store has one owner at a time. Checked by hashing every committed
object before and after the other job ran, and by reading the survivor's snapshots back
against the EMA it held.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dist_ema import PostHocEMA, open_store
from dist_ema.snapshot.ledger import SnapshotLedger
from dist_ema.store.fs import StoreError

ROOT = Path(__file__).resolve().parent.parent


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 2))


def _step(m: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _train(m: torch.nn.Module, url: str, steps: int, every: int) -> dict[str, torch.Tensor]:
    """A job that trains ``steps`` steps with a snapshot every ``every``, closes, and returns its EMA (0.10)."""
    with PostHocEMA(m, store=url, snapshot_every=every, writer="sync") as ema:
        for i in range(steps):
            _step(m, i)
            ema.update()
        return {k: v.clone() for k, v in ema.full_state_dict(sigma_rel=0.10).items()}


def _committed_bytes(store_dir: Path) -> dict[str, str]:
    """sha256 of every object that a commit marker covers (the marker and its attempt's data)."""
    out = {}
    for marker in (store_dir / "snapshots").glob("step-*/commit.json"):
        meta = json.loads(marker.read_text())
        out[str(marker)] = hashlib.sha256(marker.read_bytes()).hexdigest()
        folder = marker.parent / meta["attempt"] if meta.get("attempt") else marker.parent
        for f in folder.rglob("*"):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


_JOB = textwrap.dedent("""
    import sys, time, torch
    from dist_ema import PostHocEMA
    url, seed, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "hold"
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 2))
    try:
        ema = PostHocEMA(m, store=url, snapshot_every=3, writer="sync")
    except Exception as e:
        print("REFUSED", type(e).__name__, e, flush=True)
        sys.exit(3)
    print("STARTED", flush=True)
    for i in range(6):
        g = torch.Generator().manual_seed(seed * 100 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        ema.update()
    if hold:  # alive, owning the store, until the test closes stdin
        sys.stdin.read()
    ema.close()
    print("DONE", flush=True)
""")


@pytest.mark.dist
def test_two_jobs_at_once_the_second_is_refused_before_writing(tmp_path):
    """Two training processes (different seeds) started on one empty store: the second never writes."""
    url = str(tmp_path / "s")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first = subprocess.Popen([sys.executable, "-c", _JOB, url, "1", "hold"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.PIPE, text=True)
    line = first.stdout.readline()
    assert "STARTED" in line, line + first.stdout.read()
    deadline = time.monotonic() + 60
    while not open_store(url).snapshots() and time.monotonic() < deadline:
        time.sleep(0.1)
    before = _committed_bytes(tmp_path / "s")
    second = subprocess.run([sys.executable, "-c", _JOB, url, "2", "go"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 3, second.stdout + second.stderr
    assert "REFUSED StoreError" in second.stdout and "owned by another job" in second.stdout
    assert url in second.stdout and "resume='takeover'" in second.stdout
    out, _ = first.communicate(timeout=120)  # closes its stdin: the first job closes its EMA and ends
    assert first.returncode == 0 and "DONE" in out, out
    after = _committed_bytes(tmp_path / "s")
    assert {k: v for k, v in after.items() if k in before} == before  # nothing committed changed
    # the survivor's snapshots are its own, bit for bit: replay job 1 here and compare
    m = _model(1)
    ema = PostHocEMA(m)
    want = {}
    for i in range(6):
        _step(m, 100 + i)
        ema.update()
        if (i + 1) % 3 == 0:
            want[i + 1] = {k: v.clone() for k, v in ema.full_state_dict(sigma_rel=0.10).items()}
    store = open_store(url)
    assert [s.step for s in store.snapshots()] == [3, 6]
    for step, sd in want.items():
        for name, v in sd.items():
            assert torch.equal(store.read(step, 0.10, name), v), (step, name)
    assert not (tmp_path / "s" / "owner.json").exists()  # released by the survivor's close()


def test_a_commit_race_leaves_the_committed_snapshot_untouched(tmp_path):
    """A job that commits a step another job committed first (a takeover race, a resumed job repeating
    steps) writes only its own attempt; the marker stays the first job's and start-up removes the rest."""
    url = str(tmp_path / "s")
    kept = _train(_model(1), url, steps=3, every=3)
    before = _committed_bytes(tmp_path / "s")
    b = _model(2)
    ema_b = PostHocEMA(b, store=url, resume="takeover", writer="sync")
    # a job that has not seen the commit (another host's view): its ledger knows of no committed snapshot
    ema_b.snapshots.ledger = SnapshotLedger([], keep=None)
    ema_b.step = 0
    for i in range(3):
        _step(b, 50 + i)
        ema_b.update()
    with pytest.raises(StoreError, match="already committed.*by another job"):
        ema_b.snapshot()
        ema_b.snapshots.flush()
    ema_b.close()
    assert _committed_bytes(tmp_path / "s") == before
    attempts = sorted(p.name for p in (tmp_path / "s" / "snapshots" / "step-000000000003").iterdir() if p.is_dir())
    assert len(attempts) == 2  # the committed one and the refused one
    store = open_store(url)
    for name, v in kept.items():
        assert torch.equal(store.read(3, 0.10, name), v)
    with PostHocEMA(_model(1), store=url, resume=True, writer="sync"):  # the next start cleans up
        pass
    left = [p.name for p in (tmp_path / "s" / "snapshots" / "step-000000000003").iterdir() if p.is_dir()]
    assert left == [json.loads((tmp_path / "s" / "snapshots" / "step-000000000003" / "commit.json").read_text())
                    ["attempt"]]


def test_a_resumed_job_repeating_steps_is_refused_before_staging(tmp_path):
    url = str(tmp_path / "s")
    m = _model(1)
    _train(m, url, steps=6, every=3)
    before = _committed_bytes(tmp_path / "s")
    ema = PostHocEMA(m, store=url, snapshot_every=3, writer="sync", resume=True)
    ema.step = 2  # the training loop went back without restoring the EMA from its checkpoint
    _step(m, 99)
    ema.update()
    with pytest.raises(StoreError, match="already committed"):
        ema.snapshot()
    ema.close(final_snapshot=False)
    assert _committed_bytes(tmp_path / "s") == before


def _foreign_owner(store_dir: Path, *, age: float, host: str = "another-host", run: str | None = None) -> dict:
    rec = {"job": "j20000101T000000Z-deadbeef", "host": host, "pid": 1, "run": run,
           "started": time.time() - age, "stale_after": 600.0}
    (store_dir / "owner.json").write_text(json.dumps(rec))
    return rec


def test_takeover_only_when_asked_and_the_old_owner_is_fenced(tmp_path, caplog):
    url = str(tmp_path / "s")
    m = _model(1)
    _train(m, url, steps=2, every=2)
    # a live owner on another host (recent): refused, with or without resume
    _foreign_owner(tmp_path / "s", age=5)
    for resume in (False, True):
        with pytest.raises(StoreError, match="owned by another job.*another-host"):
            PostHocEMA(m, store=url, resume=resume, writer="sync")
    assert json.loads((tmp_path / "s" / "owner.json").read_text())["host"] == "another-host"  # untouched
    # a stale one (not seen for longer than stale_after): resume=True takes it over, logged; without resume no
    _foreign_owner(tmp_path / "s", age=3600)
    with pytest.raises(StoreError, match="owned by another job"):
        PostHocEMA(m, store=url, writer="sync")
    with caplog.at_level("WARNING", logger="dist_ema"):
        ema = PostHocEMA(m, store=url, resume=True, writer="sync")
    assert "took over" in caplog.text and "not been seen for" in caplog.text
    owner = json.loads((tmp_path / "s" / "owner.json").read_text())
    assert owner["job"] == ema.snapshots.job and owner["took_over"]["host"] == "another-host"
    # an explicit takeover of a live owner, then the old owner is fenced at its next commit
    new = PostHocEMA(_model(2), store=url, resume="takeover", writer="sync")
    for i in range(2):
        _step(m, 10 + i)
        ema.update()
    with pytest.raises(StoreError, match="no longer owns"):
        ema.snapshot()
        ema.snapshots.flush()
    ema.snapshots.abandon()
    assert [s.step for s in open_store(url).snapshots()] == [2]  # the fenced job committed nothing
    new.close()
    assert not (tmp_path / "s" / "owner.json").exists()


@pytest.mark.dist
def test_a_restart_of_the_same_run_or_a_dead_local_process_is_taken_over(tmp_path, monkeypatch):
    url = str(tmp_path / "s")
    PostHocEMA(_model(1), store=url, writer="sync").close()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-42")
    _foreign_owner(tmp_path / "s", age=1, run="TORCHELASTIC_RUN_ID=run-42")
    PostHocEMA(_model(1), store=url, resume=True, writer="sync").close()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _foreign_owner(tmp_path / "s", age=1, host=socket.gethostname())
    rec = json.loads((tmp_path / "s" / "owner.json").read_text())
    rec["pid"] = dead.pid
    (tmp_path / "s" / "owner.json").write_text(json.dumps(rec))
    PostHocEMA(_model(1), store=url, resume=True, writer="sync").close()
