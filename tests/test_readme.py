"""The README as a newcomer meets it: every command block runs, and close() keeps the last updates.

The README-blocks test extracts every fenced block of README.md, runs the Python snippets
against a tiny model and the shell commands with tiny step counts (a short, explicit table
of substitutions below), and skips only what needs more than this machine (SKIPPED, with
the reason). A block that is neither run nor skipped fails the test, so a new block has to
be added here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dist_ema import PostHocEMA, open_store
from tests.dist_harness import ROOT, free_port, run_workers
from tests.engines import TinyNet, batch


def _train_steps(ema: PostHocEMA, model, opt, steps: int, rank: int = 0) -> None:
    for step in range(steps):
        x, y = batch(step, rank)
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update()


# ------------------------------------------------------------------------------- close()


def test_close_takes_a_final_snapshot_of_the_updates_after_the_last_one(tmp_path, caplog):
    url = str(tmp_path / "s")
    torch.manual_seed(0)
    m = TinyNet()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    ema = PostHocEMA(m, store=url, snapshot_every=10, writer="sync")
    _train_steps(ema, m, opt, 65)
    with caplog.at_level(logging.INFO, logger="dist_ema"):
        ema.close()
    assert [s.step for s in open_store(url).snapshots()] == [10, 20, 30, 40, 50, 60, 65]
    final = [r.getMessage() for r in caplog.records if "final snapshot" in r.getMessage()]
    assert len(final) == 1 and "step 65" in final[0] and "step 60" in final[0], final
    # the final snapshot is the EMA at step 65, bit for bit
    assert torch.equal(open_store(url).read(65, 0.05, "fc1.weight"), ema.full_state_dict(sigma_rel=0.05)["fc1.weight"])
    ema.close()  # idempotent: no second snapshot
    assert [s.step for s in open_store(url).snapshots()][-1] == 65


def test_close_final_snapshot_false_and_an_ema_that_did_not_move(tmp_path, caplog):
    torch.manual_seed(0)
    m = TinyNet()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    skip = str(tmp_path / "skip")
    ema = PostHocEMA(m, store=skip, snapshot_every=10, writer="sync")
    _train_steps(ema, m, opt, 65)
    ema.close(final_snapshot=False)
    assert [s.step for s in open_store(skip).snapshots()][-1] == 60

    still = str(tmp_path / "still")  # the last update is a snapshot step: nothing after it
    ema = PostHocEMA(m, store=still, snapshot_every=10, writer="sync")
    _train_steps(ema, m, opt, 60)
    with caplog.at_level(logging.INFO, logger="dist_ema"):
        ema.close()
    assert [s.step for s in open_store(still).snapshots()] == [10, 20, 30, 40, 50, 60]
    assert not [r for r in caplog.records if "final snapshot" in r.getMessage()]

    on_demand = str(tmp_path / "on_demand")  # no snapshot_every: the script decides, close() adds nothing
    ema = PostHocEMA(m, store=on_demand, writer="sync")
    _train_steps(ema, m, opt, 5)
    ema.snapshot()
    _train_steps(ema, m, opt, 3)
    ema.close()
    assert [s.step for s in open_store(on_demand).snapshots()] == [5]


def _two_ranks_worker(rank: int, world: int, out_dir: str, url: str) -> None:
    import json

    torch.manual_seed(0)
    m = torch.nn.parallel.DistributedDataParallel(TinyNet())
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("dist_ema").addHandler(handler)
    logging.getLogger("dist_ema").setLevel(logging.INFO)
    with PostHocEMA(m, store=url, snapshot_every=10) as ema:  # leaving the block closes it
        _train_steps(ema, m, opt, 65, rank)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump([x for x in records if "final snapshot" in x], f)


@pytest.mark.dist
def test_close_final_snapshot_on_two_ranks(tmp_path):
    import json

    url = str(tmp_path / "s")
    out = tmp_path / "out"
    out.mkdir()
    run_workers("tests.test_readme:_two_ranks_worker", world_size=2, out_dir=out,
                kwargs={"url": url}, timeout=180)
    assert [s.step for s in open_store(url).snapshots()] == [10, 20, 30, 40, 50, 60, 65]
    assert len(json.loads((out / "rank0.json").read_text())) == 1  # one INFO line, from rank 0
    assert json.loads((out / "rank1.json").read_text()) == []


@pytest.mark.dist
def test_at_exit_without_close_takes_no_final_snapshot(tmp_path):
    """At interpreter exit (no close()) the pending snapshots are committed as before, nothing more."""
    url = str(tmp_path / "s")
    code = textwrap.dedent(f"""
        import torch
        from dist_ema import PostHocEMA
        from tests.engines import TinyNet, batch
        torch.manual_seed(0)
        m = TinyNet()
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        ema = PostHocEMA(m, store={url!r}, snapshot_every=10)
        for step in range(65):
            x, y = batch(step, 0)
            (m(x) - y).pow(2).mean().backward(); opt.step(); opt.zero_grad(); ema.update()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [s.step for s in open_store(url).snapshots()] == [10, 20, 30, 40, 50, 60]
    assert "without ema.close()" in r.stderr


