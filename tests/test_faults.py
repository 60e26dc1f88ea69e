"""Faults, bad input and security: nothing lost, nothing hangs, clear errors, no secrets leaked."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dist_ema.store import StoreError, open_store
from dist_ema.store.layout import Layout, validate_fqn
from dist_ema.synthesis import synthesize
from dist_ema.tracker import PostHocEMA
from tests.conftest import S3_KEY, S3_SECRET
from tests.dist_harness import ROOT, free_port, run_workers
from tests.engines import TinyNet, build

# ----------------------------------------------------------------------------- S3 outage


@pytest.fixture
def moto_process():
    """moto's S3 server as its own process, so the test can pause it (SIGSTOP) like a storage outage."""
    pytest.importorskip("moto")
    port = free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    import s3fs

    fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, client_kwargs={"endpoint_url": endpoint})
    fs.mkdir("outage")
    s3fs.S3FileSystem.clear_instance_cache()
    env = {"FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    yield proc, env
    proc.send_signal(signal.SIGCONT)
    proc.kill()
    proc.wait()


def worker_outage(rank, ws, out, url):
    setup = build("replicated", seed=0)
    ema = PostHocEMA(setup.target, store=url, snapshot_every=1, when_behind="skip", max_object_bytes=256)
    out = Path(out)
    stamps = []
    after = None
    for step in range(1, 2000):
        setup.step()
        ema.update()
        stamps.append(time.time())
        time.sleep(0.05)
        if step == 8 and rank == 0:
            (out / "ready").write_text("1")
        # keep going until the outage is over (both ranks agree through a collective)
        flag = torch.tensor([1.0 if (out / "resumed").exists() else 0.0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if flag.item() == 1.0 and after is None:
            after = step
        if after is not None and step >= after + 10:
            break
    ema.close()
    if rank == 0:
        torch.save({"stamps": stamps, "skipped": list(ema.snapshots.skipped), "steps": ema.step},
                   out / "result.pt")


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_storage_outage_training_continues_nothing_lost(tmp_path, moto_process):
    proc, env = moto_process
    url = "s3://outage/run"
    out = tmp_path / "w"
    out.mkdir()
    window = {}

    def pause():
        while not (out / "ready").exists():
            time.sleep(0.05)
        window["stop"] = time.time()
        proc.send_signal(signal.SIGSTOP)
        time.sleep(4.0)
        proc.send_signal(signal.SIGCONT)
        window["cont"] = time.time()
        (out / "resumed").write_text("1")

    th = threading.Thread(target=pause, daemon=True)
    th.start()
    run_workers("tests.test_faults:worker_outage", 2, out, kwargs=dict(url=url), env=env, timeout=240)
    th.join(5)
    res = torch.load(out / "result.pt", weights_only=True)
    # training kept running while the store was away
    during = [s for s in res["stamps"] if window["stop"] < s < window["cont"]]
    assert len(during) >= 5, (len(during), window)
    # every due snapshot is committed or explicitly reported as skipped; none is torn
    for k, v in env.items():
        os.environ[k] = v
    store = open_store(url)
    committed = {s.id for s in store.snapshots()}
    due = {f"step-{i:012d}" for i in range(1, res["steps"] + 1)}
    assert committed | set(res["skipped"]) == due
    assert not committed & set(res["skipped"])
    assert res["skipped"], "the outage should have made some snapshots skip"
    assert store.torn() == []
    for s in store.snapshots()[-3:]:
        assert store.verify(s) == []


# ----------------------------------------------------------------------------- permanent failures


def worker_expect_startup_error(rank, ws, out, url):
    setup = build("replicated", seed=0)
    try:
        PostHocEMA(setup.target, store=url)
    except StoreError as e:
        Path(out, f"err{rank}.txt").write_text(str(e))
        return
    raise AssertionError("PostHocEMA should have failed at start-up")


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_missing_bucket_fails_at_startup_on_every_rank(tmp_path, s3_env):
    env, _ = s3_env
    run_workers("tests.test_faults:worker_expect_startup_error", 2, tmp_path, env=env,
                kwargs=dict(url="s3://no-such-bucket-dist-ema/x"))
    for r in range(2):
        msg = (tmp_path / f"err{r}.txt").read_text()
        assert "opening store s3://no-such-bucket-dist-ema/x" in msg
        assert "rank 0" in msg  # names the rank that hit it
        assert S3_SECRET not in msg


def worker_break_store(rank, ws, out, url, on_error):
    setup = build("replicated", seed=0)
    ema = PostHocEMA(setup.target, store=url, snapshot_every=2, writer="sync", on_error=on_error)
    for step in range(1, 9):
        setup.step()
        if step == 5:
            torch.distributed.barrier()
            if rank == 0:  # the store's snapshots folder becomes a file: every later write fails for good
                shutil.rmtree(Path(url) / "snapshots")
                (Path(url) / "snapshots").write_text("not a folder")
            torch.distributed.barrier()
        try:
            ema.update()
        except StoreError as e:
            Path(out, f"err{rank}.txt").write_text(f"{step}: {e}")
            return
    ema.close()
    Path(out, f"done{rank}.txt").write_text(json.dumps(ema.snapshots.skipped))


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_write_failure_raises_on_every_rank(tmp_path):
    url = str(tmp_path / "store")
    run_workers("tests.test_faults:worker_break_store", 2, tmp_path / "w", kwargs=dict(url=url, on_error="raise"))
    msgs = [(tmp_path / "w" / f"err{r}.txt").read_text() for r in range(2)]
    assert msgs[0] == msgs[1]  # the same error, at the same step, on every rank
    # the store broke before step 4 was committed: its commit failed, reported at the next snapshot (step 6)
    assert msgs[0].startswith("6: snapshot write failed") and "step-000000000004: rank 0: NotADirectoryError" in msgs[0]
    assert "on_error='warn'" in msgs[0]


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_write_failure_can_be_tolerated_explicitly(tmp_path):
    url = str(tmp_path / "store")
    run_workers("tests.test_faults:worker_break_store", 2, tmp_path / "w", kwargs=dict(url=url, on_error="warn"))
    skipped = [json.loads((tmp_path / "w" / f"done{r}.txt").read_text()) for r in range(2)]
    assert skipped[0] == skipped[1] == ["step-000000000004", "step-000000000006", "step-000000000008"]


# ----------------------------------------------------------------------------- rank failures


def worker_die_in_resume(rank, ws, out, url):
    setup = build("fsdp2", seed=0)
    if rank == 1:
        os._exit(17)  # dies before joining the collective start-up
    try:
        PostHocEMA(setup.target, store=url, resume=True)
    except Exception as e:  # noqa: BLE001
        Path(out, "err0.txt").write_text(f"{type(e).__name__}: {e}")
        os._exit(3)


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_rank_death_fails_the_others_in_bounded_time(tmp_path):
    t0 = time.monotonic()
    run_workers("tests.test_faults:worker_die_in_resume", 2, tmp_path, kwargs=dict(url=str(tmp_path / "s")),
                expect_failure=True, timeout=150)
    assert time.monotonic() - t0 < 150  # no hang: rank 0 learned of the dead peer
    # rank 0 failed (error file or a gloo abort), and the store is still consistent
    if (tmp_path / "s" / "dist_ema.json").exists():
        assert open_store(str(tmp_path / "s")).torn() == []


# ----------------------------------------------------------------------------- integrity


def _store_with_snapshots(url):
    torch.manual_seed(0)
    m = TinyNet()
    with PostHocEMA(m, store=url, snapshot_every=2, writer="sync", max_object_bytes=64) as ema:
        for _ in range(4):
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.1)
            ema.update()
    return m


@pytest.mark.dist
def test_flipped_byte_detected_in_resume_synthesis_and_verify(tmp_path):
    url = str(tmp_path / "s")
    m = _store_with_snapshots(url)
    chunk = next((tmp_path / "s" / "snapshots" / "step-000000000004").glob("j*/r00000/c/0/0"))  # rank 0, p0
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0x01
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"step-000000000004.*rank 0 profile p0.*corrupt"):
        PostHocEMA(m, store=url, resume=True, writer="sync")
    with pytest.raises(StoreError, match="corrupt"):
        synthesize(url, sigma_rels=[0.12], out=str(tmp_path / "o"), progress=False)
    assert not list((tmp_path).glob("o/**/*.safetensors"))
    r = subprocess.run([sys.executable, "-m", "dist_ema", "ls", url, "--verify"], capture_output=True, text=True,
                       cwd=str(ROOT), timeout=120)
    assert r.returncode == 1 and "PROBLEM: step-000000000004: rank 0 profile p0" in r.stderr
    chunk.write_bytes(bytes(raw[:3]))  # truncated
    assert any("p0" in p for p in open_store(url).verify(open_store(url).snapshot(4)))


# ----------------------------------------------------------------------------- bad input


def test_update_twice_without_optimizer_step(caplog):
    # a second update() without an optimizer step changes no weight: it must not advance time
    # (GradScaler-skipped steps look the same); calling it that way most of the time is warned about
    m = torch.nn.Linear(3, 3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ema = PostHocEMA(m)
    with caplog.at_level("WARNING", logger="dist_ema"):
        for i in range(12):
            m(torch.ones(1, 3)).sum().backward()
            opt.step()
            assert ema.update() is True
            assert ema.update() is False
            assert ema.step == i + 1 and ema.t == i + 1.0
    warned = [r.getMessage() for r in caplog.records if "skipped steps" in r.getMessage()]
    assert len(warned) == 1 and "once, right after each optimizer step" in warned[0]


@pytest.mark.parametrize("bad", ["../../x", "a/b", "..", "a..b/../c", "", "w\x00", "x y"])
def test_parameter_names_cannot_escape(bad):
    with pytest.raises(ValueError, match="not a valid name"):
        validate_fqn(bad)
    with pytest.raises(ValueError, match="not a valid name"):
        Layout.build([(bad, (2,), "float32")], [[(bad, 0, 2)]])


def test_layout_coverage_errors():
    with pytest.raises(ValueError, match="gap"):
        Layout.build([("w", (4,), "float32")], [[("w", 0, 2)], [("w", 3, 1)]])
    with pytest.raises(ValueError, match="overlap"):
        Layout.build([("w", (4,), "float32")], [[("w", 0, 3)], [("w", 2, 2)]])
    with pytest.raises(ValueError, match="missing"):
        Layout.build([("w", (4,), "float32")], [[("w", 0, 3)], []])


# Where unpickling is allowed, and why: nothing read from a store or a file is ever unpickled.
PICKLE_ALLOWED = {
    "collective.py": "objects the job's own ranks send over its process group (as torch.distributed's object "
                     "collectives do); the module reads no file and no store",
}
# Unpickling of files, only in a child process that the user asked for, never in dist-ema's own process: the
# module is started as `python -m dist_ema.<module>` and imported by no module of dist-ema
CHILD_UNPICKLERS = {
    "importers/edm2_child.py": "EDM2's network-snapshot pickles (dist-ema import edm2), only with --allow-pickle / "
                               "allow_pickle=True, started by importers/edm2.py",
}


def test_library_never_unpickles():
    pat = re.compile(r"pickle\.loads?\(|torch\.load\((?![^)]*weights_only=True)|np\.load\([^)]*allow_pickle=True")
    pkg = ROOT / "dist_ema"
    allowed = {**PICKLE_ALLOWED, **CHILD_UNPICKLERS}
    hits = [f"{p.relative_to(pkg)}:{i}" for p in pkg.rglob("*.py") if str(p.relative_to(pkg)) not in allowed
            for i, line in enumerate(p.read_text().splitlines(), 1) if pat.search(line)]
    assert hits == []
    for name in PICKLE_ALLOWED:  # an allowed module stays one that touches no file or store
        text = (pkg / name).read_text()
        assert not re.search(r"\bopen\(|fsspec|dist_ema\.store|import (os|io)\b|Path\(", text), name
    for name in CHILD_UNPICKLERS:  # a child's module: no module of dist-ema imports it, and it reaches no store
        mod = "dist_ema." + name[:-3].replace("/", ".")
        parent, leaf = mod.rsplit(".", 1)
        imports = re.compile(rf"import\s+{re.escape(mod)}\b|from\s+{re.escape(parent)}\s+import\s+[^\n]*\b{leaf}\b")
        assert [str(p.relative_to(pkg)) for p in pkg.rglob("*.py") if imports.search(p.read_text())] == [], name
        assert not re.search(r"fsspec|dist_ema\.store|from dist_ema|import dist_ema", (pkg / name).read_text()), name


# ----------------------------------------------------------------------------- secrets


def worker_secret_flow(rank, ws, out, url, options):
    import logging

    logging.basicConfig(level=logging.DEBUG)
    setup = build("fsdp2", seed=0)
    with PostHocEMA(setup.target, store=url, snapshot_every=2, storage_options=options) as ema:
        for _ in range(4):
            setup.step()
            ema.update()
        print(repr(ema.snapshots.io), ema.snapshots.config)


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_credentials_never_leak(tmp_path, s3_server, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    import s3fs

    options = {"key": S3_KEY, "secret": S3_SECRET, "endpoint_url": s3_server}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("secrets")
    url = "s3://secrets/run"
    outs = run_workers("tests.test_faults:worker_secret_flow", 2, tmp_path / "w",
                       kwargs=dict(url=url, options=options), env={"AWS_DEFAULT_REGION": "us-east-1"})
    r = subprocess.run([sys.executable, "-m", "dist_ema", "-v", "synthesize", url, "--sigma-rel", "0.12", "--out",
                        "s3://secrets/synth", "--storage-options", json.dumps(options), "--no-progress"],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "dist_ema", "ls", "s3://missing-bucket-x/y", "--storage-options",
                          json.dumps(options)], capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    assert bad.returncode == 2
    texts = [*outs, r.stdout, r.stderr, bad.stdout, bad.stderr]
    blobs = [fs.cat(p) for p in fs.find("secrets")]
    assert len(blobs) > 20
    assert "***" in outs[0]  # the options were printed, redacted
    for text in texts:
        assert S3_SECRET not in text
    for blob in blobs:
        assert S3_SECRET.encode() not in blob


# ----------------------------------------------------------------------------- rank death in synthesis


def worker_synthesize_rank_dies(rank, ws, out, url, die):
    import dist_ema.synthesis as syn

    if die and rank == 1:
        def boom(*a, **k):
            os._exit(9)  # this rank dies in the middle of its work

        syn._map_units = boom
    try:
        syn.synthesize(url, sigma_rels=[0.12], out=os.path.join(out, "synth"), progress=False, unit_bytes=64)
    except StoreError as e:
        Path(out, f"err{rank}.txt").write_text(str(e))
        raise


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_rank_death_in_synthesis_leaves_no_output_and_rerun_succeeds(tmp_path):
    url = str(tmp_path / "s")
    _store_with_snapshots(url)
    t0 = time.monotonic()
    run_workers("tests.test_faults:worker_synthesize_rank_dies", 2, tmp_path, kwargs=dict(url=url, die=True),
                expect_failure=True, timeout=200)
    assert time.monotonic() - t0 < 200
    msg = (tmp_path / "err0.txt").read_text()
    assert "rank stopped responding" in msg and "partial output was removed" in msg
    assert not list((tmp_path / "synth").rglob("*.safetensors"))
    assert not (tmp_path / "synth" / "zarr" / "dist_ema.json").exists()
    run_workers("tests.test_faults:worker_synthesize_rank_dies", 2, tmp_path, kwargs=dict(url=url, die=False))
    assert len(list((tmp_path / "synth").rglob("*.safetensors"))) == 1


# ----------------------------------------------------------------------------- soak


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_random_kills_and_restarts(tmp_path):
    """Short snapshots, a rank SIGKILLed at a random step, restart with resume; repeat. The store must end
    consistent (no torn snapshot, every object verifies) and synthesis must match the brute-force sum."""
    import random

    from tests.test_synthesis import brute_force

    rng = random.Random(1234)
    url = str(tmp_path / "store")
    kills = 0
    for round_ in range(4):
        store_has = (tmp_path / "store" / "dist_ema.json").exists() and open_store(url).snapshots()
        start = open_store(url).snapshots()[-1].step if store_has else 0
        kill_at = start + rng.randint(2, 6)
        run_workers("tests.test_store:worker_train", 2, tmp_path / f"r{round_}",
                    kwargs=dict(engine="fsdp2", url=url, steps=10, snapshot_every=1, resume=bool(store_has),
                                kill_at=kill_at), expect_failure=True, timeout=150)
        kills += 1
    run_workers("tests.test_store:worker_train", 2, tmp_path / "final",
                kwargs=dict(engine="fsdp2", url=url, steps=4, snapshot_every=1, resume=True))
    store = open_store(url)
    snaps = store.snapshots()
    assert kills == 4 and store.torn() == []
    steps = [s.step for s in snaps]
    assert steps == list(range(1, steps[-1] + 1)) and len(steps) >= 6  # resumed runs continue seamlessly
    for s in snaps:
        assert store.verify(s) == [], s.id
    res = synthesize(url, sigma_rels=[0.12], out=str(tmp_path / "out"), progress=False)
    ref, _ = brute_force(store, res.targets, list(store.params()))
    from safetensors.torch import load_file

    got = load_file(res.files[0])
    for n, v in ref[0].items():
        torch.testing.assert_close(got[n].double(), v, rtol=1e-5, atol=1e-6, msg=n)
