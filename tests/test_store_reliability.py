"""Store-side reliability: repeated rollbacks, takeover of a live store, synthesis output ownership, verify.

Every check reads the bytes it compares plainly (a local file read or an s3fs object read), never
through the code under test.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from dist_ema.cli import main
from dist_ema.store import StoreError, open_store
from dist_ema.synthesis import MARKER, synthesize
from dist_ema.tracker import PostHocEMA
from tests.dist_harness import ROOT
from tests.test_lifecycle import _linear, _train


def _plain_fs(url: str):
    """A plain fsspec filesystem for ``url`` (S3: the test server's endpoint, no instance cache)."""
    if url.startswith("s3://"):
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=os.environ["FSSPEC_S3_ENDPOINT_URL"], skip_instance_cache=True)
        return fs, url[len("s3://"):]
    return fsspec.filesystem("file"), url


def _plain_tree(url: str, key: str) -> dict[str, bytes]:
    """Every object under ``url/key`` (relative name -> bytes), read with a plain fsspec filesystem."""
    fs, root = _plain_fs(url)
    base = f"{root.rstrip('/')}/{key}"
    return {f[len(base):].lstrip("/"): fs.cat_file(f) for f in sorted(fs.find(base))}


# ----------------------------------------------------------------------------- repeated rollbacks


def _two_rollbacks(url: str) -> list[dict[int, dict[str, bytes]]]:
    """One job: train to step 10 twice from the step-6 checkpoint, rolling back after each.

    Returns, per abandoned trajectory, the plain bytes of its snapshots 8 and 10 before retirement.
    """
    m, opt = _linear()
    ema = PostHocEMA(m, sigma_rels=(0.05, 0.10), store=url, snapshot_every=2, writer="sync")
    _train(m, opt, ema, 6)
    ema.flush()
    ckpt = copy.deepcopy(ema.state_dict())
    abandoned = []
    for _ in range(2):
        _train(m, opt, ema, 4)  # steps 7..10, a new trajectory each time (fresh random batches)
        ema.flush()
        abandoned.append({s: _plain_tree(url, f"snapshots/step-{s:012d}") for s in (8, 10)})
        ema.load_state_dict(ckpt)
        assert ema.step == 6
    ema.close()
    return abandoned


def _check_rollbacks(url: str, abandoned, capsys) -> None:
    store = open_store(url)
    assert [s.step for s in store.snapshots()] == [2, 4, 6]
    assert [s.step for s in store.retired()] == [8, 10, 8, 10]
    folders = sorted(n for n in _plain_tree(url, "retired") if n.endswith("/retired.json"))
    records = [json.loads(_plain_tree(url, "retired")[n]) for n in folders]
    assert len(records) == 2, folders  # one folder per retirement
    records, folders = zip(*sorted(zip(records, folders), key=lambda x: x[0]["time"]))
    for rec, folder, old in zip(records, folders, abandoned):
        assert rec["steps"] == [8, 10] and rec["restored_step"] == 6
        base = folder.rsplit("/", 1)[0]
        for step, tree in old.items():  # byte for byte the objects of the abandoned trajectory
            assert _plain_tree(url, f"retired/{base}/step-{step:012d}") == tree
    assert abandoned[0][8] != abandoned[1][8]  # two different trajectories were kept, not one twice
    assert main(["ls", url]) == 0
    out = capsys.readouterr().out
    assert out.count("retired") >= 2 and all(f.rsplit("/", 1)[0] in out for f in folders), out


def test_two_rollbacks_in_one_job_keep_both_abandoned_trajectories_local(tmp_path, capsys):
    url = str(tmp_path / "store")
    abandoned = _two_rollbacks(url)
    _check_rollbacks(url, abandoned, capsys)
    # a store of the earlier layout (one folder per job, retired/<job>/, no intent record) is still listed
    first = min((Path(url) / "retired").iterdir(), key=lambda p: json.loads((p / "retired.json").read_text())["time"])
    (first / "retiring.json").unlink()
    first.rename(first.with_name(first.name.rsplit("-r", 1)[0]))
    assert [s.step for s in open_store(url).retired()] == [8, 10, 8, 10]
    assert _plain_tree(url, f"retired/{first.name.rsplit('-r', 1)[0]}/step-{8:012d}") == abandoned[0][8]


def test_two_rollbacks_in_one_job_keep_both_abandoned_trajectories_s3(s3_env, capsys):
    _, bucket = s3_env
    url = f"s3://{bucket}/run"
    abandoned = _two_rollbacks(url)
    _check_rollbacks(url, abandoned, capsys)


# ----------------------------------------------------------------------------- a healthy store for the rest


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("small") / "store")
    m, opt = _linear()
    ema = PostHocEMA(m, sigma_rels=(0.05, 0.10), store=url, snapshot_every=2, writer="sync")
    _train(m, opt, ema, 6)
    ema.close()
    return url