# ------------------------------------------------------------------------------- README blocks

README = (ROOT / "README.md").read_text()
BLOCKS = [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", README, re.S | re.M)]

# Blocks that are not run, and why (keep it short). Key: a piece of the block's text.
SKIPPED = {
    "bash launch/demo.sh": "installs into .venv and writes runs/demo and out/ in the checkout; "
                           "tests/test_launch.py runs launch/run_demo.py in short form",
    "bash launch/test.sh": "it is this test suite",
    "--rdzv-backend c10d": "multi-node",
    "deepspeed --num_gpus 8": "8 GPUs (tests/test_launch.py runs the DeepSpeed launcher on CPU)",
    "export AWS_ACCESS_KEY_ID=": "S3 with real credentials (the same flow runs against moto in the test suite)",
}
# Blocks that are text, not commands: checked by the test named
TEXT = {
    "weights        tracked recon. error": "test_readme_demo_block_is_the_demos_output",
    "<url>/dist_ema.json": "a diagram",
    "dist_ema/phema.py        the math": "a diagram",
    "target t = 100000\nsigma_rel": "test_readme_error_block_prints_its_output",
    "classic EMA betas at t = 100000": "test_readme_error_block_with_betas_prints_its_output",
    "[dist_ema]\nsigma_rels": "test_readme_toml_block_is_the_shipped_config",
    "from peft import LoraConfig": "tests/test_params.py::test_a_lora_adapter_exports_as_peft_files (the same "
                                   "flow on a tiny LoRA model; on 2 ranks: tests/test_params_dist.py)",
}
# Blocks that are run, by the test named
_CHAIN = "test_readme_training_loop_synthesis_and_reading"
RUN = {
    "for step, batch in enumerate(loader, start=1)": _CHAIN,
    "torchrun --nproc-per-node 4 -m dist_ema synthesize s3://bucket/run1": _CHAIN,
    "from safetensors.torch import load_file": _CHAIN,
    "from dist_ema import open_store": _CHAIN,
    "import torch.distributed.checkpoint as dcp": "test_readme_dcp_block",
    "dist_ema.load_synthesized(model,": "test_readme_sweep_block",
    "PostHocEMACallback": "test_readme_lightning_block",
    "attach_ema": "test_readme_accelerate_block",
    "python launch/lightning_train.py": "test_readme_lightning_example",
    "launch/accelerate_train.py": "test_readme_accelerate_example",
    "deepspeed.initialize": "test_readme_deepspeed_block",
    "load_config(\"configs/dist_ema.toml\")": "test_readme_config_block",
    "--plot profiles.png": "test_readme_error_block_prints_its_output",
    "--target-betas 0.9995": "test_readme_error_block_with_betas_prints_its_output",
    "# single node (the demo uses": "test_readme_underlying_commands",
    "ema.switch(sigma_rel=0.10)": "test_readme_offload_and_switch_block",
    "dist-ema import ema-pytorch ckpts": "tests/test_import.py::test_readme_import_block",
    "dist-ema import edm2 edm2-run": "tests/test_import_edm2.py::test_import_through_the_child",
}


def _block(key: str) -> str:
    found = [text for _, text in BLOCKS if key in text]
    assert len(found) == 1, f"{len(found)} README blocks hold {key!r}"
    return found[0]


def test_every_readme_block_is_run_or_listed():
    keys = {**SKIPPED, **TEXT, **RUN}
    for lang, text in BLOCKS:
        mine = [k for k in keys if k in text]
        assert mine, f"a README block that this file neither runs nor lists ({lang}):\n{text[:300]}"
    for k in keys:
        _block(k)  # each key names exactly one block


def _sub(text: str, subs: dict[str, str]) -> str:
    """Replace each key once at least: a substitution that no longer applies fails (the README changed)."""
    for old, new in subs.items():
        assert old in text, f"{old!r} is no longer in the README block:\n{text}"
        text = text.replace(old, new)
    return text


def _workdir(tmp_path) -> Path:
    """A folder like a checkout to run README commands in: launch/ and configs/ of this repository."""
    d = tmp_path / "work"
    d.mkdir()
    for name in ("launch", "configs"):
        (d / name).symlink_to(ROOT / name)
    return d


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _python(code: str, cwd: Path, timeout: float = 240, **env: str) -> dict:
    """Run a snippet (with its prelude) in a fresh interpreter; it prints one JSON line, returned here."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=str(cwd),
                       env=_env(**env))
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else {}


def _shell(command: str, cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout, cwd=str(cwd),
                       env=_env(**env))
    assert r.returncode == 0, f"{command}\nexit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def _commands(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [" ".join(x.split()) for x in joined.splitlines() if x.strip() and not x.lstrip().startswith("#")]


# a tiny model whose parameter names are the README's ("layers.0.attn.wq.weight")
TINY = textwrap.dedent("""
    import json, torch
    from torch import nn

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq = nn.Linear(8, 8)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attn()

    class TinyModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer()])
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            x = x.to(self.head.weight.dtype)
            return self.head(torch.tanh(self.layers[0].attn.wq(x)))

    torch.manual_seed(0)
    def batches(n):
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]

    def compute_loss(model, batch):
        x, y = batch
        return (model(x).float() - y).pow(2).mean()

    evaluated = []
    def evaluate(model):
        evaluated.append(float(compute_loss(model, batches(1)[0])))
