"""The training run's lifecycle: time across restarts, skipped steps, older checkpoints, readers racing
retention, a dead writer, leaks at refusal and at exit. Nothing may harm the user's run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_ema import phema
from dist_ema.store import StoreError, open_store
from dist_ema.synthesis import synthesize
from dist_ema.tracker import PostHocEMA
from tests.dist_harness import ROOT, run_workers
from tests.engines import build

# ----------------------------------------------------------------------------- time and steps


def _linear(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Linear(3, 2)
    return m, torch.optim.SGD(m.parameters(), lr=0.1)


def _train(m, opt, ema, n):
    for _ in range(n):
        m(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update()


def test_time_advances_by_each_steps_own_samples(tmp_path):
    url = str(tmp_path / "s")
    m, opt = _linear()
    ema = PostHocEMA(m, sigma_rels=(0.1,), batch_size=32, store=url, writer="sync")
    _train(m, opt, ema, 10)
    ema.snapshot()
    before = ema.full_state_dict(sigma_rel=0.1)
    ema.close()
    assert ema.t == 320.0
    ema = PostHocEMA(m, sigma_rels=(0.1,), batch_size=64, store=url, writer="sync", resume=True)
    assert ema.t == 320.0
    _train(m, opt, ema, 1)
    assert ema.t == 384.0  # 320 + 64, not 11 * 64
    w = 1.0 - (1.0 - 64.0 / 384.0) ** (phema.sigma_rel_to_gamma(0.1) + 1)
    got = ema.full_state_dict(sigma_rel=0.1)
    for k in ("weight", "bias"):
        ref = before[k].double() + w * (getattr(m, k).detach().double() - before[k].double())
        torch.testing.assert_close(got[k].double(), ref, rtol=1e-6, atol=1e-7)
    ema.snapshot()
    ema.close()
    assert [s.t for s in open_store(url).snapshots()] == [320.0, 384.0]


def test_amp_skipped_step_counts_as_skipped():
    m, opt = _linear()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    ema = PostHocEMA(m, sigma_rels=(0.1,))
    for i in range(4):
        loss = m(torch.randn(4, 3)).pow(2).mean()
        if i == 2:
            loss = loss * float("inf")  # inf gradients: GradScaler skips optimizer.step()
        scaler.scale(loss).backward()
        w_before = m.weight.detach().clone()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        applied = ema.update()
        assert applied == (i != 2)
        assert torch.equal(w_before, m.weight) == (i == 2)
    assert ema.step == 3 and ema.t == 3.0 and ema.skipped_steps == 1


def test_no_second_snapshot_at_an_unchanged_time(tmp_path):
    url = str(tmp_path / "s")
    m, opt = _linear()
    ema = PostHocEMA(m, sigma_rels=(0.05, 0.1), update_every=3, snapshot_every=2, store=url, writer="sync")
    _train(m, opt, ema, 7)  # the automatic snapshot is at step 6 (t = 6)
    assert ema.snapshot() is None  # step 7: the EMA is still at t = 6
    _train(m, opt, ema, 5)  # step 12: automatic snapshot at t = 12
    ema.close()
    snaps = open_store(url).snapshots()
    assert [(s.step, s.t) for s in snaps] == [(6, 6.0), (12, 12.0)]
    res = synthesize(url, sigma_rels=[0.07], out=str(tmp_path / "o"), progress=False)
    assert res.targets[0]["error"] < 1.0


# ----------------------------------------------------------------------------- restart from an older checkpoint


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def worker_older_checkpoint(rank, ws, out, url, phase):
    out = Path(out)
    setup = build("replicated", seed=0)
    if phase == "a":
        ema = PostHocEMA(setup.target, sigma_rels=(0.05, 0.10), store=url, snapshot_every=2, writer="process")
        for _ in range(10):
            setup.step()
            ema.update()
            if ema.step == 6:
                ema.flush()  # the checkpoint and the store agree
                torch.save({"ema": ema.state_dict(), "model": setup.model.state_dict()}, out / f"ckpt{rank}.pt")
        ema.close()
        return
    ckpt = torch.load(out / f"ckpt{rank}.pt", weights_only=True)
    setup.model.load_state_dict(ckpt["model"])
    torch.manual_seed(123)
    with torch.no_grad():  # another trajectory from step 6 on
        for p in setup.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ema = PostHocEMA(setup.target, sigma_rels=(0.05, 0.10), store=url, snapshot_every=2, writer="process",
                     resume=True)
    assert ema.step == 10
    ema.load_state_dict(ckpt["ema"])
    assert ema.step == 6
    expected = {}
    for _ in range(4):
        setup.step()
        ema.update()
        if ema.step % 2 == 0:
            expected[ema.step] = ema.full_state_dict(sigma_rel=0.10)
    ema.close()
    if rank == 0:
        torch.save(expected, out / "expected.pt")


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_restart_from_an_older_checkpoint_retires_the_newer_snapshots(tmp_path):
    url = tmp_path / "store"
    run_workers("tests.test_lifecycle:worker_older_checkpoint", 2, tmp_path / "w", kwargs=dict(url=str(url), phase="a"))
    old = {s: _tree_digest(url / "snapshots" / f"step-{s:012d}") for s in (8, 10)}
    run_workers("tests.test_lifecycle:worker_older_checkpoint", 2, tmp_path / "w", kwargs=dict(url=str(url), phase="b"))
    store = open_store(str(url))
    assert [s.step for s in store.snapshots()] == [2, 4, 6, 8, 10]
    exp = torch.load(tmp_path / "w" / "expected.pt", weights_only=True)
    for step, ref in exp.items():  # the new trajectory's EMA, not the abandoned one's
        for name, v in ref.items():
            if name != "scale":
                torch.testing.assert_close(store.read(step, 0.10, name), v, rtol=0, atol=0)
    # the abandoned snapshots are kept apart, byte for byte, and listed as retired
    retired = list((url / "retired").glob("*/step-*"))
    assert sorted(p.name for p in retired) == ["step-000000000008", "step-000000000010"]
    for p in retired:
        digest = _tree_digest(p)
        assert {k: v for k, v in digest.items() if k != "retired.json"} == old[int(p.name[5:])]
    records = [json.loads(p.read_text()) for p in (url / "retired").glob("*/retired.json")]
    assert len(records) == 1 and records[0]["steps"] == [8, 10] and records[0]["restored_step"] == 6
    assert [s.step for s in store.retired()] == [8, 10]
    synthesize(str(url), sigma_rels=[0.07], out=str(tmp_path / "o"), progress=False)


def test_snapshot_at_a_committed_step_is_refused_before_writing(tmp_path):
    url = str(tmp_path / "s")
    m, opt = _linear()
    ema = PostHocEMA(m, sigma_rels=(0.1,), store=url, writer="sync")
    for _ in range(2):
        _train(m, opt, ema, 2)
        ema.snapshot()
    ema.flush()
    digest = _tree_digest(Path(url) / "snapshots")
    ema.step, ema.t, ema._t_updated = 1, 1.0, 1.0  # repeats steps without going through load_state_dict
    _train(m, opt, ema, 1)
    with pytest.raises(StoreError, match="already committed"):
        ema.snapshot()
    assert _tree_digest(Path(url) / "snapshots") == digest
    ema.close()


# ----------------------------------------------------------------------------- readers and retention


def worker_swap_with_retention(rank, ws, out, url, steps):
    setup = build("replicated", seed=0)
    ema = PostHocEMA(setup.target, sigma_rels=(0.05, 0.10), store=url, snapshot_every=1, keep=3, writer="process")
    swaps = 0
    for _ in range(steps):
        setup.step()
        ema.update()
        if ema.step >= 2:
            with ema.swapped(sigma_rel=0.07):
                swaps += 1
    ema.close()
    Path(out, f"swaps{rank}").write_text(str(swaps))


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_swapped_never_reads_a_snapshot_that_retention_deletes(tmp_path):
    url = str(tmp_path / "store")
    run_workers("tests.test_lifecycle:worker_swap_with_retention", 2, tmp_path / "w", kwargs=dict(url=url, steps=40))
    assert [Path(tmp_path / "w" / f"swaps{r}").read_text() for r in range(2)] == ["39", "39"]
    assert len(open_store(url).snapshots()) == 3


def worker_swap_read_error(rank, ws, out, url):
    setup = build("replicated", seed=0)
    ema = PostHocEMA(setup.target, sigma_rels=(0.05, 0.10), store=url, snapshot_every=2, writer="sync")
    for _ in range(6):
        setup.step()
        ema.update()
    ema.flush()
    torch.distributed.barrier()
    if rank == 0:  # damage what only rank 1 reads: its own array of profile 0 in snapshot 4
        import shutil

        shutil.rmtree(next((Path(url) / "snapshots" / "step-000000000004").glob("j*/r00001/c/0")))  # rank 1, p0
    torch.distributed.barrier()
    try:
        with ema.swapped(sigma_rel=0.07):
            pass
    except StoreError as e:
        Path(out, f"err{rank}").write_text(str(e))
    ema.snapshots.writer.close()


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_a_read_error_in_swapped_reaches_every_rank(tmp_path):
    run_workers("tests.test_lifecycle:worker_swap_read_error", 2, tmp_path / "w", kwargs=dict(url=str(tmp_path / "s")))
    errs = [Path(tmp_path / "w" / f"err{r}").read_text() for r in range(2)]
    assert all("rank 1" in e for e in errs), errs


# ----------------------------------------------------------------------------- a dead writer


def worker_dead_writer(rank, ws, out, url, on_error):
    setup = build("replicated", seed=0)
    ema = PostHocEMA(setup.target, sigma_rels=(0.05, 0.10), store=url, snapshot_every=2, writer="process",
                     on_error=on_error)
    result = "ok"
    try:
        for _ in range(12):
            setup.step()
            ema.update()
            if ema.step == 4:
                ema.flush()
                if rank == 1:
                    os.kill(ema.snapshots.writer._proc.pid, signal.SIGKILL)
                    ema.snapshots.writer._proc.wait()
        ema.close()
    except StoreError as e:
        result = f"raised at step {ema.step}: {e}"
        ema.snapshots.writer.close(timeout=5)
    Path(out, f"result{rank}").write_text(result)


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_a_dead_writer_reaches_every_rank(tmp_path, on_error):
    url = str(tmp_path / "s")
    outs = run_workers("tests.test_lifecycle:worker_dead_writer", 2, tmp_path / "w",
                       kwargs=dict(url=url, on_error=on_error))
    results = [Path(tmp_path / "w" / f"result{r}").read_text() for r in range(2)]
    steps = [s.step for s in open_store(url).snapshots()]
    if on_error == "raise":
        assert all(r.startswith("raised at step 6") and "writer process of rank 1 died" in r for r in results)
        assert steps == [2, 4]
    else:
        assert results == ["ok", "ok"]
        assert "writer process of rank 1 died" in outs[0] and "new writer" in outs[0]
        assert 12 in steps and 10 in steps  # the new writer kept writing


# ----------------------------------------------------------------------------- leaks


def _shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()} if Path("/dev/shm").exists() else set()


def test_a_refused_resume_leaves_no_writer_and_no_shared_memory(tmp_path):
    psutil = pytest.importorskip("psutil")
    url = str(tmp_path / "s")
    m, opt = _linear()
    with PostHocEMA(m, sigma_rels=(0.1,), store=url, writer="sync") as ema:
        _train(m, opt, ema, 1)
        ema.snapshot()
    shm0, kids0 = _shm_segments(), {p.pid for p in psutil.Process().children()}
    for kwargs in (dict(sigma_rels=(0.2,)), dict(sigma_rels=(0.1,), batch_size=4)):
        with pytest.raises(StoreError):
            PostHocEMA(m, store=url, resume=True, writer="process", **kwargs)
    assert _shm_segments() == shm0
    assert {p.pid for p in psutil.Process().children() if p.is_running() and p.status() != "zombie"} <= kids0


_FORGET_CLOSE = r"""
import sys, torch
from dist_ema.tracker import PostHocEMA
torch.manual_seed(0)
m = torch.nn.Linear(3, 2); opt = torch.optim.SGD(m.parameters(), lr=0.1)
ema = PostHocEMA(m, sigma_rels=(0.1,), store=sys.argv[1], writer="process")
for _ in range(3):
    m(torch.randn(4, 3)).sum().backward(); opt.step(); opt.zero_grad(); ema.update()