# ----------------------------------------------------------------------------- synthesis output ownership


def _local_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad", ["../precious", "/abs/precious", "zarr/../../precious", "./../precious", ""])
def test_overwrite_never_removes_what_a_marker_names_outside_out(small_store, tmp_path, bad):
    out, precious = tmp_path / "out", tmp_path / "precious"
    synthesize(small_store, sigma_rels=[0.07], out=str(out), progress=False)
    precious.mkdir()
    (precious / "weights.bin").write_bytes(b"keep me" * 100)
    doc = json.loads((out / MARKER).read_text())
    doc["owned"] = [*doc["owned"], bad.replace("/abs/precious", str(precious))]
    (out / MARKER).write_text(json.dumps(doc))
    before_out, before_precious = _local_tree(out), _local_tree(precious)
    with pytest.raises(FileExistsError) as e:
        synthesize(small_store, sigma_rels=[0.07], out=str(out), progress=False, overwrite=True)
    assert MARKER in str(e.value) and repr(doc["owned"][-1]) in str(e.value), e.value
    assert _local_tree(precious) == before_precious  # byte for byte
    assert _local_tree(out) == before_out  # nothing removed


def test_overwrite_refuses_a_key_that_escapes_out_through_a_link(small_store, tmp_path):
    out, precious = tmp_path / "out", tmp_path / "precious"
    synthesize(small_store, sigma_rels=[0.07], out=str(out), progress=False)
    precious.mkdir()
    (precious / "weights.bin").write_bytes(b"keep me")
    os.symlink(precious, out / "link")
    doc = json.loads((out / MARKER).read_text())
    doc["owned"] = [*doc["owned"], "link/weights.bin"]
    (out / MARKER).write_text(json.dumps(doc))
    with pytest.raises(FileExistsError, match="link/weights.bin"):
        synthesize(small_store, sigma_rels=[0.07], out=str(out), progress=False, overwrite=True)
    assert (precious / "weights.bin").read_bytes() == b"keep me"


def test_overwrite_refuses_a_marker_key_outside_out_on_s3(small_store, s3_env):
    _, bucket = s3_env
    out = f"s3://{bucket}/out"
    synthesize(small_store, sigma_rels=[0.07], out=out, progress=False)
    fs, _ = _plain_fs(out)
    fs.pipe_file(f"{bucket}/precious/weights.bin", b"keep me")
    doc = json.loads(fs.cat_file(f"{bucket}/out/{MARKER}"))
    doc["owned"] = [*doc["owned"], "../precious"]
    fs.pipe_file(f"{bucket}/out/{MARKER}", json.dumps(doc).encode())
    before = _plain_tree(out, "")
    with pytest.raises(FileExistsError, match=r"\.\./precious"):
        synthesize(small_store, sigma_rels=[0.07], out=out, progress=False, overwrite=True)
    assert _plain_tree(f"s3://{bucket}", "precious") == {"weights.bin": b"keep me"}
    assert _plain_tree(out, "") == before


# ----------------------------------------------------------------------------- verify a truncated shard


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_truncated_shard_is_named_by_verify_resume_and_synthesis(tmp_path, capsys, request, where):
    url = str(tmp_path / "store")
    if where == "s3":
        url = f"s3://{request.getfixturevalue('s3_env')[1]}/run"
    m, opt = _linear()
    ema = PostHocEMA(m, sigma_rels=(0.05, 0.10), store=url, snapshot_every=2, writer="sync")
    _train(m, opt, ema, 4)
    ema.close()
    snap = open_store(url).snapshots()[-1]
    key = f"{snap.prefix}/r00000/c/1/0"
    fs, root = _plain_fs(url)
    whole = fs.cat_file(f"{root}/{key}")
    cut = 7  # shorter than the shard's index: the index cannot even be read
    fs.pipe_file(f"{root}/{key}", whole[:cut])
    want = f"truncated: {cut} bytes, expected {len(whole)}"
    problems = open_store(url).verify(snap)
    assert len(problems) == 1, problems
    assert all(w in problems[0] for w in (snap.id, "rank 0", "profile p1", key, want)), problems
    assert main(["ls", url, "--verify"]) == 1
    err = capsys.readouterr().err
    assert key in err and want in err, err
    with pytest.raises(StoreError) as e:
        PostHocEMA(m, sigma_rels=(0.05, 0.10), store=url, writer="sync", resume=True)
    assert key in str(e.value) and want in str(e.value), e.value
    with pytest.raises(StoreError) as e:
        synthesize(url, sigma_rels=[0.07], out=str(tmp_path / "o"), progress=False)
    assert key in str(e.value) and "truncated" in str(e.value), e.value


# ----------------------------------------------------------------------------- takeover of a store in use


