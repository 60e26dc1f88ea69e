"""Lightning and Accelerate integrations in real multi-process runs on CPU, against a brute-force EMA."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dist_ema import open_store, phema
from tests.dist_harness import ROOT, free_port

SIGMAS = (0.05, 0.10)


def brute_force(trajectory: list[dict[str, torch.Tensor]], gamma: float) -> dict[str, torch.Tensor]:
    """sum_j w_j theta_j, w_j = (j/n)^(g+1) - ((j-1)/n)^(g+1): the power-function profile over steps 1..n."""
    n = len(trajectory)
    out = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in trajectory[0].items()}
    for j, theta in enumerate(trajectory, start=1):
        w = (j / n) ** (gamma + 1) - ((j - 1) / n) ** (gamma + 1)
        for k in out:
            out[k] += w * theta[k].double()
    return out


def _check(ema: dict[str, torch.Tensor], trajectory, sigma_rel: float, what: str) -> None:
    ref = brute_force(trajectory, phema.sigma_rel_to_gamma(sigma_rel))
    for k, v in ref.items():
        torch.testing.assert_close(ema[k].double(), v, rtol=2e-5, atol=2e-6, msg=f"{what} {k} sigma_rel={sigma_rel}")
    last = trajectory[-1]
    assert max((ema[k].double() - last[k].double()).abs().max().item() for k in ref) > 1e-3  # not the raw weights


def _run(cmd: list[str], timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra_env)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def _torchrun(script: str, *args: str) -> None:
    _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
          "--master-addr", "127.0.0.1", "--master-port", str(free_port()), script, *args])


@pytest.mark.dist
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lightning_with_gradient_accumulation_validation_swap_and_checkpoint_resume(tmp_path, strategy):
    # "fsdp": Lightning's FSDPStrategy (FSDP1, sharded checkpoints) on CPU, through the app's workarounds for
    # Lightning's and FSDP1's CPU refusals (see tests/apps/lightning_app.py)
    pytest.importorskip("lightning")
    app = str(ROOT / "tests" / "apps" / "lightning_app.py")
    _torchrun(app, str(tmp_path), "a", strategy)
    assert (tmp_path / "a.ckpt").exists() and (tmp_path / "a.ckpt.dist_ema" / ".metadata").is_file()
    _torchrun(app, str(tmp_path), "b", strategy)
    a, b = (torch.load(tmp_path / f"{p}.pt", weights_only=True) for p in "ab")
    # 16 samples / 2 ranks / batch 2 = 4 micro-batches per epoch, accumulated 2 -> 6 real steps in phase a
    assert len(a["trajectory"]) == 6 and a["clock"] == (6, 6.0, 6)
    for s in SIGMAS:
        _check(a["ema"][s], a["trajectory"], s, "phase a")
    # validation saw the sigma_rel=0.10 EMA of that moment; the training weights came back exactly after
    assert [g for g, _ in a["validation"]] == [2, 4, 6]
    for (g, seen), (g2, after) in zip(a["validation"], a["after_validation"]):
        assert g == g2
        _check(seen, a["trajectory"][:g], 0.10, f"validation at step {g}")
        assert all(torch.equal(after[k], a["trajectory"][g - 1][k]) for k in after)
    # resumed from the checkpoint: the EMA continues over both runs' steps
    full = a["trajectory"] + b["trajectory"]
    assert len(full) == 10 and b["clock"] == (10, 10.0, 10)
    for s in SIGMAS:
        _check(b["ema"][s], full, s, "resumed")
    store = open_store(str(tmp_path / "store"))
    assert [x.step for x in store.snapshots()] == [2, 4, 6, 8, 10]
    for k, v in b["ema"][0.10].items():
        assert torch.equal(store.read(10, 0.10, k), v), k


def _continued_run(out, phase: str) -> dict:
    """Run the Lightning app's ``phase`` under DDP; check that its EMA covers all 10 steps of both fits."""
    pytest.importorskip("lightning")
    _torchrun(str(ROOT / "tests" / "apps" / "lightning_app.py"), str(out), phase, "ddp")
    res = torch.load(out / f"{phase}.pt", weights_only=True)
    assert len(res["trajectory"]) == 10 and res["clock"] == (10, 10.0, 10)
    for s in SIGMAS:
        _check(res["ema"][s], res["trajectory"], s, phase)
    store = open_store(str(out / "store"))
    assert [x.step for x in store.snapshots()] == [2, 4, 6, 8, 10]
    for k, v in res["ema"][0.10].items():
        assert torch.equal(store.read(10, 0.10, k), v), k
    return res


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_lightning_second_fit_on_the_same_trainer_continues_the_ema(tmp_path):
    # fit to step 6, then fit again on the same Trainer to step 10: the EMA reopens from its store
    _continued_run(tmp_path, "twice")


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_lightning_resumes_from_a_linked_last_checkpoint(tmp_path):
    # ModelCheckpoint(save_last="link"): last.ckpt is a link to the step checkpoint, whose EMA folder sits beside it
    _continued_run(tmp_path, "link")
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_symlink() and not (tmp_path / "ckpt" / "last.ckpt.dist_ema").exists()


