"""DeepSpeed ZeRO-1/2/3 adapter on real engines: CPU, gloo, 2 and 3 ranks, real AdamW steps.

Each launch builds several engines one after another (fp32 and bf16, round robin,
offload...) because DeepSpeed start-up dominates the run time. Checks run inside the
workers (they need collectives); a failed check fails the launch with its traceback.

What is checked, per engine:
- the pieces of all ranks rebuild every full fp32 master bit-exactly, against
  ``deepspeed.utils.safe_get_full_fp32_param`` (not under round robin, where DeepSpeed
  0.19.8's mapping is wrong) and, cast to the model dtype, against the full working
  weights (also under round robin); owned pieces cover every element exactly once;
- some rank holds nothing of some param (uneven partitions);
- the sources are views: same data_ptr across steps, and views taken before training
  see the updated values after it;
- writing into ``load_target`` (and into ``source`` where there is no load_target) and
  calling ``after_load`` changes the engine's forward output to exactly that of a
  plain model holding the written weights.

Plus: ``round_robin_gradients`` (supported through the buffer mapping), skipped-step
detection with gradient accumulation and a bf16 overflow, CPU optimizer/param offload,
and the configurations the adapter refuses.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'dist-ema[deepspeed]')")

from dist_ema.sharding.base import ShardLayout, UnsupportedEngineError  # noqa: E402
from dist_ema.sharding.deepspeed import (  # noqa: E402
    deepspeed_layout,
    deepspeed_step_was_applied,
    is_deepspeed_engine,
)
from tests.dist_harness import ROOT, run_workers  # noqa: E402

SPEC = "tests.test_sharding_deepspeed"


# ---------------------------------------------------------------------------------------
# model, configs, engines
# ---------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Embedding, two Linears, a LayerNorm, a frozen param and a buffer.

    ``head.bias`` has one element, so under ZeRO-3 only rank 0 holds any of it; under
    ZeRO-1/2 the small params each sit in one or two ranks' partitions.
    """

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.fc1 = nn.Linear(5, 11)
        self.norm = nn.LayerNorm(11)
        self.head = nn.Linear(11, 1)
        self.shift = nn.Parameter(torch.linspace(-1.0, 1.0, 11), requires_grad=False)
        self.register_buffer("scale", torch.tensor([1.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.fc1(self.emb(x)))) + self.shift
        return self.head(h).squeeze(-1) * self.scale


def ds_config(stage: int, bf16: bool, gas: int = 1, **zero: object) -> dict:
    """The shipped example config of ``stage`` (0: stage 1's with stage 0) with test overrides."""
    cfg = json.loads((ROOT / "configs" / f"ds_zero{max(stage, 1)}.json").read_text())
    cfg["zero_optimization"]["stage"] = stage
    cfg["bf16"] = {"enabled": bf16}
    cfg["gradient_accumulation_steps"] = gas
    cfg["zero_optimization"].update(zero)
    return cfg


def build_engine(cfg: dict, seed: int = 0) -> Any:
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (``deepspeed.comm.torch`` the attribute is torch itself)

    # DeepSpeed's CPU backend JIT-compiles a shared-memory op (30-60 s, needs g++) that
    # only inference_all_reduce uses; training never touches it, so skip the build.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    torch.manual_seed(seed)
    model = TinyNet()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # two param groups (the usual decay / no-decay split): two flat buffers under ZeRO-1/2
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.01},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 7, (4, 3), generator=g)


def train_step(engine: Any, step: int, rank: int, poison: bool = False) -> bool:
    loss = engine(batch(step, rank)).float().pow(2).mean()
    if poison:
        loss = loss * float("inf")
    engine.backward(loss)
    engine.step()
    return deepspeed_step_was_applied(engine)


# ---------------------------------------------------------------------------------------
# collective checks (run inside the workers)
# ---------------------------------------------------------------------------------------


def gather_pieces(layout: ShardLayout) -> list[tuple[int, str, int, int, bool, torch.Tensor]]:
    import torch.distributed as dist

    mine = [(dist.get_rank(), p.fqn, p.flat_start, p.numel, p.owner, p.source.detach().float().cpu().clone())
            for p in layout.pieces]
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return [x for rank_pieces in every for x in rank_pieces]


