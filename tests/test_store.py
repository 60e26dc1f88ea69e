"""Snapshot store end to end: real engines on gloo, local disk and S3 (moto server)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from dist_ema.store import StoreError, open_store
from dist_ema.store.fs import StoreIO
from dist_ema.store.io import list_snapshot_dirs
from dist_ema.tracker import PostHocEMA
from tests.dist_harness import run_workers
from tests.engines import build

SIGMAS = (0.05, 0.10)
OBJ = 64  # bytes per object: tiny, so every shard spans several objects


def _save(out, name, obj):
    torch.save(obj, os.path.join(out, name))


def worker_train(rank, ws, out, engine, url, steps, snapshot_every=2, resume=False, dtype="float32", keep=None,
                 kill_at=None, writer="process"):
    setup = build(engine, seed=0)
    for _ in range(int(os.environ.get("PRETRAIN_STEPS", "0"))):
        setup.step()
    ema = PostHocEMA(setup.target, sigma_rels=SIGMAS, store=url, snapshot_every=snapshot_every,
                     max_object_bytes=OBJ, resume=resume, storage_dtype=dtype, keep=keep, writer=writer)
    start = ema.step
    if resume and rank == 0:
        _save(out, "resumed.pt", {"step": ema.step, "t": ema.t, "ema": ema.full_state_dict(sigma_rel=0.10)})
    elif resume:
        ema.full_state_dict(sigma_rel=0.10)
    if kill_at is not None and rank == 1:
        from dist_ema.snapshot import SnapshotManager

        orig = SnapshotManager.exchange

        def exchange(self, block=False):
            if self.ema.step == kill_at:  # the previous snapshot is written on every rank, not committed
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(self, block)

        SnapshotManager.exchange = exchange
    expected = {}
    for _ in range(steps):
        setup.step()
        ema.update()
        if ema.updates % snapshot_every == 0:
            expected[ema.step] = {s: ema.full_state_dict(sigma_rel=s) for s in SIGMAS}
    ema.close()
    if rank == 0:
        _save(out, "expected.pt", {"expected": expected, "start": start})


def check_store(url, out, storage_options=None, dtype="float32", world_size=None):
    store = open_store(url, storage_options)
    snaps = store.snapshots()
    exp = torch.load(os.path.join(out, "expected.pt"), weights_only=True)["expected"]
    steps = [s.step for s in snaps]
    assert set(exp) <= set(steps), (sorted(exp), steps)
    tol = dict(rtol=0, atol=0) if dtype == "float32" else dict(rtol=1e-2, atol=1e-2)
    for s in snaps:
        if s.step not in exp:
            continue
        assert s.dtype == dtype and s.unit == "steps" and s.t == s.step
        assert s.sigma_rels == pytest.approx(SIGMAS)
        if world_size is not None:
            assert s.world_size == world_size
        for sr in SIGMAS:
            for name, ref in exp[s.step][sr].items():
                if name == "scale":  # a buffer, stored separately
                    continue
                got = store.read(s.step, sr, name)
                torch.testing.assert_close(got, ref, **tol, msg=f"{s.id} {name} sigma_rel={sr}")
        bufs = store.read_buffers(s)
        assert torch.equal(torch.from_numpy(bufs["scale"]), exp[s.step][0.05]["scale"])
        assert store.verify(s) == []
    return store, snaps


def count_objects(io: StoreIO, snap: str) -> int:
    return len([p for p in io.fs.find(io.path(f"snapshots/{snap}")) if not p.endswith("/")])


def expected_objects(store, snap) -> int:
    """What format 2 promises: per rank with data one shard per profile and its array's zarr.json; rank 0
    adds the marker, the attempt's group doc and, with buffers, one packed array (a zarr.json and one chunk)."""
    lay = store.layout(snap)
    n = 2 + (2 if snap.meta["buffers"] else 0)
    for r in range(lay.world_size):
        if lay.rank_numel(r):
            n += len(SIGMAS) + 1
    assert n <= lay.world_size * (len(SIGMAS) + 1) + 4
    return n


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "engine,ws",
    [("fsdp2", 2), ("fsdp2", 3), ("fsdp1", 2), ("fsdp1_flat", 3), ("ddp", 3), ("replicated", 2)],
)
def test_local_store_matches_gathered_ema(engine, ws, tmp_path):
    url = str(tmp_path / "store")
    run_workers("tests.test_store:worker_train", ws, tmp_path / "w", kwargs=dict(engine=engine, url=url, steps=6))
    store, snaps = check_store(url, tmp_path / "w", world_size=ws)
    assert [s.step for s in snaps] == [2, 4, 6]
    assert store.torn() == []
    for s in snaps:
        assert count_objects(store.io, s.id) == expected_objects(store, s)
    # objects grow with ranks x profiles, not with parameters: one array (and its chunks) per rank and profile
    arrays = [p for p in store.io.fs.find(store.io.path(f"snapshots/{snaps[0].id}")) if p.endswith("/zarr.json")
              and "/p" in p.rsplit("/", 2)[-2][:2]]
    assert len(arrays) <= ws * len(SIGMAS)


