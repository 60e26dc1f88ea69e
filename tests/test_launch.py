"""The launch scripts, the example training script and the demo, as real processes (short forms).

Every test starts real launchers (torchrun, the deepspeed launcher, two torchrun "nodes") on
2 CPU ranks with gloo, the way a user would, through the scripts in ``launch/``. Each launch
has a timeout and runs in its own process group (killed as a whole on timeout); a failure
shows the command and the last lines of its output.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_ema import open_store, synthesize

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
TAIL = 60  # lines of output shown when a launch fails

# the layout's engine name recorded in every snapshot, per --engine
ENGINE_NAMES = {"fsdp2": "fsdp2", "fsdp2_tp": "fsdp2", "fsdp1": "fsdp1", "ddp": "replicated", "zero1": "zero1",
                "zero2": "zero2", "zero3": "zero3"}
SHORT = ["--config", "configs/dist_ema.toml", "--steps", "8", "--snapshot-every", "4", "--log-every", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launch: this venv's commands first on PATH, CPU settings."""
    env = dict(os.environ)
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-TAIL:])


def launch_many(cmds: list[tuple[list[str], dict[str, str] | None]], timeout: float = 240,
                expect_rc: int | list[int] = 0) -> list[str]:
    """Start every command at once (each in its own process group), wait for all; return their outputs."""
    procs = [subprocess.Popen(cmd, cwd=str(ROOT), env=base_env(env), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True) for cmd, env in cmds]
    deadline = time.monotonic() + timeout
    outs: list[bytes] = []
    timed_out = False
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            for q in procs:  # the whole group of every launch we started: launcher and its ranks
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            out, _ = p.communicate()
        outs.append(out)
    texts = [o.decode(errors="replace") for o in outs]
    want = expect_rc if isinstance(expect_rc, list) else [expect_rc] * len(procs)
    bad = [i for i, p in enumerate(procs) if timed_out or p.returncode != want[i]]
    if bad:
        why = f"timed out after {timeout:.0f} s" if timed_out else "unexpected exit code"
        report = "\n".join(
            f"----- $ {shlex.join(cmds[i][0])}  (exit {procs[i].returncode}, expected {want[i]})\n{_tail(texts[i])}"
            for i in bad)
        pytest.fail(f"{why}\n{report}", pytrace=False)
    return texts


def launch(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 240, expect_rc: int = 0) -> str:
    return launch_many([(cmd, env)], timeout, expect_rc)[0]


def steps_of(url: str) -> list[int]:
    return [s.step for s in open_store(url).snapshots()]


# ------------------------------------------------------------------------------ every engine under torchrun

_RUNS: dict[str, dict] = {}  # engine -> {"store", "ckpt", "out"}: one launch per engine, reused by later tests


def train_run(engine: str, tmp_root: Path) -> dict:
    if engine not in _RUNS:
        d = tmp_root / engine
        store, ckpt = str(d / "snapshots"), str(d / "ckpt")
        extra = ["--checkpoint-dir", ckpt] if engine == "ddp" else []
        out = launch(["bash", "launch/torchrun.sh", "--engine", engine, "--store", store, *SHORT, *extra],
                     timeout=300)
        _RUNS[engine] = {"store": store, "ckpt": ckpt, "out": out}
    return _RUNS[engine]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.mark.dist
@pytest.mark.parametrize("engine", [e for e in ENGINE_NAMES if e != "zero1"])  # zero1: test_deepspeed_launcher
def test_torchrun_each_engine(engine: str, runs_root: Path) -> None:
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    run = train_run(engine, runs_root)
    store = open_store(run["store"])
    snaps = store.snapshots()
    assert [s.step for s in snaps] == [4, 8]
    last = snaps[-1]
    assert last.world_size == 2 and last.meta["engine"] == ENGINE_NAMES[engine]
    assert last.version == (3 if engine == "fsdp2_tp" else 2)  # fc2's row-parallel column blocks are N-d boxes
    assert last.sigma_rels == pytest.approx((0.05, 0.10))
    assert store.read(8, 0.10, "fc1.weight").shape == (128, 64)  # full tensor back from 2 shards
    assert store.read(8, 0.05, "head.bias").shape == (10,)
    assert f"trained {engine} on 2 rank(s)" in run["out"] and "snapshots: 2 committed" in run["out"]
    assert "EMA sigma_rel=0.1" in run["out"]