@pytest.mark.timeout(300)
def test_lightning_second_fit_without_a_store_carries_the_ema_over():
    # one process, no store: the second fit() continues the in-memory EMA of the first
    L = pytest.importorskip("lightning")  # noqa: N806
    from dist_ema.integrations.lightning import PostHocEMACallback
    from tests.apps.lightning_app import Net, Recorder

    cb, rec, model = PostHocEMACallback(sigma_rels=SIGMAS), Recorder(), Net()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[cb, rec])
    trainer.fit(model)
    trainer.fit_loop.epoch_loop.max_steps = 7
    trainer.fit(model)
    assert len(rec.trajectory) == 7
    assert (cb.ema.step, cb.ema.t, cb.ema.updates) == (7, 7.0, 7)
    for s in SIGMAS:
        _check(cb.ema.full_state_dict(sigma_rel=s), rec.trajectory, s, "second fit")


# accelerate launch flags per plugin; on CPU the app helps Accelerate with FSDP and DeepSpeed (see the app)
ACCELERATE_MODES = {
    # "--multi_gpu" starts the processes with torchrun, Accelerator(cpu=True) joins them with gloo ("--cpu" on CPU
    # starts one process: several need MPI)
    "ddp": ["--multi_gpu"],
    # every Linear its own fully_shard unit, then the root
    "fsdp2": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
              "--fsdp_transformer_layer_cls_to_wrap", "Linear"],
    "zero2": ["--use_deepspeed", "--deepspeed_config_file", "{ds_config}"],
    "zero3": ["--use_deepspeed", "--deepspeed_config_file", "{ds_config}"],
}
# layout engine, fully_shard units, DTensor parameters
EXPECTED = {"ddp": ("replicated", 0, False), "fsdp2": ("fsdp2", 3, True), "zero2": ("zero2", 0, False),
            "zero3": ("zero3", 0, False)}