ema.snapshot()
print("done", flush=True)
"""


@pytest.mark.dist
def test_forgetting_close_keeps_the_last_snapshot_and_says_so(tmp_path):
    url = str(tmp_path / "s")
    r = subprocess.run([sys.executable, "-c", _FORGET_CLOSE, url], capture_output=True, text=True, timeout=120,
                       cwd=str(ROOT))
    assert r.returncode == 0 and "done" in r.stdout, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert "step-000000000003" in r.stderr and "close()" in r.stderr, r.stderr
    assert [s.step for s in open_store(url).snapshots()] == [3]  # committed at exit: one process, safe


def test_writer_behind_is_logged_once_then_counted(tmp_path, caplog, monkeypatch):
    import time as _time

    from dist_ema.store import writer as wmod

    orig = wmod._execute

    def slow(*a, **k):
        _time.sleep(0.15)
        return orig(*a, **k)

    monkeypatch.setattr(wmod, "_execute", slow)
    m, opt = _linear()
    with caplog.at_level(logging.INFO, logger="dist_ema"):
        with PostHocEMA(m, sigma_rels=(0.1,), store=str(tmp_path / "s"), snapshot_every=1, writer="thread") as ema:
            _train(m, opt, ema, 8)
    behind = [r for r in caplog.records if "behind" in r.getMessage()]
    assert sum(r.levelno >= logging.WARNING for r in behind) == 1, [r.getMessage() for r in behind]
    assert any("waited for the snapshot writer" in r.getMessage() and "times" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