@pytest.mark.dist
def test_resume_continues_the_run(runs_root: Path) -> None:
    """--resume: model/optimizer from the checkpoint, EMA from the store; snapshots continue at the same interval."""
    run = train_run("ddp", runs_root)
    out = launch(["bash", "launch/torchrun.sh", "--engine", "ddp", "--store", run["store"], *SHORT,
                  "--steps", "12", "--checkpoint-dir", run["ckpt"], "--resume"], timeout=300)
    assert "resumed EMA from snapshot step 8" in out and "steps 8->12" in out
    assert steps_of(run["store"]) == [4, 8, 12]


# ------------------------------------------------------------------------------ deepspeed launcher


@pytest.mark.dist
def test_deepspeed_launcher(tmp_path: Path) -> None:
    """The real `deepspeed --num_gpus 2 --master_port P launch/train.py --deepspeed_config ...` (CPU)."""
    pytest.importorskip("deepspeed")
    store = str(tmp_path / "snapshots")
    out = launch(["bash", "launch/deepspeed.sh", "--store", store, *SHORT],
                 env={"NUM_GPUS": "2", "MASTER_PORT": str(free_port()), "DS_CONFIG": "configs/ds_zero1.json"},
                 timeout=300)
    assert "--local_rank=1" in out  # the launcher's convention reached the script
    assert "trained zero1 on 2 rank(s)" in out  # engine taken from the JSON's ZeRO stage
    assert steps_of(store) == [4, 8]
    last = open_store(store).snapshots()[-1]  # what test_torchrun_each_engine checks of the other engines
    assert last.world_size == 2 and last.meta["engine"] == "zero1" and last.version == 2
    assert open_store(store).read(8, 0.10, "fc1.weight").shape == (128, 64)
    assert "snapshots: 2 committed" in out and "EMA sigma_rel=0.1" in out
    assert open_store(store).snapshots()[-1].meta["engine"] == "zero1"


# ------------------------------------------------------------------------------ two nodes on one machine


@pytest.mark.dist
def test_two_nodes_train_and_synthesize(runs_root: Path, tmp_path: Path) -> None:
    """2 torchrun "nodes" x 1 rank, c10d rendezvous on 127.0.0.1: the same snapshots and synthesis as 1 node x 2."""
    single = train_run("fsdp2", runs_root)
    store = str(tmp_path / "snapshots")
    port = free_port()
    node = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NPROC_PER_NODE": "1",
            "RDZV_ID": f"test-{port}"}
    train = ["bash", "launch/torchrun_multinode.sh", "--engine", "fsdp2", "--store", store, *SHORT]
    outs = launch_many([(train, {**node, "NODE_RANK": "0"}), (train, {**node, "NODE_RANK": "1"})], timeout=300)
    assert sum("trained fsdp2 on 2 rank(s)" in o for o in outs) == 1  # rank 0 lives on one of the nodes
    a, b = open_store(store), open_store(single["store"])
    assert [s.step for s in a.snapshots()] == [4, 8] and a.snapshots()[-1].world_size == 2
    for name in a.params():
        for sr in (0.05, 0.10):
            for step in (4, 8):
                torch.testing.assert_close(a.read(step, sr, name), b.read(step, sr, name), rtol=1e-6, atol=1e-7)

    # synthesis on the 2 "nodes" == synthesis in one process of the single-node run's store
    port = free_port()
    node = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NPROC_PER_NODE": "1",
            "RDZV_ID": f"synth-{port}"}
    out2 = str(tmp_path / "synth")
    synth = ["bash", "launch/synthesize.sh", store, "--sigma-rel", "0.05", "0.15", "--out", out2, "--no-progress"]
    launch_many([(synth, {**node, "NODE_RANK": "0"}), (synth, {**node, "NODE_RANK": "1"})], timeout=300)
    ref = synthesize(single["store"], sigma_rels=[0.05, 0.15], out=str(tmp_path / "ref"), progress=False)
    from safetensors.torch import load_file

    for f in ref.files:
        got = load_file(f.replace(str(tmp_path / "ref"), out2))
        want = load_file(f)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)

    # the evaluation script reads the output like any user would
    sys.path.insert(0, str(LAUNCH))
    import evaluate

    rows_json = tmp_path / "rows.json"
    assert evaluate.main(["--synth", out2, "--store", store, "--json", str(rows_json)]) == 0
    rows = json.loads(rows_json.read_text())
    assert [r["sigma_rel"] for r in rows] == pytest.approx([0.05, 0.15])
    assert [r["tracked"] for r in rows] == [True, False] and all(0 < r["accuracy"] <= 1 for r in rows)