def _ema_checkpoint_is_per_rank(path, owned: list[int]) -> None:
    """The EMA in the state folder is a DCP checkpoint: one file per rank, and rank r's file holds exactly the
    elements rank r averages (for every profile), nothing gathered into one file."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    assert sorted(p.name for p in path.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    md = FileSystemReader(str(path)).read_metadata()
    stored = {"__0_0.distcp": 0, "__1_0.distcp": 0}
    for idx, where in md.storage_data.items():
        meta = md.state_dict_metadata[idx.fqn]
        if isinstance(meta, TensorStorageMetadata):
            stored[where.relative_path] += math.prod(meta.chunks[idx.index].sizes)
    assert [stored[f"__{r}_0.distcp"] for r in range(2)] == [n * len(SIGMAS) for n in owned], (stored, owned)


@pytest.mark.dist
@pytest.mark.timeout(600)
@pytest.mark.parametrize("plugin", list(ACCELERATE_MODES))
def test_accelerate_with_gradient_accumulation_and_save_load_state(tmp_path, plugin):
    pytest.importorskip("accelerate")
    if plugin.startswith("zero"):
        pytest.importorskip("deepspeed")
        # Accelerate's DeepSpeed plugin imports transformers when it is selected (even for a plain nn.Module)
        pytest.importorskip("transformers")
    app = str(ROOT / "tests" / "apps" / "accelerate_app.py")
    ds_config = tmp_path / "ds_config.json"
    # "auto": Accelerate fills in the batch size and Accelerator(gradient_accumulation_steps=2); persistence
    # threshold 0: ZeRO-3 partitions even these tiny parameters
    ds_config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": int(plugin[-1]) if plugin.startswith("zero") else 0,
                              "stage3_param_persistence_threshold": 0}}))
    mode = [x.format(ds_config=ds_config) for x in ACCELERATE_MODES[plugin]]
    launch = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    if plugin == "ddp":  # the resume in new processes
        runs = [_run([*launch, app, str(tmp_path), "a", plugin]), _run([*launch, app, str(tmp_path), "b", plugin])]
    else:  # one run (half the time): save_state, 3 abandoned steps, load_state, 4 steps
        runs = [_run([*launch, app, str(tmp_path), "ab", plugin])]
    assert not any("did not apply" in r.stderr for r in runs)  # attach_ema found the plugin applied
    a, b = (torch.load(tmp_path / f"{p}.pt", weights_only=True) for p in "ab")
    assert a["world"] == b["world"] == 2
    # the plugin really ran: Accelerate's distributed type, the engine dist-ema found, the sharding
    assert a["distributed_type"] == {"ddp": "MULTI_CPU", "fsdp2": "FSDP"}.get(plugin, "DEEPSPEED")
    assert (a["layout"], a["fsdp_units"], a["dtensor"]) == EXPECTED[plugin], a["engine"]
    assert a["partitioned"] == (plugin == "zero3")  # ZeRO-3: the module holds empty placeholders
    if plugin.startswith("zero"):
        assert a["engine"] == "DeepSpeedEngine" and a["gradient_accumulation"] == 2
    # every rank averages its own part of the 49 parameters, none all of them
    assert sum(a["owned"]) == a["numel"] == 49 and max(a["owned"]) < 49, a["owned"]
    _ema_checkpoint_is_per_rank(tmp_path / "state" / "dist_ema", a["owned"])
    assert len(a["trajectory"]) == 6 and a["clock"] == (6, 6.0, 6)
    for s in SIGMAS:
        _check(a["ema"][s], a["trajectory"], s, "phase a")
    # phase b: load_state brought the EMA back to step 6 bit for bit, and it continues over both phases' steps
    for s in SIGMAS:
        assert all(torch.equal(b["loaded"][s][k], a["ema"][s][k]) for k in a["ema"][s]), s
    full = a["trajectory"] + b["trajectory"]
    assert len(full) == 10 and b["clock"] == (10, 10.0, 10)
    for s in SIGMAS:
        _check(b["ema"][s], full, s, "after load_state")


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_accelerate_attach_ema_warns_when_accelerate_ignored_a_plugin():
    """Accelerator(cpu=True) ignores the FSDP plugin that ``accelerate launch --use_fsdp`` asks for (it sets
    ACCELERATE_USE_FSDP): attach_ema says so, once, and tracks the model as prepared; without the variable,
    nothing is said."""
    pytest.importorskip("accelerate")
    code = (
        "import os, sys, torch\n"
        "from accelerate import Accelerator\n"
        "from dist_ema.integrations.accelerate import attach_ema\n"
        "acc = Accelerator(cpu=True)\n"
        "model = acc.prepare(torch.nn.Linear(4, 2))\n"
        "for flag in ('true', 'false'):\n"
        "    os.environ['ACCELERATE_USE_FSDP'] = flag\n"
        "    print('--- ACCELERATE_USE_FSDP', flag, file=sys.stderr, flush=True)\n"
        "    ema = attach_ema(acc, model)\n"
        "    print('engine', ema.layout.engine, type(model).__name__)\n"
    )
    r = _run([sys.executable, "-c", code], FSDP_VERSION="2")
    ignored, plain = r.stderr.split("--- ACCELERATE_USE_FSDP true")[1].split("--- ACCELERATE_USE_FSDP false")
    lines = [x for x in ignored.splitlines() if "did not apply" in x]
    assert len(lines) == 1 and "ACCELERATE_USE_FSDP=true" in lines[0] and "distributed type NO" in lines[0], lines
    assert "did not apply" not in plain
    assert r.stdout.count("engine replicated Linear") == 2
