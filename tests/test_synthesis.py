"""Distributed synthesis against independent computations, at several world sizes, local and S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dist_ema import phema
from dist_ema.store import StoreError, open_store
from dist_ema.synthesis import synthesize
from dist_ema.tracker import PostHocEMA
from tests.dist_harness import ROOT, free_port, run_workers
from tests.engines import TinyNet, build

TRACKED = (0.05, 0.10)
CHECK = 0.15  # tracked directly in a second EMA (no store), to compare with the synthesized one


def worker_train(rank, ws, out, engine, url, steps, snapshot_every=2, obj=64):
    setup = build(engine, seed=1)
    ema = PostHocEMA(setup.target, sigma_rels=TRACKED, store=url, snapshot_every=snapshot_every,
                     max_object_bytes=obj)
    direct = PostHocEMA(setup.target, sigma_rels=(CHECK,))
    traj = []
    for _ in range(steps):
        setup.step()
        ema.update()
        direct.update()
        traj.append(setup.full_params())
    ema.close()
    ref = direct.full_state_dict(sigma_rel=CHECK)
    # in training: the synthesized EMA swapped into the live sharded model, restored exactly after
    before = setup.full_params()
    with ema.swapped(sigma_rel=CHECK):
        inside = setup.full_params()
    after = setup.full_params()
    if rank == 0:
        torch.save({"traj": traj, "direct": ref, "swapped": inside, "swap_error": ema.last_synthesis_error},
                   os.path.join(out, "train.pt"))
        for k in before:
            assert torch.equal(before[k], after[k]), k


def brute_force(store, res_targets, names):
    """sum_i x_i snapshot_i with x from an independent solve, read tensor by tensor."""
    snaps = store.snapshots()
    t = np.array([s.t for s in snaps for _ in s.gammas])
    g = np.array([gm for s in snaps for gm in s.gammas])
    tg = np.array([x["gamma"] for x in res_targets])
    X = phema.solve_coefficients(t, g, np.full(tg.size, snaps[-1].t), tg).coefficients
    out = []
    for j in range(tg.size):
        acc = {}
        row = 0
        for s in snaps:
            for sr in s.sigma_rels:
                for n in names:
                    acc[n] = acc.get(n, 0) + X[row, j] * store.read(s.step, sr, n).double()
                row += 1
        out.append(acc)
    return out, X


def torchrun_synthesize(store_url, out, k, extra=(), env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={k}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "dist_ema", "synthesize", store_url, "--sigma-rel", "0.08", "0.15",
           "--out", out, "--no-progress", *extra]
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=e, cwd=str(ROOT))
    return r


@pytest.mark.dist
@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine,ws", [("fsdp2", 2), ("zero2", 3)])
def test_end_to_end_local(engine, ws, tmp_path):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    url = str(tmp_path / "store")
    run_workers("tests.test_synthesis:worker_train", ws, tmp_path / "w", kwargs=dict(engine=engine, url=url,
                                                                                    steps=12))
    store = open_store(url)
    names = [n for n in store.params()]
    res = synthesize(url, sigma_rels=[0.08, CHECK], out=str(tmp_path / "out"), unit_bytes=48, progress=False)
    assert len(res.snapshots) == 6 and res.bytes_read > 0
    # 1) synthesized == sum_i x_i snapshot_i, computed independently from the stored snapshots
    ref, _ = brute_force(store, res.targets, names)
    for j in range(len(res.targets)):
        got = load_file(res.files[j])
        for n in names:
            torch.testing.assert_close(got[n].double(), ref[j][n], rtol=1e-5, atol=1e-6, msg=n)
    # 2) close to the profile tracked directly; the difference is bounded by the profile error
    tr = torch.load(tmp_path / "w" / "train.pt", weights_only=True)
    got = load_file(res.files[1])
    err = res.targets[1]["error"]
    assert 0 < err < 0.2
    num = sum(float((got[n].double() - tr["direct"][n].double()).norm() ** 2) for n in names) ** 0.5
    spread = sum(float((tr["direct"][n].double() - tr["traj"][0][n]).norm() ** 2) for n in names) ** 0.5
    assert num <= 2 * err * spread + 1e-5, (num, err, spread)
    # 3) the safetensors file loads into an ordinary, unsharded model
    model = TinyNet()
    model.load_state_dict({k: v.float() for k, v in got.items()}, strict=True)
    meta = json.loads(open(res.files[1], "rb").read(8 + int.from_bytes(open(res.files[1], "rb").read(8), "little"))[
        8:])["__metadata__"]
    assert json.loads(meta["dist_ema"])["sigma_rel"] == pytest.approx(CHECK)
    # 4) swapped() in training gives the same EMA (snapshots + live state) on every rank's shards
    for n in names:
        torch.testing.assert_close(tr["swapped"][n], got[n].double(), rtol=1e-5, atol=1e-6, msg=n)
    assert tr["swap_error"] == pytest.approx(err, rel=1e-6)
    # 5) the zarr output reads like a snapshot store
    zs = open_store(str(tmp_path / "out" / "zarr"))
    (s,) = zs.snapshots()
    assert s.sigma_rels == pytest.approx((0.08, CHECK)) and s.meta["snapshots"] == res.snapshots
    assert torch.equal(zs.read(None, CHECK, names[0]), got[names[0]])


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_world_size_independent_bitwise(tmp_path):
    url = str(tmp_path / "store")
    run_workers("tests.test_synthesis:worker_train", 3, tmp_path / "w",
                kwargs=dict(engine="fsdp2", url=url, steps=8, obj=40))
    outs = {k: tmp_path / f"out{k}" for k in (1, 2, 3)}
    # 2 ranks: the command under torchrun; 1 and 3 ranks: the library call on the harness's ranks
    r = torchrun_synthesize(url, str(outs[2]), 2, extra=["--format", "zarr"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rel. error" in r.stdout
    for k in (1, 3):
        run_workers("tests.test_synthesis:worker_synthesize", k, tmp_path / f"s{k}",
                    kwargs=dict(url=url, out_url=str(outs[k]), format="zarr"))
    stores = {k: open_store(str(v)) for k, v in outs.items()}
    snap = {k: s.snapshots()[0] for k, s in stores.items()}
    for n in stores[1].params():
        for sr in (0.08, CHECK):
            a = stores[1].read(None, sr, n)
            for k in (2, 3):
                assert torch.equal(a, stores[k].read(None, sr, n)), (k, n)
    assert snap[1].meta["coefficients"] == snap[3].meta["coefficients"]


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_s3_end_to_end(tmp_path, s3_env):
    env, bucket = s3_env
    url = f"s3://{bucket}/run/snapshots"
    run_workers("tests.test_synthesis:worker_train", 2, tmp_path / "w",
                kwargs=dict(engine="fsdp2", url=url, steps=6), env=env)
    out = f"s3://{bucket}/run/synth"
    # the library call on 2 ranks (the command from S3 to S3 under torchrun: tests/test_launch.py's demo flow)
    run_workers("tests.test_synthesis:worker_synthesize", 2, tmp_path / "s", kwargs=dict(url=url, out_url=out),
                env=env)
    store = open_store(url)
    names = list(store.params())
    zs = open_store(out + "/zarr")
    (s,) = zs.snapshots()
    ref, _ = brute_force(store, [{"gamma": g} for g in s.gammas], names)
    for j, sr in enumerate(s.sigma_rels):
        for n in names:
            torch.testing.assert_close(zs.read(None, sr, n).double(), ref[j][n], rtol=1e-5, atol=1e-6)
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["FSSPEC_S3_ENDPOINT_URL"]})
    blob = fs.cat(f"{bucket}/run/synth/sigma_rel-0.1500/model.safetensors")
    from safetensors.torch import load

    sd = load(blob)
    TinyNet().load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    return _train_store(str(d / "s"), steps=9, snapshot_every=3)


def _train_store(url, steps, snapshot_every):
    """A store written like a training job's: TinyNet, SGD, a snapshot every ``snapshot_every`` updates."""
    torch.manual_seed(0)
    m = TinyNet()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with PostHocEMA(m, store=url, snapshot_every=snapshot_every, writer="sync", max_object_bytes=64) as ema:
        for _ in range(steps):
            m(torch.arange(7)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            ema.update()
    return url


@pytest.mark.parametrize(
    "kwargs,exc,needle",
    [
        (dict(sigma_rels=[0.3]), ValueError, r"sigma_rels must be in \(0, 0.2887\)"),
        (dict(sigma_rels=[0.1], t=1.0), ValueError, "before the first snapshot"),
        (dict(sigma_rels=[0.1], t=100.0), ValueError, "after the last snapshot"),
        (dict(sigma_rels=[0.1], step=5), ValueError, "no committed snapshot at step 5"),
        (dict(sigma_rels=[0.1, 0.1]), ValueError, "duplicate targets"),
        (dict(sigma_rels=[0.1], format="npz"), ValueError, "format must be"),
        (dict(sigma_rels=[0.1], dtype="int8"), ValueError, "dtype must be"),
    ],
)
def test_bad_input(small_store, tmp_path, kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        synthesize(small_store, out=str(tmp_path / "o"), progress=False, **kwargs)
    assert not (tmp_path / "o").exists()


def test_step_and_t_choose_the_target_time(small_store, tmp_path):
    a = synthesize(small_store, sigma_rels=[0.1], step=6, out=str(tmp_path / "a"), progress=False)
    b = synthesize(small_store, sigma_rels=[0.1], t=6.0, out=str(tmp_path / "b"), progress=False)
    assert a.targets[0]["t"] == 6.0 and len(a.snapshots) == 2
    assert torch.equal(load_file(a.files[0])["fc1.weight"], load_file(b.files[0])["fc1.weight"])
    # a tracked profile at a snapshot's time is that snapshot exactly
    assert torch.equal(load_file(a.files[0])["fc1.weight"], open_store(small_store).read(6, 0.1, "fc1.weight"))


def test_existing_output_is_never_overwritten(small_store, tmp_path):
    out = str(tmp_path / "o")
    synthesize(small_store, sigma_rels=[0.1], out=out, progress=False)
    before = (tmp_path / "o" / "sigma_rel-0.1000" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        synthesize(small_store, sigma_rels=[0.12], out=out, progress=False)
    assert (tmp_path / "o" / "sigma_rel-0.1000" / "model.safetensors").read_bytes() == before
    res = synthesize(small_store, sigma_rels=[0.12], out=out, progress=False, overwrite=True)
    assert [os.path.basename(os.path.dirname(f)) for f in res.files] == ["sigma_rel-0.1200"]


def test_empty_store_and_missing_objects(small_store, tmp_path):
    empty = str(tmp_path / "empty")
    PostHocEMA(TinyNet(), store=empty, writer="sync").close()
    with pytest.raises(StoreError, match="no committed snapshot"):
        synthesize(empty, sigma_rels=[0.1], out=str(tmp_path / "o1"), progress=False)
    # damage a copy: a missing object fails the job and leaves no partial output
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(small_store, broken)
    shard = next((broken / "snapshots" / "step-000000000006").glob("j*/r00000/c/1/0"))  # rank 0, profile 1
    shard.unlink()
    with pytest.raises(StoreError, match="missing"):
        synthesize(str(broken), sigma_rels=[0.12], out=str(tmp_path / "o2"), progress=False)
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").rglob("*.safetensors"))
    assert not (tmp_path / "o2" / "zarr" / "dist_ema.json").exists()


def test_mixed_models_in_one_store(small_store, tmp_path):
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(small_store, mixed)
    other_url = str(tmp_path / "other")
    m = torch.nn.Linear(3, 3)
    with PostHocEMA(m, store=other_url, writer="sync") as ema:
        for _ in range(10):
            ema.update()
        ema.snapshot()
    src = tmp_path / "other"
    shutil.copytree(src / "snapshots" / "step-000000000010", mixed / "snapshots" / "step-000000000010")
    shutil.copytree(src / "layouts", mixed / "layouts", dirs_exist_ok=True)
    with pytest.raises(StoreError, match="different models"):
        synthesize(str(mixed), sigma_rels=[0.1], out=str(tmp_path / "o"), progress=False)


@pytest.mark.dist
def test_cli_ls_inspect_synthesize(small_store, tmp_path):
    def run(*argv):
        return subprocess.run([sys.executable, "-m", "dist_ema", *argv], capture_output=True, text=True, timeout=120,
                              cwd=str(ROOT))

    r = run("ls", small_store, "--verify")
    assert r.returncode == 0, r.stderr
    assert "step-000000000009" in r.stdout and "3 committed snapshot(s)" in r.stdout and " ok" in r.stdout
    r = run("inspect", small_store, "--step", "6")
    assert r.returncode == 0 and "fc1.weight" in r.stdout and "sigma_rel 0.1000" in r.stdout
    r = run("inspect", small_store, "--json")
    assert json.loads(r.stdout)["meta"]["step"] == 9
    r = run("synthesize", small_store, "--sigma-rel", "0.13", "--out", str(tmp_path / "o"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "sigma_rel-0.1300" / "model.safetensors").exists()
    r = run("synthesize", small_store, "--sigma-rel", "0.5", "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "sigma_rels must be in" in r.stderr
    r = run("ls", str(tmp_path / "nope"))
    assert r.returncode == 2 and "no dist-ema store" in r.stderr


def test_uncommitted_leftover_output_is_replaced(small_store, tmp_path, monkeypatch):
    """A job that died before committing (here: its cleanup never ran) leaves a marked leftover: replaced.

    The same folder without the marker is not a synthesis' to replace (tests/test_synthesis_output.py)."""
    import dist_ema.synthesis as syn

    out = tmp_path / "o"
    with monkeypatch.context() as mp:
        mp.setattr(syn, "_cleanup", lambda *a, **k: None)  # as after a SIGKILL
        def export_fails(*a, **k):
            raise OSError("disk full")

        mp.setattr(syn, "safetensors_parts", export_fails)
        with pytest.raises(StoreError, match="disk full"):
            synthesize(small_store, sigma_rels=[0.1], out=str(out), progress=False)
    assert json.loads((out / syn.MARKER).read_text())["state"] == "writing"
    assert [s.step for s in open_store(str(out / "zarr")).snapshots()] == [9]  # committed store, no files
    res = synthesize(small_store, sigma_rels=[0.1], out=str(out), progress=False)
    assert [s.step for s in open_store(str(out / "zarr")).snapshots()] == [9]
    assert os.path.exists(res.files[0])
    assert json.loads((out / syn.MARKER).read_text())["state"] == "complete"


# ----------------------------------------------------------------------------- snapshots removed while reading


@pytest.fixture
def long_store(tmp_path):
    """8 committed snapshots (steps 2, 4, ..., 16), written like a training job's."""
    return _train_store(str(tmp_path / "long"), steps=16, snapshot_every=2)


def _remove_before_reading(monkeypatch, url, doomed: set[str], data_only: bool = False) -> list[str]:
    """Hook: the first read of a doomed snapshot first removes it the way retention does (marker, then data)."""
    from dist_ema.store.fs import StoreIO
    from dist_ema.store.io import remove_snapshot
    from dist_ema.store.reader import SnapshotStore

    removed: list[str] = []

    def first_read(snap) -> None:
        if snap.id in doomed:
            doomed.discard(snap.id)
            io = StoreIO(url)
            if data_only:  # damage: the objects go, the marker stays
                io.remove(f"{snap.prefix}/r00000")
            else:
                remove_snapshot(io, snap.id)
            removed.append(snap.id)

    real_reads, real_raw = SnapshotStore.read_reads, SnapshotStore.fetch_raw

    def read_reads(self, snap, profile, reads, out, scratch=None):
        first_read(snap)
        return real_reads(self, snap, profile, reads, out, scratch)

    def fetch_raw(self, snap, rank, profile, lo, hi, scratch=None):  # synthesis' reads of the newest layout
        first_read(snap)
        return real_raw(self, snap, rank, profile, lo, hi, scratch)

    monkeypatch.setattr(SnapshotStore, "fetch_raw", fetch_raw)
    monkeypatch.setattr(SnapshotStore, "read_reads", read_reads)
    return removed


def _assert_brute_force(url, res, out_store):
    store = open_store(url)
    names = list(store.params())
    ref, _ = brute_force(store, res.targets, names)  # a plain read of what is left, an independent solve
    assert res.snapshots == [s.id for s in store.snapshots()]
    for j, tg in enumerate(res.targets):
        for n in names:
            torch.testing.assert_close(out_store.read(None, tg["sigma_rel"], n).double(), ref[j][n], rtol=1e-5,
                                       atol=1e-6, msg=n)


@pytest.mark.parametrize("when", ["after_planning", "while_reading"])
def test_snapshot_removed_during_synthesis_replans(long_store, tmp_path, monkeypatch, caplog, when):
    import logging

    import dist_ema.synthesis as syn
    from dist_ema.store.fs import StoreIO
    from dist_ema.store.io import remove_snapshot

    victim = "step-000000000008"
    if when == "while_reading":
        removed = _remove_before_reading(monkeypatch, long_store, {victim})
    else:  # between the plan (which lists the victim) and the first read
        removed = []
        real = syn.plan_coefficients

        def plan_then_remove(*a, **k):
            r = real(*a, **k)
            if not removed:
                remove_snapshot(StoreIO(long_store), victim)
                removed.append(victim)
            return r

        monkeypatch.setattr(syn, "plan_coefficients", plan_then_remove)
    with caplog.at_level(logging.INFO, logger="dist_ema"):
        res = synthesize(long_store, sigma_rels=[0.08, 0.15], out=str(tmp_path / "o"), format="zarr",
                         unit_bytes=64, progress=False)
    assert removed == [victim] and victim not in res.snapshots and len(res.snapshots) == 7 and res.replans == 1
    assert "re-planning (1 of 3)" in caplog.text and victim in caplog.text
    assert res.targets[0]["t"] == 16.0
    _assert_brute_force(long_store, res, open_store(str(tmp_path / "o")))


def test_snapshots_that_keep_disappearing_fail_clearly(long_store, tmp_path, monkeypatch):
    doomed = {f"step-{s:012d}" for s in (2, 4, 6, 8, 10, 12, 14)}
    removed = _remove_before_reading(monkeypatch, long_store, doomed)
    with pytest.raises(StoreError, match=r"disappeared while they were read.*4 plans.*keep"):
        synthesize(long_store, sigma_rels=[0.12], out=str(tmp_path / "o"), format="zarr", prefetch=1,
                   progress=False)
    assert len(removed) == 4  # the first plan and 3 re-plans, one snapshot removed under each
    assert not (tmp_path / "o").exists()


def test_objects_missing_under_a_marker_are_damage_not_retention(long_store, tmp_path, monkeypatch, caplog):
    _remove_before_reading(monkeypatch, long_store, {"step-000000000008"}, data_only=True)
    with pytest.raises(StoreError, match=r"step-000000000008.*damaged"):
        synthesize(long_store, sigma_rels=[0.12], out=str(tmp_path / "o"), format="zarr", progress=False)
    assert "re-planning" not in caplog.text
    assert not (tmp_path / "o").exists()


def worker_synthesize(rank, ws, out, url, out_url, format="safetensors"):
    """``synthesize`` on this world, as ``dist-ema synthesize URL --sigma-rel 0.08 0.15 [--format F]`` does."""
    synthesize(url, sigma_rels=[0.08, 0.15], out=out_url, format=format, progress=False)


def worker_synthesize_vanish(rank, ws, out, url, victim):
    """Rank 1 alone sees the victim disappear; every rank must re-plan the same way."""
    import dist_ema.synthesis as syn

    if rank == 1:
        _remove_before_reading(pytest.MonkeyPatch(), url, {victim})
    res = syn.synthesize(url, sigma_rels=[0.08, 0.15], out=os.path.join(out, "synth"), format="zarr",
                         unit_bytes=64, progress=False)
    Path(out, f"res{rank}.json").write_text(json.dumps({"snapshots": res.snapshots, "targets": res.targets}))


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_snapshot_removed_on_one_rank_replans_on_every_rank(long_store, tmp_path):
    victim = "step-000000000010"
    run_workers("tests.test_synthesis:worker_synthesize_vanish", 2, tmp_path / "w",
                kwargs=dict(url=long_store, victim=victim))
    got = [json.loads((tmp_path / "w" / f"res{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1] and victim not in got[0]["snapshots"] and len(got[0]["snapshots"]) == 7
    from types import SimpleNamespace

    _assert_brute_force(long_store, SimpleNamespace(**got[0]), open_store(str(tmp_path / "w" / "synth")))