# ------------------------------------------------------------------------------ the demo


def _check_demo(out: str, out_dir: Path, n_targets: int) -> dict:
    assert "held-out loss" in out and "raw weights" in out and "demo finished" in out
    res = json.loads((out_dir / "demo_results.json").read_text())
    rows = res["rows"]
    raw = [r for r in rows if r["sigma_rel"] is None]
    synth = [r for r in rows if r["sigma_rel"] is not None]
    assert len(raw) == 1 and len(synth) == n_targets
    assert any(r["tracked"] for r in synth)
    png = out_dir / "demo_loss_vs_sigma_rel.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    return res


@pytest.mark.dist
def test_demo_end_to_end_reduced(tmp_path: Path) -> None:
    """run_demo.py in short form: a synthesized EMA beats the raw weights on held-out loss."""
    out_dir = tmp_path / "out"
    out = launch([sys.executable, "launch/run_demo.py", "--run-dir", str(tmp_path / "demo"), "--out", str(out_dir),
                  "--steps", "200", "--sigma-rels", "0.05", "0.1", "0.15", "0.2"], timeout=400)
    res = _check_demo(out, out_dir, 4)
    raw = next(r for r in res["rows"] if r["sigma_rel"] is None)
    best = min((r for r in res["rows"] if r["sigma_rel"] is not None), key=lambda r: r["loss"])
    assert best["loss"] < raw["loss"], res["rows"]
    assert "<- best" in out and "best synthesized EMA" in out


def test_demo_run_dir_is_fresh_each_time(tmp_path: Path) -> None:
    """A demo run dir is emptied on the next run; a directory the demo did not make is never touched."""
    sys.path.insert(0, str(LAUNCH))
    import run_demo

    d = tmp_path / "demo"
    run_demo.fresh_run_dir(d)
    (d / "snapshots").mkdir()
    (d / "snapshots" / "zarr.json").write_text("{}")
    run_demo.fresh_run_dir(d)
    assert not (d / "snapshots").exists() and (d / run_demo.MARKER).exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("x")
    with pytest.raises(SystemExit, match="was not made by the demo"):
        run_demo.fresh_run_dir(mine)
    assert (mine / "precious.txt").exists()


@pytest.mark.dist
def test_demo_flow_against_s3(tmp_path: Path, s3_env) -> None:
    """Train -> snapshots on S3 -> distributed synthesis S3 -> S3 -> evaluation reading S3 (moto server)."""
    env, bucket = s3_env
    store = f"s3://{bucket}/demo/snapshots"
    out_dir = tmp_path / "out"
    out = launch([sys.executable, "launch/run_demo.py", "--run-dir", str(tmp_path / "demo"), "--out", str(out_dir),
                  "--store", store, "--steps", "50", "--sigma-rels", "0.05", "0.15"], env=env, timeout=400)
    res = _check_demo(out, out_dir, 2)
    assert res["synth"] == f"s3://{bucket}/demo/synth"
    assert steps_of(store) == [25, 50]
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["FSSPEC_S3_ENDPOINT_URL"]})
    assert fs.exists(f"{bucket}/demo/synth/sigma_rel-0.1500/model.safetensors")
    assert not (tmp_path / "demo" / "snapshots").exists()  # nothing of the store went to local disk


# ------------------------------------------------------------------------------ errors and scripts


