"""DeepSpeed pipeline and tensor parallelism on real engines: CPU, gloo, 4 ranks, real AdamW steps.

PipelineEngine: a ``PipelineModule`` of 2 stages x 2 data-parallel ranks under ZeRO-1, with an
embedding tied (``TiedLayerSpec``) to the head, so the first and the last stage both hold it.
AutoTP: ``"tensor_parallel": {"autotp_size": 2}`` x 2 data-parallel ranks under ZeRO-1, a
column-parallel and a row-parallel Linear (N-d boxes) beside replicated norms and heads.

What is checked, against values computed here from the engine's own full fp32 parameters
(``deepspeed.utils.safe_get_full_fp32_param`` per stage or per tensor-parallel slice, gathered
across the world; the slices joined along the dimension this file's partition config names):
- the tracked EMA == a brute-force EMA of the gathered trajectory (telescoped betas);
- the tied weight's copies on the two stages stay bit-identical (why one owner suffices);
- every snapshot reads back == ``ema.full_state_dict`` when it was taken (bitwise);
- synthesis on the 4 training ranks == synthesis at 1 rank here (bitwise), == brute force for the tracked target;
- a 1-rank plain module with the same parameter names resumed from the store == the last snapshot.
Plus: model parallelism through an ``engine.mpu`` DeepSpeed does not describe is refused clearly.
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'dist-ema[deepspeed]')")

from tests.dist_harness import run_workers  # noqa: E402
from tests.test_topologies import brute_ema, reconstruct  # noqa: E402

pytestmark = pytest.mark.dist

SPEC = "tests.test_sharding_deepspeed_pipe"
SIGMAS = (0.05, 0.10)
TARGETS = (0.10, 0.15)  # synthesized: one tracked, one not
STEPS, EVERY = 4, 2
VOCAB, DIM, HID = 7, 6, 10


def _no_shm_build() -> None:
    import deepspeed.comm.torch  # noqa: F401  (``deepspeed.comm.torch`` the attribute is torch itself)

    # DeepSpeed's CPU backend JIT-compiles a shared-memory op (30-60 s, needs g++) that only
    # inference_all_reduce uses; training never touches it, so skip the build.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


# ----------------------------------------------------------------------------- pipeline model


def _head(embedding: nn.Embedding, h: torch.Tensor) -> torch.Tensor:
    """The tied head: logits against the embedding matrix."""
    return h @ embedding.weight.t()


def pipe_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out.mean(-1) - y) ** 2).mean()


def pipe_specs() -> list:
    """Embedding (tied to the head), Linear, Tanh, LayerNorm, Linear, head: names "tied_modules.embed.weight",
    "1.weight", "3.weight", "4.weight", ... (stage modules keep the global layer indices)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    return [
        TiedLayerSpec("embed", nn.Embedding, VOCAB, DIM, tied_weight_attr="weight"),
        LayerSpec(nn.Linear, DIM, HID),
        LayerSpec(nn.Tanh),
        LayerSpec(nn.LayerNorm, HID),
        LayerSpec(nn.Linear, HID, DIM),
        TiedLayerSpec("embed", nn.Embedding, VOCAB, DIM, forward_fn=_head, tied_weight_attr="weight"),
    ]


def plain_pipe_model() -> nn.Module:
    """The pipeline model's parameters, under the same names, in one plain module."""
    layers = [nn.Identity(), nn.Linear(DIM, HID), nn.Tanh(), nn.LayerNorm(HID), nn.Linear(HID, DIM), nn.Identity()]
    seq = nn.Sequential(OrderedDict((str(i), m) for i, m in enumerate(layers)))
    seq.tied_modules = nn.ModuleDict({"embed": nn.Embedding(VOCAB, DIM)})
    return seq


def pipe_data(dp_rank: int):
    i = 0
    while True:
        g = torch.Generator().manual_seed(1000 * i + dp_rank)
        i += 1
        yield torch.randint(0, VOCAB, (2, 3), generator=g), torch.randn(2, 3, generator=g)


def build_pipe() -> Any:
    import deepspeed
    from deepspeed.pipe import PipelineModule

    _no_shm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    net = PipelineModule(layers=pipe_specs(), num_stages=2, loss_fn=pipe_loss, partition_method="uniform")
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
           "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9}
    opt = torch.optim.AdamW(net.parameters(), lr=0.02)
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)
    return engine


def full_fp32(engine: Any) -> dict[str, list[torch.Tensor]]:
    """Every rank's full fp32 master of each parameter it holds (its stage's, or its tensor-parallel slice)."""
    from deepspeed.utils import safe_get_full_fp32_param

    mine = {n: safe_get_full_fp32_param(p).detach().double().clone() for n, p in engine.module.named_parameters()}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    out: dict[str, list[torch.Tensor]] = {}
    for part in everyone:
        for k, v in part.items():
            out.setdefault(k, []).append(v)
    return out