@pytest.mark.dist
@pytest.mark.timeout(400)
@pytest.mark.parametrize("engine,ws", [("zero1", 2), ("zero2", 3), ("zero3", 3)])
def test_local_store_deepspeed(engine, ws, tmp_path):
    pytest.importorskip("deepspeed")
    url = str(tmp_path / "store")
    run_workers("tests.test_store:worker_train", ws, tmp_path / "w", kwargs=dict(engine=engine, url=url, steps=4))
    check_store(url, tmp_path / "w", world_size=ws)


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine,ws", [("fsdp2", 2), ("zero3", 2)])
def test_s3_store(engine, ws, tmp_path, s3_env):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    env, bucket = s3_env
    url = f"s3://{bucket}/runs/a"
    run_workers("tests.test_store:worker_train", ws, tmp_path / "w", kwargs=dict(engine=engine, url=url, steps=4),
                env=env)
    store, snaps = check_store(url, tmp_path / "w", world_size=ws)
    assert [s.step for s in snaps] == [2, 4]
    for s in snaps:
        assert count_objects(store.io, s.id) == expected_objects(store, s)


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_storage(dtype, tmp_path):
    url = str(tmp_path / "store")
    run_workers("tests.test_store:worker_train", 2, tmp_path / "w",
                kwargs=dict(engine="fsdp2", url=url, steps=4, dtype=dtype))
    check_store(url, tmp_path / "w", dtype=dtype)


@pytest.mark.dist
@pytest.mark.timeout(400)
def test_resume_same_and_other_world_size(tmp_path):
    url = str(tmp_path / "store")
    run_workers("tests.test_store:worker_train", 2, tmp_path / "a", kwargs=dict(engine="fsdp2", url=url, steps=6))
    first = torch.load(tmp_path / "a" / "expected.pt", weights_only=True)["expected"]
    for ws, sub in ((2, "b"), (3, "c")):
        run_workers("tests.test_store:worker_train", ws, tmp_path / sub,
                    kwargs=dict(engine="fsdp2", url=url, steps=2, resume=True),
                    env={"PRETRAIN_STEPS": "0"})
        res = torch.load(tmp_path / sub / "resumed.pt", weights_only=True)
        newest = max(open_store(url).snapshots(), key=lambda s: s.step) if sub == "b" else None
        if sub == "b":
            assert res["step"] == 6 and res["t"] == 6.0
            for k, v in first[6][0.10].items():
                if k != "scale":
                    assert torch.equal(res["ema"][k], v), k  # bit-exact in float32
        else:
            assert res["step"] == 8 and newest is None
    snaps = open_store(url).snapshots()
    assert [s.step for s in snaps] == [2, 4, 6, 8, 10]
    assert [s.world_size for s in snaps] == [2, 2, 2, 2, 3]
    # the last snapshot, written at world size 3 after resuming, matches what rank 0 gathered
    check_store(url, tmp_path / "c")


@pytest.mark.dist
@pytest.mark.timeout(400)
def test_torn_snapshot_is_invisible_and_cleaned_up(tmp_path):
    url = str(tmp_path / "store")
    run_workers("tests.test_store:worker_train", 2, tmp_path / "a",
                kwargs=dict(engine="fsdp2", url=url, steps=8, kill_at=7, writer="sync"),
                expect_failure=True, timeout=120)
    assert not (tmp_path / "a" / "expected.pt").exists()  # rank 0 failed once rank 1 died
    store = open_store(url)
    steps = [s.step for s in store.snapshots()]
    assert steps == [2, 4]
    assert "step-000000000006" in store.torn()  # data of every rank is there, the marker is not
    assert store.verify(store.snapshots()[-1]) == []
    # a restarted run resumes from the newest committed snapshot and removes the torn one
    run_workers("tests.test_store:worker_train", 2, tmp_path / "b",
                kwargs=dict(engine="fsdp2", url=url, steps=2, resume=True))
    res = torch.load(tmp_path / "b" / "resumed.pt", weights_only=True)
    assert res["step"] == 4
    store = open_store(url)
    assert store.torn() == []
    assert [s.step for s in store.snapshots()] == [2, 4, 6]


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_retention_thins_evenly(tmp_path):
    url = str(tmp_path / "store")
    run_workers("tests.test_store:worker_train", 2, tmp_path / "w",
                kwargs=dict(engine="replicated", url=url, steps=16, snapshot_every=1, keep=4))
    steps = [s.step for s in open_store(url).snapshots()]
    assert len(steps) == 4 and steps[-1] == 16
    assert steps[0] <= 6  # spread over the run, not the last four
    assert len(list_snapshot_dirs(StoreIO(url))) == 4  # deleted ones are gone, not just hidden