@pytest.mark.dist
def test_train_script_errors_are_clear(tmp_path: Path) -> None:
    """Settings are validated before any process group forms: a clear message, exit code 2, no traceback."""
    out = launch([sys.executable, "launch/train.py", "--sigma-rels", "0.5", "--store", str(tmp_path / "s")],
                 expect_rc=2, timeout=120)
    assert "train.py: error: command-line override: dist_ema.sigma_rels must each be in (0, 0.2887)" in out
    assert "Traceback" not in out
    sys.path.insert(0, str(LAUNCH))
    import train

    cases = [
        (["--resume", "--store", "x"], "--resume needs --checkpoint-dir"),
        (["--snapshot-every", "5"], "dist_ema.snapshot_every is set but dist_ema.store is not"),
        (["--store", str(tmp_path / "s")], "start this script with torchrun"),
        (["--engine", "ddp", "--deepspeed_config", "configs/ds_zero1.json"], "--deepspeed_config is for the zero"),
        (["--deepspeed_config", "nope.json"], "DeepSpeed config 'nope.json' does not exist"),
        (["--steps", "0"], "steps must be an integer >= 1"),
    ]
    env_rank = os.environ.pop("RANK", None)
    try:
        for argv, msg in cases:
            with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
                train.main(argv)
    finally:
        if env_rank is not None:
            os.environ["RANK"] = env_rank
    bad = tmp_path / "bad.toml"
    bad.write_text("[dist_ema]\n[train]\nstep = 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['step'\] in \[train\]"):
        train.main(["--config", str(bad)])


@pytest.mark.dist
def test_launch_scripts_parse_and_document_themselves() -> None:
    for name in ("torchrun.sh", "torchrun_multinode.sh", "deepspeed.sh", "synthesize.sh", "demo.sh",
                 "slurm.sbatch"):
        path = LAUNCH / name
        r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{name}: {r.stderr}"
        head = path.read_text().splitlines()[1]
        assert head.startswith("#") and len(head) > 20, f"{name} should say what it does on line 2"
    hosts = [ln for ln in (LAUNCH / "hostfile.example").read_text().splitlines() if ln and not ln.startswith("#")]
    assert hosts and all(" slots=" in ln for ln in hosts)
    for stage in (1, 2, 3):  # the JSON configs train.py reads for --engine zero<stage>
        cfg = json.loads((ROOT / "configs" / f"ds_zero{stage}.json").read_text())
        assert cfg["zero_optimization"]["stage"] == stage


# ------------------------------------------------------------------------------ the newcomer's path (issue 16)


def _refused_port() -> int:
    return free_port()  # bound once and closed: nothing listens there