def rebuild(layout: ShardLayout) -> tuple[dict[str, torch.Tensor], dict[str, set[int]]]:
    """Full fp32 tensors from all ranks' pieces; checks exact single coverage."""
    full: dict[str, torch.Tensor] = {}
    holders: dict[str, set[int]] = {fqn: set() for fqn in layout.params}
    cover: dict[str, torch.Tensor] = {}
    for rank, fqn, start, n, owner, vals in gather_pieces(layout):
        shape, _ = layout.params[fqn]
        numel = math.prod(shape)
        t = full.setdefault(fqn, torch.full((numel,), float("nan")))
        c = cover.setdefault(fqn, torch.zeros(numel, dtype=torch.int64))
        t[start:start + n] = vals
        c[start:start + n] += int(owner)
        holders[fqn].add(rank)
    for fqn, (shape, _) in layout.params.items():
        assert fqn in cover, f"no rank holds any of {fqn}"
        assert bool((cover[fqn] == 1).all()), f"{fqn}: owned pieces do not cover it once: {cover[fqn]}"
        full[fqn] = full[fqn].view(shape)
    return full, holders


def full_working_weights(engine: Any, stage: int) -> dict[str, torch.Tensor]:
    if stage in (1, 2):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def full_fp32_reference(engine: Any) -> dict[str, torch.Tensor]:
    """DeepSpeed's own full fp32 master of every trainable param (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            out[name] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
    return out


def pattern(fqn: str, numel: int) -> torch.Tensor:
    """Deterministic new weights for the load_target check."""
    idx = torch.arange(numel, dtype=torch.float64)
    return (torch.sin(idx * 0.37 + len(fqn)) * 0.5).float()


def check_engine(engine: Any, rank: int, ws: int, stage: int, bf16: bool, round_robin: bool = False) -> dict:
    """All layout checks on one freshly built engine; returns facts for the parent test."""
    import torch.distributed as dist

    dtype = torch.bfloat16 if bf16 else torch.float32
    layout0 = deepspeed_layout(engine)
    assert layout0.engine == f"zero{stage}"
    assert layout0.process_group is engine.optimizer.dp_process_group
    assert set(layout0.buffers) == {"scale"}
    assert set(layout0.params) == {n for n, _ in engine.module.named_parameters()}
    assert all(dt == dtype for _, dt in layout0.params.values())
    assert layout0.params["fc1.weight"][0] == (11, 5)
    no_frozen = deepspeed_layout(engine, include_frozen=False)
    assert "shift" not in no_frozen.params and all(p.fqn != "shift" for p in no_frozen.pieces)

    before = {(p.fqn, p.flat_start): p.source.detach().clone() for p in layout0.pieces}
    for step in range(3):
        assert train_step(engine, step, rank), "a plain step was reported as skipped"

    layout = layout0.refresh()
    key = lambda lay: [(p.fqn, p.flat_start, p.numel, p.owner, p.source.data_ptr()) for p in lay.pieces]
    assert key(layout) == key(layout0), "pieces or source storage changed across steps"
    for p0, p1 in zip(layout0.pieces, layout.pieces):
        assert torch.equal(p0.source, p1.source)
        if p0.fqn != "shift":
            stale = torch.equal(p0.source, before[(p0.fqn, p0.flat_start)])
            assert not stale, f"{p0.fqn}: a view taken before training missed the updates"
        if p1.load_target is not None:
            assert p1.source.dtype == torch.float32 and p1.load_target.dtype == dtype

    masters, holders = rebuild(layout)
    working = full_working_weights(engine, stage)
    for name, w in working.items():
        # The working weights are the fp32 master rounded to the model dtype.
        assert torch.equal(masters[name].to(dtype), w.cpu()), f"{name}: master does not match working weights"
    reference = full_fp32_reference(engine)
    mapping_bug = False
    for name, ref in reference.items():
        same = torch.equal(masters[name], ref)
        if round_robin:
            mapping_bug |= not same
        else:
            assert same, f"{name}: rebuilt master differs from safe_get_full_fp32_param"
    assert any(len(h) < ws for h in holders.values()), f"every rank holds part of every param: {holders}"

    # load_target: write new weights everywhere, re-sync, compare the forward with a plain model.
    x = batch(99, 0)
    with torch.no_grad():
        old_out = engine(x).detach().clone()
        for p in layout.pieces:
            new = pattern(p.fqn, p.global_numel)[p.flat_start:p.flat_end]
            (p.load_target if p.load_target is not None else p.source).copy_(new)
        layout.after_load()
        new_out = engine(x).detach().clone()
        ref_model = TinyNet()
        for name, q in ref_model.named_parameters():
            # DeepSpeed casts params (not buffers) to the model dtype
            q.data = pattern(name, q.numel()).view(q.shape).to(dtype)
        ref_out = ref_model(x)
    assert not torch.equal(old_out, new_out), "writing load_target did not change the forward output"
    assert torch.equal(new_out, ref_out), f"forward after load differs: {new_out} vs reference {ref_out}"
    dist.barrier()
    return {
        "holders": {k: sorted(v) for k, v in holders.items()},
        "pieces": [(p.fqn, p.flat_start, p.numel) for p in layout.pieces],
        "round_robin_hp_mapping_wrong": mapping_bug,
    }


def save(out_dir: str, rank: int, name: str, obj: object) -> None:
    Path(out_dir, f"{name}.rank{rank}.json").write_text(json.dumps(obj))


# ---------------------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------------------


def worker(rank: int, ws: int, out_dir: str, stage: int) -> None:
    """fp32 and bf16 engines of one ZeRO stage (plus round robin for stages 1/2)."""
    results = {}
    # ZeRO-3: the fp32 engine keeps the tiny params gathered (persistent, the default
    # threshold); the bf16 one partitions them all (threshold 0).
    bf16_extra = {"stage3_param_persistence_threshold": 0} if stage == 3 else {}
    results["fp32"] = check_engine(build_engine(ds_config(stage, False)), rank, ws, stage, False)
    results["bf16"] = check_engine(build_engine(ds_config(stage, True, **bf16_extra)), rank, ws, stage, True)
    if stage in (1, 2):
        for name, bf16 in (("rr_fp32", False), ("rr_bf16", True)):
            engine = build_engine(ds_config(stage, bf16, round_robin_gradients=True))
            results[name] = check_engine(engine, rank, ws, stage, bf16, round_robin=True)
    save(out_dir, rank, "results", results)


def skipped_steps_worker(rank: int, ws: int, out_dir: str) -> None:
    """gradient_accumulation_steps=2 and a bf16 overflow-skipped step, ZeRO-2 and ZeRO-3."""
    results = {}
    for stage in (2, 3):
        engine = build_engine(ds_config(stage, True, gas=2))
        layout = deepspeed_layout(engine)
        applied, changed, boundary_after = [], [], []
        # micro-steps 0,1 -> one optimizer step; 2 (poisoned: inf loss),3 -> overflow, skipped
        for micro in range(4):
            before = [p.source.clone() for p in layout.pieces]
            applied.append(train_step(engine, micro, rank, poison=(micro == 2)))
            boundary_after.append(bool(engine.is_gradient_accumulation_boundary()))
            changed.append(any(not torch.equal(b, p.source) for b, p in zip(before, layout.pieces)
                               if p.load_target is not None))
        results[f"zero{stage}"] = {"applied": applied, "changed": changed, "boundary_after": boundary_after,
                                   "skipped_steps": int(engine.skipped_steps)}
    save(out_dir, rank, "results", results)


def offload_worker(rank: int, ws: int, out_dir: str) -> None:
    """``offload_optimizer: {device: cpu}`` (and ZeRO-3 ``offload_param``) on a CPU machine."""
    results = {}
    off = {"offload_optimizer": {"device": "cpu"}}
    cases = ((2, True, {}), (1, False, {}), (3, True, {"offload_param": {"device": "cpu"}}))
    for stage, bf16, extra in cases:
        cfg = ds_config(stage, bf16, **off, **extra)
        cfg["zero_force_ds_cpu_optimizer"] = False
        results[f"zero{stage}"] = check_engine(build_engine(cfg), rank, ws, stage, bf16)
    save(out_dir, rank, "results", results)


def unsupported_worker(rank: int, ws: int, out_dir: str) -> None:
    """Configurations the adapter must refuse with a clear UnsupportedEngineError."""
    messages = {}
    cases = {
        "stage0": ds_config(0, False),
        # bf16 + ZeRO-1 + fp32 grad accumulation makes DeepSpeed use BF16_Optimizer.
        "bf16_optimizer": {**ds_config(1, True), "data_types": {"grad_accum_dtype": "fp32"}},
    }
    for name, cfg in cases.items():
        engine = build_engine(cfg)
        try:
            deepspeed_layout(engine)
        except UnsupportedEngineError as e:
            messages[name] = str(e)
        else:
            raise AssertionError(f"{name}: deepspeed_layout accepted an unsupported engine")
    try:
        deepspeed_layout(TinyNet())
    except UnsupportedEngineError as e:
        messages["not_engine"] = str(e)
    save(out_dir, rank, "results", messages)


def load(out_dir: Path, ws: int) -> list[dict]:
    return [json.loads((out_dir / f"results.rank{r}.json").read_text()) for r in range(ws)]


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------


@pytest.mark.dist
@pytest.mark.timeout(240)
@pytest.mark.parametrize("ws", [2, 3])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_layout_rebuilds_master_bit_exactly(tmp_path: Path, stage: int, ws: int) -> None:
    run_workers(f"{SPEC}:worker", ws, tmp_path, kwargs={"stage": stage})
    results = load(tmp_path, ws)
    for case in results[0]:
        holders = results[0][case]["holders"]
        if stage == 3:
            # head.bias (1 element): rank 0 holds it, the others nothing
            assert holders["head.bias"] == [0]
        assert any(len(h) < ws for h in holders.values())
    if stage in (1, 2):
        # round_robin_gradients really reorders the partitions (so the rr cases test a layout
        # of their own), which the adapter got bit-exactly right from the buffers
        assert results[0]["rr_fp32"]["holders"] != results[0]["fp32"]["holders"]
        # DeepSpeed 0.19.8's own _hp_mapping / safe_get_full_fp32_param are wrong there: recorded
        # (visible with -s), not asserted, so a DeepSpeed fix does not fail this test
        print({c: results[0][c]["round_robin_hp_mapping_wrong"] for c in ("rr_fp32", "rr_bf16")})


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_step_applied_with_grad_accumulation_and_overflow(tmp_path: Path) -> None:
    run_workers(f"{SPEC}:skipped_steps_worker", 2, tmp_path)
    for res in load(tmp_path, 2):
        for stage in ("zero2", "zero3"):
            r = res[stage]
            assert r["applied"] == [False, True, False, False], r
            # the fp32 masters change exactly on applied steps
            assert r["changed"] == r["applied"], r
            assert r["skipped_steps"] == 1, r
            # Why the adapter does not use is_gradient_accumulation_boundary(): read after
            # step() it already describes the next micro-step.
            assert r["boundary_after"] == [True, False, True, False], r


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_cpu_optimizer_offload(tmp_path: Path) -> None:
    run_workers(f"{SPEC}:offload_worker", 2, tmp_path)
    assert set(load(tmp_path, 2)[0]) == {"zero1", "zero2", "zero3"}


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_unsupported_engines_are_refused(tmp_path: Path) -> None:
    run_workers(f"{SPEC}:unsupported_worker", 2, tmp_path)
    msgs = load(tmp_path, 2)[0]
    assert "ZeRO stage 0 is not supported" in msgs["stage0"] and "DeepSpeed 0." in msgs["stage0"]
    assert "BF16_Optimizer" in msgs["bf16_optimizer"] and "grad_accum_dtype" in msgs["bf16_optimizer"]
    assert "expected a deepspeed.DeepSpeedEngine" in msgs["not_engine"]


@pytest.mark.dist
def test_is_deepspeed_engine_does_not_import_deepspeed() -> None:
    code = (
        "import sys, torch; from dist_ema.sharding.deepspeed import is_deepspeed_engine; "
        "assert not is_deepspeed_engine(torch.nn.Linear(2, 2)); "
        "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_is_deepspeed_engine_rejects_plain_modules() -> None:
    assert not is_deepspeed_engine(TinyNet())
    with pytest.raises(UnsupportedEngineError, match="expected a deepspeed.DeepSpeedEngine"):
        deepspeed_layout(TinyNet())


def test_one_deepspeed_detection() -> None:
    """make_layout and the adapter recognise a DeepSpeed engine by one rule: the real class or a subclass."""
    import deepspeed

    from dist_ema.sharding import detect

    assert detect.is_deepspeed_engine is is_deepspeed_engine

    class Sub(deepspeed.DeepSpeedEngine):  # e.g. the pipeline engine
        pass

    assert detect.detect_engine(object.__new__(Sub)) == "deepspeed"
    lookalike = type("DeepSpeedEngine", (), {"__module__": "deepspeed.fake"})()
    assert not is_deepspeed_engine(lookalike)
    with pytest.raises(UnsupportedEngineError, match="cannot track a deepspeed.fake.DeepSpeedEngine"):
        detect.detect_engine(lookalike)