# ----------------------------------------------------------------------------- single process, errors


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_resume_refuses_another_model(tmp_path):
    url = str(tmp_path / "s")
    with PostHocEMA(_tiny(), store=url, writer="sync") as ema:
        ema.update()
        ema.snapshot()
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    with pytest.raises(StoreError, match="different model"):
        PostHocEMA(other, store=url, resume=True, writer="sync")
    with pytest.raises(StoreError, match="tracks sigma_rels"):
        PostHocEMA(_tiny(), sigma_rels=(0.05, 0.2), store=url, resume=True, writer="sync")
    with pytest.raises(StoreError, match="counts time in steps"):
        PostHocEMA(_tiny(), store=url, resume=True, batch_size=8, writer="sync")


def test_store_errors(tmp_path):
    with pytest.raises(StoreError, match="no dist-ema store"):
        open_store(str(tmp_path / "nothing"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(StoreError, match="not a dist-ema store"):
        open_store(str(tmp_path / "junk"))
    url = str(tmp_path / "s")
    ema = PostHocEMA(_tiny(), store=url, writer="sync")
    with pytest.raises(ValueError, match="before the first update"):
        ema.snapshot()
    ema.close()
    with pytest.raises(StoreError, match="no committed snapshot"):
        open_store(url).snapshot()
    with pytest.raises(ValueError, match="need store=URL"):
        PostHocEMA(_tiny(), snapshot_every=10)
    with pytest.raises(ValueError, match="snapshot\\(\\) needs a store"):
        PostHocEMA(_tiny()).snapshot()
    for bad, needle in [(dict(storage_dtype="int8"), "storage dtype"), (dict(compression="lzma"), "compression"),
                        (dict(keep=1), "keep must be"), (dict(snapshot_every=0), "snapshot_every"),
                        (dict(writer="fork"), "writer must be")]:
        with pytest.raises(ValueError, match=needle):
            PostHocEMA(_tiny(), store=url, **bad)


def test_read_only_store_fails_at_startup(tmp_path):
    if os.geteuid() == 0:
        # root ignores permissions: use a path below a regular file instead
        (tmp_path / "file").write_text("x")
        url = str(tmp_path / "file" / "store")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        url = str(ro / "store")
    with pytest.raises(StoreError, match="opening store"):
        PostHocEMA(_tiny(), store=url, writer="sync")


def test_corrupt_and_missing_objects_are_reported(tmp_path):
    url = str(tmp_path / "s")
    with PostHocEMA(_tiny(), store=url, writer="sync", max_object_bytes=16) as ema:
        ema.update()
        ema.snapshot()
    store = open_store(url)
    snap = store.snapshots()[0]
    chunk = next((tmp_path / "s" / "snapshots" / snap.id).glob("j*/r00000/c/0/0"))  # the shard of rank 0, p0
    raw = bytearray(chunk.read_bytes())
    raw[1] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="corrupt"):
        store.read(None, 0.05, "0.weight")
    assert any("p0" in p for p in store.verify(snap))
    chunk.unlink()
    with pytest.raises(StoreError, match="missing"):
        store.read(None, 0.05, "0.weight")
    assert any("missing" in p for p in store.verify(snap))
    marker = tmp_path / "s" / "snapshots" / snap.id / "commit.json"
    marker.write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        store.snapshots()
    doc = json.loads((tmp_path / "s" / "dist_ema.json").read_text())
    doc["version"] = 99
    (tmp_path / "s" / "dist_ema.json").write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="newer dist-ema"):
        open_store(url)


def test_writer_modes_agree(tmp_path):
    vals = {}
    for mode in ("sync", "thread", "process"):
        url = str(tmp_path / mode)
        m = _tiny()
        with PostHocEMA(m, store=url, snapshot_every=1, writer=mode) as ema:
            for _ in range(3):
                with torch.no_grad():
                    for p in m.parameters():
                        p.mul_(1.1)
                ema.update()
        vals[mode] = open_store(url).read(3, 0.1, "1.weight")
        assert [s.step for s in open_store(url).snapshots()] == [1, 2, 3]
    assert torch.equal(vals["sync"], vals["thread"]) and torch.equal(vals["sync"], vals["process"])