""")


@pytest.mark.dist
def test_readme_training_loop_synthesis_and_reading(tmp_path):
    work = _workdir(tmp_path)
    store = str(work / "run1" / "snapshots")
    loop = _sub(_block(RUN_KEYS["loop"]), {
        "model = ...": "model = TinyModel()",
        "optimizer = ...": "optimizer = torch.optim.SGD(model.parameters(), lr=0.01)",
        '"s3://bucket/run1/snapshots"': repr(store),
    })
    out = _python(TINY + "loader = batches(5500)\n" + loop + textwrap.dedent("""
        from dist_ema import open_store
        print("RESULT", json.dumps({"steps": [s.step for s in open_store(ema.snapshots.io.url).snapshots()],
                                    "evaluated": len(evaluated)}))
    """), work)
    # the text under the snippet: 5,500 steps with snapshot_every=1000 end with a snapshot at 5500
    assert out == {"steps": [1000, 2000, 3000, 4000, 5000, 5500], "evaluated": 1}

    for cmd in _commands(_block(RUN_KEYS["synth"])):
        _shell(_sub(cmd, {"s3://bucket/run1/snapshots": store, "--nproc-per-node 4": "--nproc-per-node 2"})
               + " --no-progress", work)
    assert (work / "out" / "sigma_rel-0.1500" / "model.safetensors").is_file()

    load = _block(RUN_KEYS["load"])
    got = _python(TINY + "model = TinyModel()\n" + load + "\nprint('RESULT', json.dumps({'ok': True}))\n", work)
    assert got == {"ok": True}  # a strict load_state_dict of the synthesized weights

    read = _sub(_block(RUN_KEYS["read"]), {'"s3://bucket/run1/snapshots"': repr(store)})
    got = _python(TINY + read + "\nprint('RESULT', json.dumps({'shape': list(w.shape)}))\n", work)
    assert got == {"shape": [8, 8]}


RUN_KEYS = {
    "loop": "for step, batch in enumerate(loader, start=1)",
    "synth": "torchrun --nproc-per-node 4 -m dist_ema synthesize s3://bucket/run1",
    "load": "from safetensors.torch import load_file",
    "read": "from dist_ema import open_store",
}


@pytest.mark.dist
def test_readme_error_block_prints_its_output(tmp_path):
    (cmd,) = _commands(_block("--plot profiles.png"))
    r = _shell(cmd, tmp_path)
    printed = [x for x in r.stdout.splitlines() if not x.startswith("wrote ")]
    assert printed == _block("target t = 100000\nsigma_rel").splitlines()
    assert (tmp_path / "profiles.png").is_file()


@pytest.mark.dist
def test_readme_error_block_with_betas_prints_its_output(tmp_path):
    (cmd,) = _commands(_block("--target-betas 0.9995"))
    r = _shell(cmd, tmp_path)
    assert r.stdout.splitlines() == _block("classic EMA betas at t = 100000").splitlines()


def test_readme_toml_block_is_the_shipped_config():
    import tomllib

    from dist_ema.config import load_toml

    shown = tomllib.loads(_block("[dist_ema]\nsigma_rels"))
    assert shown["dist_ema"] == load_toml(ROOT / "configs" / "dist_ema.toml")["dist_ema"]


def test_readme_demo_block_is_the_demos_output():
    """The demo's table and summary as launch/run_demo.py prints them for those rows, and the prose says what they show.

    The numbers come from a real run (fixed seeds: the same on every run on one CPU and torch
    build); the demo itself runs in tests/test_launch.py, in short form.
    """
    sys.path.insert(0, str(ROOT / "launch"))
    from evaluate import Row, format_table
    from run_demo import summary

    lines = _block("weights        tracked recon. error").splitlines()
    rows = []
    for line in lines[2:]:
        m = re.match(r"(raw weights|sigma_rel=([\d.]+))\s+(yes\s+)?(-|[\d.]+%)\s+([\d.]+)\s+([\d.]+)%", line)
        if not m:
            break
        sr = None if m.group(2) is None else float(m.group(2))
        err = None if m.group(4) == "-" else float(m.group(4)[:-1]) / 100
        rows.append(Row(m.group(1), sr, err, float(m.group(5)), float(m.group(6)) / 100, tracked=bool(m.group(3))))
    assert len(rows) >= 3 and rows[0].sigma_rel is None, lines
    assert format_table(rows).splitlines() == lines[:len(rows) + 2]
    synth = [r for r in rows if r.sigma_rel is not None]
    best = min(synth, key=lambda r: r.loss)
    tracked = [r for r in synth if r.tracked]
    said = summary(best, rows[0], tracked).splitlines()  # after the table and one blank line
    assert lines[len(rows) + 2:len(rows) + 3 + len(said)] == ["", *said]
    # the sentences under the block quote the best row and how much it beats the tracked ones and the raw weights
    text = " ".join(README.split())
    top = min(tracked, key=lambda r: r.loss)
    assert not best.tracked and f"The best sigma_rel, {best.sigma_rel:.2f}, was never tracked" in text
    assert (f"({best.loss:.4f}) is {round(100 * (1 - best.loss / top.loss))}% below that of the best tracked "
            f"profile ({top.sigma_rel:.2f}, {top.loss:.4f}) and {round(100 * (1 - best.loss / rows[0].loss))}% "
            f"below that of the raw final weights ({rows[0].loss:.4f})") in text


def test_readme_config_table_is_the_field_docstrings():
    from dist_ema.config import field_docs

    rows = dict(re.findall(r"^\| `(\w+)` \| .*? \| .*? \| (.*) \|$", README, re.M))
    for name, doc in field_docs().items():
        assert rows.get(name) == " ".join(doc.split()).replace("``", "`"), name


@pytest.mark.dist
def test_readme_dcp_block(tmp_path):
    block = _block("import torch.distributed.checkpoint as dcp")
    out = _python(TINY + textwrap.dedent("""
        from dist_ema import PostHocEMA
        model = TinyModel()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        ema = PostHocEMA(model)
        for b in batches(3):
            compute_loss(model, b).backward(); opt.step(); opt.zero_grad(); ema.update()
        model_sd, optim_sd = model.state_dict(), {}
        before = ema.full_state_dict(sigma_rel=0.05)
    """) + block.split("\n")[0] + "\n" + block.split("\n")[1] + textwrap.dedent("""
        for b in batches(2):
            compute_loss(model, b).backward(); opt.step(); opt.zero_grad(); ema.update()
    """) + block.split("\n")[2] + textwrap.dedent("""
        after = ema.full_state_dict(sigma_rel=0.05)
        print("RESULT", json.dumps({"step": ema.step, "same": all(torch.equal(before[k], after[k]) for k in before)}))
    """), tmp_path)
    assert out == {"step": 3, "same": True}  # loaded back to the saved step, bit for bit


@pytest.mark.dist
def test_readme_sweep_block(tmp_path):
    """The sweep prints one line per sigma_rel; the model then holds the offline synthesis of the last one."""
    block = _sub(_block("dist_ema.load_synthesized(model,"), {"s3://bucket/run1/snapshots": "store"})
    out = _python(TINY + textwrap.dedent("""
        from dist_ema import PostHocEMA, synthesize
        from safetensors.torch import load_file
        model = TinyModel()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with PostHocEMA(model, store="store", snapshot_every=4, writer="sync") as ema:
            for b in batches(24):
                compute_loss(model, b).backward(); opt.step(); opt.zero_grad(); ema.update()
        def evaluate(m):
            return float(sum(compute_loss(m, b) for b in batches(2)))
    """) + block + textwrap.dedent("""
        synthesize("store", sigma_rels=[0.20], out="offline", progress=False)
        ref = load_file("offline/sigma_rel-0.2000/model.safetensors")
        same = all(torch.allclose(p, ref[n], rtol=1e-6, atol=1e-7) for n, p in model.named_parameters())
        print("RESULT", json.dumps({"same": same}))
    """), tmp_path)
    assert out == {"same": True}


@pytest.mark.dist
def test_readme_offload_and_switch_block(tmp_path):
    """The block runs as shown: 2,000 steps, two switches, 20 snapshots, the EMA in host memory."""
    block = _sub(_block("ema.switch(sigma_rel=0.10)"), {
        "ema = PostHocEMA(": "from dist_ema import PostHocEMA\nema = PostHocEMA(",
    })
    out = _python(TINY + textwrap.dedent("""
        model = TinyModel()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        loader = batches(2000)
    """) + block + textwrap.dedent("""
        from dist_ema import open_store
        print("RESULT", json.dumps({"switches": ema.switches, "device": str(ema.profiles[0].flat.device),
                                    "snapshots": len(open_store("runs/switch/snapshots").snapshots())}))
    """), tmp_path)
    assert out == {"switches": 2, "device": "cpu", "snapshots": 20}


@pytest.mark.dist
def test_readme_accelerate_block(tmp_path):
    block = _sub(_block("attach_ema"), {"...   # inside the loop": "pass   # inside the loop"})
    out = _python(TINY + textwrap.dedent("""
        from accelerate import Accelerator
        accelerator = Accelerator(cpu=True)
        model = TinyModel()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        loader = torch.utils.data.DataLoader(batches(4), batch_size=None)
    """) + block + "\nema.close()\nimport os\nprint('RESULT', json.dumps({'ckpt': os.path.isdir('ckpt/dist_ema')}))\n",
                  tmp_path)
    assert out == {"ckpt": True}


@pytest.mark.dist
def test_readme_lightning_block(tmp_path):
    block = _sub(_block("PostHocEMACallback"), {
        'L.Trainer(strategy="ddp",': 'L.Trainer(strategy="ddp", accelerator="cpu", devices=1, max_steps=8, '
                                     'logger=False, enable_checkpointing=False, enable_progress_bar=False, '
                                     'enable_model_summary=False,'})
    out = _python(TINY + textwrap.dedent("""
        import lightning as L
        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = TinyModel()
            def training_step(self, batch, i):
                return compute_loss(self.net, batch)
            def validation_step(self, batch, i):
                return compute_loss(self.net, batch)
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)
            def train_dataloader(self):
                return torch.utils.data.DataLoader(batches(32), batch_size=None)
        model = Module()
    """) + block + textwrap.dedent("""
        from dist_ema import open_store
        print("RESULT", json.dumps({"steps": [s.step for s in open_store("runs/x/snapshots").snapshots()]}))
    """), tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert out == {"steps": [8]}  # 8 optimizer steps (32 batches, 4 per step): close() snapshots them


@pytest.mark.dist
def test_readme_deepspeed_block(tmp_path):
    work = _workdir(tmp_path)
    block = _sub(_block("deepspeed.initialize"), {"s3://my-bucket/run2/snapshots": "run2/snapshots"})
    out = _python(TINY + textwrap.dedent("""
        import sys
        import deepspeed.comm.torch  # noqa: F401
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # as launch/train.py: no 60 s JIT build
        class WithLoss(TinyModel):
            def forward(self, batch):
                return (super().forward(batch[0]).float() - batch[1]).pow(2).mean()
        model = WithLoss()
        loader = batches(5)
    """) + block + textwrap.dedent("""
        from dist_ema import open_store
        print("RESULT", json.dumps({"steps": [s.step for s in open_store("run2/snapshots").snapshots()]}))
    """), work, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert out == {"steps": [5]}  # 5 steps, snapshot_every=1000: close() keeps them


@pytest.mark.dist
def test_readme_config_block(tmp_path):
    work = _workdir(tmp_path)
    out = _python(TINY + "import argparse\nmodel = TinyModel()\nargs = argparse.Namespace(store='cfg/snapshots')\n"
                  + _block('load_config("configs/dist_ema.toml")')
                  + "\nprint('RESULT', json.dumps({'every': ema.snapshots.config.snapshot_every}))\nema.close()\n",
                  work)
    assert out == {"every": 25}


@pytest.mark.dist
def test_readme_underlying_commands(tmp_path):
    work = _workdir(tmp_path)
    cmds = _commands(_block("# single node (the demo uses"))
    run = [c for c in cmds if not any(k in c for k in SKIPPED)]
    assert len(cmds) == 4 and len(run) == 2, cmds
    train, synth = run
    _shell(_sub(train, {"--store runs/exp1/snapshots": "--store runs/exp1/snapshots --steps 20 --snapshot-every 5"}),
           work)
    assert [s.step for s in open_store(str(work / "runs/exp1/snapshots")).snapshots()] == [5, 10, 15, 20]
    _shell(_sub(synth, {"--nproc-per-node 4": "--nproc-per-node 2"}) + " --no-progress", work)
    assert (work / "runs/exp1/synth/sigma_rel-0.1500/model.safetensors").is_file()


def _loss(line: str) -> float:
    return float(re.search(r"held-out loss (\S+)", line).group(1))


def _example_check(work: Path, stdout: str, name: str, run: str, prefix: str = "") -> None:
    """What an example printed against the store it wrote: the snapshot steps, and the held-out loss it
    printed for the sigma_rel 0.10 EMA against that snapshot's weights loaded here into a plain model."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "launch" / f"{name}.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    store = open_store(str(work / run / "snapshots"))
    assert [s.step for s in store.snapshots()] == [10, 20, 30, 40]
    assert f"stored snapshots (steps): [10, 20, 30, 40] in {run}/snapshots" in stdout, stdout
    net = example.make_net() if hasattr(example, "make_net") else example.make_model()
    net.load_state_dict({k: store.read(40, 0.10, prefix + k) for k in net.state_dict()})
    x, y = example.data(512, 2).tensors
    with torch.no_grad():
        want = torch.nn.functional.mse_loss(net(x), y).item()
    (line,) = [x for x in stdout.splitlines() if "EMA sigma_rel=0.10" in x]
    assert abs(_loss(line) - want) < 1e-4, (line, want)
    assert len(list((work / run / "synth").glob("sigma_rel-0.0700/model.safetensors"))) == 1