@pytest.mark.dist
def test_common_mistakes_are_one_line_per_job(runs_root: Path, tmp_path: Path, s3_env) -> None:
    """Real torchrun jobs (2 ranks): a store that holds snapshots (the recipe table's row 2 reusing row 1's
    store), a missing bucket and an unreachable endpoint each print one error line from rank 0, phrased for
    the script, exit 2, no traceback and no ChildFailedError report; meanwhile, a run with a store and no
    snapshot schedule gets a default one that synthesis can use."""
    env, bucket = s3_env
    used = train_run("ddp", runs_root)["store"]
    before = steps_of(used)
    port = _refused_port()
    default_store = str(tmp_path / "default" / "snapshots")
    base = ["bash", "launch/torchrun.sh", "--engine", "ddp", "--steps", "40", "--log-every", "40"]
    outs = launch_many([
        (base + ["--store", used], None),
        (base + ["--store", f"s3://no-such-bucket-{bucket}/exp1/snapshots"], env),
        (base + ["--store", "s3://my-bucket/exp1/snapshots"],
         {**env, "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}),
        (base + ["--store", default_store], None),
    ], timeout=400, expect_rc=[2, 2, 2, 0])
    for out, needles in zip(outs[:3], [("already holds", "--resume", used),
                                       (f"no-such-bucket-{bucket}",),
                                       (f"http://127.0.0.1:{port}", "connection refused", "FSSPEC_S3_ENDPOINT_URL")]):
        errors = [ln for ln in out.splitlines() if "error:" in ln.lower() or "Error" in ln]
        assert len(errors) == 1 and errors[0].startswith("train.py: error: "), out
        assert all(n in errors[0] for n in needles), (needles, errors[0])
        assert "Traceback" not in out and "ChildFailedError" not in out and "resume=True" not in out, out
        assert len(out.splitlines()) <= 8, out
    retries = [ln for ln in outs[2].splitlines() if "retry in" in ln and "127.0.0.1" in ln]
    assert 1 <= len(retries) <= 2 and all("[rank 0]" in ln for ln in retries), outs[2]
    assert steps_of(used) == before  # nothing written to the refused store
    print("\n".join(outs[:3]))  # the messages, for the record (pytest -s)

    # no --snapshot-every, no --config: a default schedule (20 snapshots), said at start with `dist-ema error`
    assert "no snapshot_every given" in outs[3] and "dist-ema error" in outs[3]
    assert steps_of(default_store) == list(range(2, 41, 2))
    res = synthesize(default_store, sigma_rels=[0.15, 0.2], out=str(tmp_path / "synth"), progress=False)
    assert all(x["error"] < 0.05 for x in res.targets), res.targets


def test_train_debug_shows_tracebacks_and_other_ranks_wait(monkeypatch, capsys) -> None:
    """Rank 0 prints the one line at once; another rank waits first (the launcher stops it when rank 0 exits);
    --debug prints the traceback instead."""
    sys.path.insert(0, str(LAUNCH))
    import train

    from dist_ema.store.fs import StoreError

    slept: list[float] = []
    monkeypatch.setattr(train.time, "sleep", slept.append)

    def fail() -> int:
        try:
            raise StoreError("runs/x already holds 2 committed snapshot(s); pass resume=True to continue that run")
        except StoreError as e:
            monkeypatch.setenv("RANK", rank)
            return train.report_and_exit_code(e, debug)

    for rank, debug in (("0", False), ("1", False), ("0", True)):
        code = fail()
        err = capsys.readouterr().err
        assert code == 2
        if debug:
            assert "Traceback" in err and "StoreError" in err
        else:
            assert err.count("\n") == 1 and "pass --resume to continue" in err and "resume=True" not in err
            assert ("(rank 1)" in err) == (rank == "1")
    assert slept == [train.GRACE_S]
    parser = train.build_parser()
    assert parser.parse_args(["--debug"]).debug


@pytest.mark.dist
def test_deepspeed_hostfile_decides_ranks_per_node() -> None:
    """With a hostfile the launcher gets no --num_gpus (its slots decide) unless NUM_GPUS caps them."""
    def argv(env: dict[str, str]) -> list[str]:
        out = launch(["bash", "launch/deepspeed.sh", "--store", "s3://b/x"], env={"DEEPSPEED": "echo", **env},
                     timeout=60)
        return out.split()

    multi = {"HOSTFILE": "launch/hostfile.example", "MASTER_ADDR": "node-0"}
    got = argv(multi)
    assert "--num_gpus" not in got and got[got.index("--hostfile") + 1] == "launch/hostfile.example"
    got = argv({**multi, "NUM_GPUS": "4"})
    assert got[got.index("--num_gpus") + 1] == "4"
    got = argv({})
    assert got[got.index("--num_gpus") + 1] == "2" and "--hostfile" not in got


@pytest.mark.dist
def test_launch_scripts_find_the_venv(tmp_path: Path) -> None:
    """Without an active environment, every launcher uses the checkout's .venv when there is one."""
    (tmp_path / "launch").mkdir()
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH" VIRTUAL_ENV="{tmp_path / ".venv"}"\n')
    for tool in ("python", "deepspeed"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "venv {tool} $*"\n')
        (bin_dir / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(PATH="/usr/bin:/bin", NNODES="2", MASTER_ADDR="127.0.0.1")
    for name in ("torchrun.sh", "torchrun_multinode.sh", "synthesize.sh", "deepspeed.sh"):
        script = tmp_path / "launch" / name
        script.write_text((LAUNCH / name).read_text())
        r = subprocess.run(["bash", str(script), "--store", "x"], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0 and r.stdout.startswith("venv "), (name, r.stdout, r.stderr)
        if name != "deepspeed.sh":
            assert "launch/run_torchrun.py" in r.stdout, r.stdout