def same_everywhere(copies: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    for k, vs in copies.items():
        assert all(torch.equal(v, vs[0]) for v in vs), f"the ranks' copies of {k} differ"
    return {k: vs[0] for k, vs in copies.items()}


# ----------------------------------------------------------------------------- AutoTP model


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(DIM, HID)  # column parallel: weight and bias split along dim 0
        self.down_proj = nn.Linear(HID, DIM)  # row parallel: weight split along dim 1, bias whole

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.tanh(self.up_proj(x)))


class TPNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block()])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.layers[0](x))).squeeze(-1)


TP_SPLIT = {"layers.0.up_proj.weight": 0, "layers.0.up_proj.bias": 0, "layers.0.down_proj.weight": 1}
TP_CONFIG = {"autotp_size": 2, "partition_config": {"use_default_specs": False, "layer_specs": [
    {"patterns": [r".*\.down_proj\.weight$"], "partition_type": "row"},
    {"patterns": [r".*\.up_proj\.weight$"], "partition_type": "column"}]}}


def build_tp() -> Any:
    import deepspeed

    _no_shm_build()
    torch.manual_seed(0)
    net = TPNet()
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1},
           "tensor_parallel": TP_CONFIG, "steps_per_print": 10 ** 9}
    opt = torch.optim.AdamW(net.parameters(), lr=0.02)
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)
    return engine


def tp_full(engine: Any, tp: int) -> dict[str, torch.Tensor]:
    """Full parameters from every rank's slice: ranks r, r+1 (one tensor-parallel group) hold the slices in order."""
    copies = full_fp32(engine)
    out = {}
    for k, vs in copies.items():
        groups = [vs[i:i + tp] for i in range(0, len(vs), tp)]
        joined = [torch.cat(g, dim=TP_SPLIT[k]) if k in TP_SPLIT else g[0] for g in groups]
        out.update(same_everywhere({k: joined + ([] if k in TP_SPLIT else [v for g in groups for v in g])}))
    return out


def tp_step(engine: Any, step: int) -> None:
    g = torch.Generator().manual_seed(step)  # the tensor-parallel ranks must see the same batch
    dp = engine.mpu.get_data_parallel_rank()
    x = torch.randn(2 + dp, DIM, generator=g)
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()


# ----------------------------------------------------------------------------- workers


def track(rank: int, engine: Any, url: str, step, full) -> dict:
    """Train STEPS steps under PostHocEMA; the record rank 0 saves."""
    from dist_ema import PostHocEMA

    ema = PostHocEMA(engine, sigma_rels=SIGMAS, store=url, snapshot_every=EVERY, writer="sync")
    rec: dict = {"traj": [], "snaps": {}, "boxes": sorted({p.fqn for p in ema.pieces if p.box is not None})}
    for i in range(STEPS):
        step(i)
        assert ema.update(), "an applied optimizer step was not taken by the EMA"
        rec["traj"].append(full())
        if ema.updates % EVERY == 0:
            rec["snaps"][ema.step] = {s: ema.full_state_dict(sigma_rel=s) for s in SIGMAS}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rec["boxes"])
    rec["boxes"] = sorted({f for part in everyone for f in part})
    ema.close()
    return rec


def pipe_worker(rank: int, ws: int, out_dir: str, url: str) -> None:
    from dist_ema import synthesize

    engine = build_pipe()
    it = pipe_data(engine.grid.get_data_parallel_rank())
    names = {n for n, _ in engine.module.named_parameters()}
    everyone: list = [None] * ws
    dist.all_gather_object(everyone, (engine.grid.get_stage_id(), sorted(names)))
    rec = track(rank, engine, url, lambda i: engine.train_batch(it), lambda: same_everywhere(full_fp32(engine)))
    rec["stages"] = everyone
    synthesize(url, sigma_rels=list(TARGETS), out=f"{out_dir}/synth", progress=False)
    if rank == 0:
        torch.save(rec, f"{out_dir}/rec.pt")


def tp_worker(rank: int, ws: int, out_dir: str, url: str) -> None:
    from dist_ema import synthesize

    engine = build_tp()
    rec = track(rank, engine, url, lambda i: tp_step(engine, i), lambda: tp_full(engine, 2))
    synthesize(url, sigma_rels=list(TARGETS), out=f"{out_dir}/synth", progress=False)
    if rank == 0:
        torch.save(rec, f"{out_dir}/rec.pt")
    refused_worker(rank, ws, out_dir)


