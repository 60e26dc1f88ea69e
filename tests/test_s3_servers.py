"""The S3 store against two real S3 servers: moto (accepts any key) and SeaweedFS (checks signatures).

Each test runs on both servers (``s3_backend``) unless it needs what only SeaweedFS does: a
wrong secret is refused there, moto accepts it. Checked: snapshots read back bit for bit
against what the tracker held, ``dist-ema ls --verify``, the create-only commit marker and
ownership record, and a clear error at start-up on every rank for refused credentials.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_ema import PostHocEMA, open_store
from dist_ema.store.fs import StoreError, StoreIO
from dist_ema.store.io import OWNER, commit_key, commit_snapshot
from tests.conftest import S3_SECRET
from tests.dist_harness import ROOT, run_workers
from tests.test_store import check_store

SIGMAS = (0.05, 0.10)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 3))


def _train(ema: PostHocEMA, m: torch.nn.Module, steps: int, every: int, expected: dict, seed: int = 0) -> None:
    for i in range(steps):
        g = torch.Generator().manual_seed(seed * 1000 + ema.step + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        ema.update()
        if ema.updates % every == 0:
            expected[ema.step] = {s: ema.full_state_dict(sigma_rel=s) for s in SIGMAS}


def _read_back(url: str, expected: dict) -> list[int]:
    store = open_store(url)
    snaps = store.snapshots()
    for s in snaps:
        assert store.verify(s) == [], s.id
        for sr in SIGMAS:
            for name, ref in expected[s.step][sr].items():
                torch.testing.assert_close(store.read(s.step, sr, name), ref, rtol=0, atol=0,
                                           msg=f"{s.id} {name} sigma_rel={sr}")
    return [s.step for s in snaps]


def _ls_verify(url: str, env: dict) -> str:
    r = subprocess.run([sys.executable, "-m", "dist_ema.cli", "ls", "--verify", url], capture_output=True,
                       text=True, env={**os.environ, **env}, cwd=str(ROOT), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_training_run_reads_back_and_verifies(s3_backend):
    """One process, the default writer process: every snapshot reads back as the tracker held it."""
    server, env, bucket = s3_backend
    url = f"s3://{bucket}/runs/a"
    m, expected = _model(), {}
    # 64-byte inner chunks: every read is a ranged GET of a few inner chunks (SeaweedFS serves ranges itself)
    with PostHocEMA(m, sigma_rels=SIGMAS, store=url, snapshot_every=2, max_object_bytes=64) as ema:
        _train(ema, m, 6, 2, expected)
    assert _read_back(url, expected) == [2, 4, 6]
    out = _ls_verify(url, env)
    assert "3 committed snapshot(s)" in out and out.count(" ok") == 3, out
    # the ownership record is released at close: the store is free for the next job
    assert not StoreIO(url).exists(OWNER)


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_two_ranks_on_seaweedfs(tmp_path, seaweedfs_env):
    """FSDP2 on 2 ranks writing to SeaweedFS: what every rank's tracker held reads back exactly."""
    env, bucket = seaweedfs_env
    url = f"s3://{bucket}/runs/fsdp2"
    run_workers("tests.test_store:worker_train", 2, tmp_path / "w", kwargs=dict(engine="fsdp2", url=url, steps=4),
                env=env, timeout=150)
    _, snaps = check_store(url, tmp_path / "w", world_size=2)
    assert [s.step for s in snaps] == [2, 4]
    assert "2 committed snapshot(s)" in _ls_verify(url, env)