@pytest.mark.dist
def test_readme_lightning_example(tmp_path):
    work = _workdir(tmp_path)
    (cmd,) = _commands(_block("python launch/lightning_train.py"))
    r = _shell(cmd, work, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    _example_check(work, r.stdout, "lightning_train", "runs/lightning", prefix="net.")
    assert "Lightning DDP on 2 processes, 40 optimizer steps" in r.stdout
    assert sorted(p.name for p in (work / "runs/lightning/last.ckpt.dist_ema").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    # validation ran with the EMA swapped in, and the training weights came back after it: the raw weights'
    # loss (computed after fit) is not the EMA's
    (raw,) = [x for x in r.stdout.splitlines() if "raw weights" in x]
    (val,) = [x for x in r.stdout.splitlines() if "EMA sigma_rel=0.10" in x]
    assert abs(_loss(raw) - _loss(val)) > 1e-3, (raw, val)


@pytest.mark.dist
def test_readme_accelerate_example(tmp_path):
    work = _workdir(tmp_path)
    (cmd,) = _commands(_block("launch/accelerate_train.py"))
    cmd = _sub(cmd, {"--num_processes 2": f"--num_processes 2 --main_process_port {free_port()} --num_machines 1 "
                                         "--mixed_precision no --dynamo_backend no"})
    r = _shell(cmd, work)
    _example_check(work, r.stdout, "accelerate_train", "runs/accelerate")
    assert "MULTI_CPU on 2 processes, 40 optimizer steps" in r.stdout
    # sigma_rel 0.07, synthesized: swapped into the live model on 2 processes = the exported file in a plain module
    (swapped,) = [x for x in r.stdout.splitlines() if "EMA sigma_rel=0.07 (synthesized)" in x]
    (exported,) = [x for x in r.stdout.splitlines() if x.startswith("synthesized sigma_rel=0.07")]
    assert abs(_loss(swapped) - _loss(exported)) < 1e-4, (swapped, exported)