def job_on_store(url: str, out: str, role: str) -> None:
    """A training job in a process of its own (one rank) that leaves the snapshot of step 4 uncommitted.

    ``crash``: dies at once (no close, no exit hooks). ``live``: resumes, says it is ready, waits
    for the test's word, then closes (its commit is refused: it no longer owns the store).
    """
    out = Path(out)
    m, opt = _linear()
    ema = PostHocEMA(m, sigma_rels=(0.05, 0.10), store=url, snapshot_every=2, writer="sync",
                     resume=role == "live")
    _train(m, opt, ema, 4 - ema.step)  # the data of step 4 is written; its commit waits for the next exchange
    (out / f"{role}.job").write_text(ema.snapshots.job)
    if role == "crash":
        os._exit(0)
    deadline = time.monotonic() + 300  # bounded: the test kills this process when it fails
    while not (out / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        ema.close()
    except StoreError as e:
        (out / "closed.txt").write_text(str(e))


def _start_job(url: str, out: Path, role: str) -> subprocess.Popen:
    code = f"from tests.test_store_reliability import job_on_store; job_on_store({url!r}, {str(out)!r}, {role!r})"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code], cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def _wait_for(proc: subprocess.Popen, path: Path) -> None:
    """Until ``path`` exists (the job's word that it is ready); the job's output if it stopped instead."""
    deadline = time.monotonic() + 300
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"job stopped before {path.name}: {proc.communicate()[0].decode()[-3000:]}")
        time.sleep(0.1)


@pytest.mark.dist
def test_takeover_keeps_a_live_owners_attempts_and_cleans_a_dead_jobs(tmp_path, caplog):
    url, out = str(tmp_path / "store"), tmp_path / "jobs"
    out.mkdir()
    step4 = Path(url) / "snapshots" / "step-000000000004"
    crashed = _start_job(url, out, "crash")
    assert crashed.wait(timeout=300) == 0, crashed.communicate()[0].decode()[-3000:]
    dead = (out / "crash.job").read_text()
    assert (step4 / dead).is_dir() and not (step4 / "commit.json").exists()

    live = _start_job(url, out, "live")  # resume=True: the crashed owner's process is gone
    try:
        _wait_for(live, out / "live.job")
        alive = (out / "live.job").read_text()
        assert sorted(p.name for p in step4.iterdir()) == [alive]  # the dead job's attempt is gone
        before = _plain_tree(url, f"snapshots/step-000000000004/{alive}")
        assert before

        m, _ = _linear()
        caplog.set_level("WARNING", logger="dist_ema")
        ema = PostHocEMA(m, sigma_rels=(0.05, 0.10), store=url, writer="sync", resume="takeover")
        assert ema.step == 2  # resumed from the newest committed snapshot
        ema.close()
        assert _plain_tree(url, f"snapshots/step-000000000004/{alive}") == before  # byte for byte
        assert any(alive in r.getMessage() and "keep" in r.getMessage() for r in caplog.records), caplog.text

        (out / "go").write_text("")
        assert live.wait(timeout=300) == 0, live.communicate()[0].decode()[-3000:]
    finally:
        if live.poll() is None:
            live.kill()
    assert "no longer owns" in (out / "closed.txt").read_text()  # fenced: its commit was refused
    assert _plain_tree(url, f"snapshots/step-000000000004/{alive}") == before
    assert not (step4 / "commit.json").exists()

    ema = PostHocEMA(m, sigma_rels=(0.05, 0.10), store=url, writer="sync", resume=True)  # that job has stopped
    ema.close()
    assert not step4.exists()  # its leftovers are removed now
    assert [s.step for s in open_store(url).snapshots()] == [2]


def test_a_stale_owners_leftovers_are_removed_at_takeover(tmp_path, caplog):
    from dist_ema.store.io import STALE_AFTER

    url = str(tmp_path / "store")
    m, opt = _linear()
    old = PostHocEMA(m, sigma_rels=(0.05, 0.10), store=url, snapshot_every=2, writer="sync")
    _train(m, opt, old, 4)  # step 2 committed, the data of step 4 written and not committed
    job = old.snapshots.job
    step4 = Path(url) / "snapshots" / "step-000000000004"
    assert (step4 / job).is_dir()
    long_ago = time.time() - 2 * STALE_AFTER  # the records of a job started, and last seen, 20 minutes ago
    for record, field in ((Path(url) / "jobs" / f"{job}.json", "last_seen"), (Path(url) / "owner.json", "started")):
        record.write_text(json.dumps(dict(json.loads(record.read_text()), **{field: long_ago})))
    caplog.set_level("WARNING", logger="dist_ema")
    new = PostHocEMA(m, sigma_rels=(0.05, 0.10), store=url, writer="sync", resume="takeover")
    try:
        assert not step4.exists(), sorted(p.name for p in step4.iterdir())
        assert "has not been seen for" in caplog.text and "keeping" not in caplog.text
    finally:
        new.close()
        old.snapshots.abandon()