def test_create_only_put_holds(s3_backend):
    """A second create-only PUT of one key fails with FileExistsError and the first object stays."""
    server, env, bucket = s3_backend
    io = StoreIO(f"s3://{bucket}/x")
    io.put("snapshots/step-000000000001/commit.json", b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        io.put("snapshots/step-000000000001/commit.json", b"second", exclusive=True)
    assert io.get("snapshots/step-000000000001/commit.json") == b"first"
    # a plain PUT does replace it: the refusal above is the condition's doing, not the server's
    io.put("snapshots/step-000000000001/commit.json", b"third")
    assert io.get("snapshots/step-000000000001/commit.json") == b"third"


@pytest.mark.timeout(120)
def test_second_job_refused_and_committed_marker_holds(s3_backend):
    """A second job on the same store is refused at start-up (naming the store and the owner); a
    commit of an already committed step by another attempt fails and leaves the marker as it was."""
    server, env, bucket = s3_backend
    url = f"s3://{bucket}/runs/own"
    m, expected = _model(), {}
    ema = PostHocEMA(m, sigma_rels=SIGMAS, store=url, snapshot_every=2, writer="sync")
    _train(ema, m, 2, 2, expected)
    ema.flush()
    io = StoreIO(url)
    owner = io.get(OWNER)
    job = ema.snapshots.job
    assert json.loads(owner)["job"] == job

    with pytest.raises(StoreError) as info:
        PostHocEMA(_model(), sigma_rels=SIGMAS, store=url, snapshot_every=2, writer="sync")
    msg = str(info.value)
    assert url in msg and "owned by another job" in msg and job in msg, msg
    assert io.get(OWNER) == owner  # the record is the first job's, byte for byte

    marker = io.get(commit_key("step-000000000002"))
    other = dict(json.loads(marker), attempt="j20000101T000000Z-deadbeef")
    with pytest.raises(StoreError, match="already committed"):
        commit_snapshot(io, "step-000000000002", other)
    assert io.get(commit_key("step-000000000002")) == marker

    # the owner keeps committing; its snapshots read back as its own
    _train(ema, m, 2, 2, expected)
    ema.close()
    assert _read_back(url, expected) == [2, 4]


def worker_bad_credentials(rank, ws, out, url):
    from tests.engines import build

    setup = build("replicated", seed=0)
    t0 = time.monotonic()
    try:
        PostHocEMA(setup.target, store=url, snapshot_every=2)
    except StoreError as e:
        Path(out, f"err{rank}.json").write_text(json.dumps({"msg": str(e), "seconds": time.monotonic() - t0}))
        return
    raise AssertionError("PostHocEMA should have refused the store at start-up")


WRONG_SECRET = "wrong-secret-7Qp2-must-not-be-logged"


@pytest.mark.dist
@pytest.mark.timeout(150)
def test_wrong_secret_fails_at_startup_on_every_rank(tmp_path, seaweedfs_env):
    """SeaweedFS checks signatures: a wrong secret is a clear StoreError on every rank, at once, not retried."""
    env, bucket = seaweedfs_env
    url = f"s3://{bucket}/runs/denied"
    bad = dict(env, AWS_SECRET_ACCESS_KEY=WRONG_SECRET)
    run_workers("tests.test_s3_servers:worker_bad_credentials", 2, tmp_path, kwargs=dict(url=url), env=bad,
                timeout=120)
    for r in range(2):
        res = json.loads((tmp_path / f"err{r}.json").read_text())
        msg = res["msg"]
        assert f"opening store {url}" in msg and "access denied" in msg and "SignatureDoesNotMatch" in msg, msg
        assert "rank 0" in msg
        assert WRONG_SECRET not in msg and S3_SECRET not in msg
        assert res["seconds"] < 30, res  # the bound; the harness allows 120 s in all
    # nothing was written with the refused credentials
    assert StoreIO(f"s3://{bucket}").list_dir("runs") == []


@pytest.mark.dist
def test_unknown_access_key_is_access_denied(seaweedfs_env, monkeypatch):
    """An access key the server does not know: the same clear error (in one process)."""
    env, bucket = seaweedfs_env
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    url = f"s3://{bucket}/runs/unknown"
    with pytest.raises(StoreError) as info:
        PostHocEMA(_model(), store=url, writer="sync")
    msg = str(info.value)
    assert url in msg and "access denied" in msg, msg


def test_moto_accepts_a_wrong_secret(s3_env, monkeypatch):
    """What moto does not check (why SeaweedFS is here): a wrong secret is accepted."""
    env, bucket = s3_env
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    io = StoreIO(f"s3://{bucket}/x")
    io.put("a", b"1")
    assert io.get("a") == b"1"