def refused_worker(rank: int, ws: int, out_dir: str) -> None:
    """Megatron-style model parallelism through ``mpu``: DeepSpeed records nothing of the slices."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

    from dist_ema import PostHocEMA
    from dist_ema.sharding.base import UnsupportedEngineError

    _no_shm_build()
    mpu = PipelineParallelGrid(topology=PipeModelDataParallelTopology(num_pp=1, num_mp=2, num_dp=ws // 2))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(DIM, HID), nn.Linear(HID, 1))
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters()), config=cfg, mpu=mpu)
    try:
        PostHocEMA(engine, sigma_rels=SIGMAS)
    except UnsupportedEngineError as e:
        message = str(e)
    else:
        raise AssertionError("an engine with Megatron-style model parallelism (mpu) was accepted")
    if rank == 0:
        (Path(out_dir) / "refused.json").write_text(json.dumps({"mpu": message}))


# ----------------------------------------------------------------------------- checks


def check_run(out_dir: Path, url: str, plain: nn.Module) -> dict:
    """Track, snapshot read-back, synthesis at 4 ranks vs 1 rank and vs brute force, 1-rank plain resume."""
    from safetensors.torch import load_file

    from dist_ema import PostHocEMA, open_store, synthesize
    from dist_ema.synthesis import target_folder

    rec = torch.load(out_dir / "rec.pt")
    traj, snaps = rec["traj"], rec["snaps"]
    names = sorted(traj[0])
    assert sorted(snaps) == [2, 4] and len(traj) == STEPS, sorted(snaps)
    assert sorted(n for n, _ in plain.named_parameters()) == names
    for t, snap in snaps.items():
        for s in SIGMAS:
            assert sorted(snap[s]) == names, sorted(snap[s])
            ref = brute_ema(traj[:t], s)
            for k in names:
                torch.testing.assert_close(snap[s][k].double(), ref[k], rtol=2e-5, atol=2e-6,
                                           msg=f"tracked EMA {k} sigma_rel={s} at step {t}")
    store = open_store(url)
    listed = store.snapshots()
    assert [x.step for x in listed] == [2, 4] and listed[-1].world_size == 4
    for x in listed:
        for s in SIGMAS:
            for k in names:
                assert torch.equal(store.read(x.step, s, k), snaps[x.step][s][k]), ("read back", x.step, s, k)
    here = out_dir / "synth-1"
    synthesize(url, sigma_rels=list(TARGETS), out=str(here), progress=False)
    for s in TARGETS:
        theirs = load_file(str(out_dir / "synth" / target_folder(s) / "model.safetensors"))
        mine = load_file(str(here / target_folder(s) / "model.safetensors"))
        assert sorted(mine) == names
        ref = brute_ema(traj, s) if s in SIGMAS else reconstruct(snaps, s, float(listed[-1].t))
        for k in names:
            assert torch.equal(theirs[k], mine[k]), ("synthesis differs between 4 ranks and 1", s, k)
            torch.testing.assert_close(mine[k].double(), ref[k], rtol=1e-4, atol=1e-5, msg=f"synthesized {k} {s}")
    ema = PostHocEMA(plain, sigma_rels=SIGMAS, store=url, resume=True, writer="sync")
    try:
        assert ema.step == STEPS, ema.step
        for s in SIGMAS:
            got = ema.full_state_dict(sigma_rel=s)
            for k in names:
                assert torch.equal(got[k], snaps[STEPS][s][k]), ("1-rank resume", s, k)
    finally:
        ema.close()
    return {"rec": rec, "layout": store.layout(listed[-1]), "version": listed[-1].version}


@pytest.mark.timeout(240)
def test_pipeline_engine_zero1_two_stages_tied_embedding(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    run_workers(f"{SPEC}:pipe_worker", 4, tmp_path, kwargs={"url": url})
    got = check_run(tmp_path, url, plain_pipe_model())
    stages = got["rec"]["stages"]
    # 2 stages x 2 data-parallel ranks; stage modules keep the global layer indices; the tied
    # embedding/head is one parameter, held by both stages
    assert sorted({s for s, _ in stages}) == [0, 1], stages
    first = next(n for s, n in stages if s == 0)
    last = next(n for s, n in stages if s == 1)
    assert "tied_modules.embed.weight" in first and "tied_modules.embed.weight" in last, stages
    assert set(first) & set(last) == {"tied_modules.embed.weight"}, stages
    assert "1.weight" in first and "4.weight" in last, stages
    assert got["rec"]["boxes"] == []
    # the tied weight is written by the first stage only (the stage DeepSpeed counts it on), even
    # where both stages hold the same ZeRO ranges of it
    lay = got["layout"]
    writers = {r for r, pieces in enumerate(lay.ranks) for p, *_ in pieces
               if lay.params[p][0] == "tied_modules.embed.weight"}
    assert writers and writers <= {r for r, (s, _) in enumerate(stages) if s == 0}, (writers, stages)


@pytest.mark.timeout(240)
def test_autotp_zero1_boxes_and_unsupported_mpu(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    run_workers(f"{SPEC}:tp_worker", 4, tmp_path, kwargs={"url": url})
    got = check_run(tmp_path, url, TPNet())
    # the split weights are boxes (column and row blocks), the rest whole: snapshot format 3
    assert got["rec"]["boxes"] == sorted(TP_SPLIT), got["rec"]["boxes"]
    assert got["layout"].has_boxes and got["version"] == 3
    msg = json.loads((tmp_path / "refused.json").read_text())["mpu"]
    assert "engine.mpu" in msg and "2-way model parallel" in msg and "autotp_size" in msg, msg
    assert "DeepSpeed 0." in msg, msg
