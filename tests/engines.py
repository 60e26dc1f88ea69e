"""Real training setups for multi-process tests: one tiny model under every supported engine.

    setup = build("fsdp2", seed=0)          # inside a gloo worker
    for _ in range(n): setup.step()
    full = setup.full_params()             # {fqn: float64 full tensor}, on every rank

Shapes are chosen so that 3 ranks give uneven shards and some ranks hold nothing of a
parameter (``head.weight`` has one row; ``head.bias`` one element).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

ENGINES = ("replicated", "ddp", "fsdp2", "fsdp2_bf16", "fsdp1", "fsdp1_flat", "zero1", "zero2", "zero3")
# Variants whose every FSDP unit (not only the root) keeps its unsharded parameters after
# forward: FSDP2 with reshard_after_forward=False, FSDP1 SHARD_GRAD_OP (use_orig_params=True).
KEEP_UNSHARDED = ("fsdp2_keep", "fsdp1_grad_op")
# Replicated-shard layouts on a 2-d (replicate, shard) mesh: ``build(..., mesh_shape=(R, S))``.
# FSDP2 HSDP, FSDP1 HYBRID_SHARD and _HYBRID_SHARD_ZERO2; FSDP1 NO_SHARD needs no mesh.
HYBRID = ("fsdp2_hsdp", "fsdp1_hybrid", "fsdp1_hybrid_zero2")
# Layouts of training at scale (DTensor boxes), ``build(..., mesh_shape=...)``:
#   fsdp2_tp (dp, tp): FSDP2 on dp x tensor parallel on tp (emb row-, fc1 column-, fc2 row-parallel;
#       norm and head replicated over tp); hsdp_tp (replicate, shard, tp): HSDP x tensor parallel;
#   fsdp2_shard1 (no mesh): fully_shard with Shard(1) on every matrix whose dim 1 splits evenly;
#   fsdp2_cp (dp, cp): FSDP2 on dp, parameters replicated over cp; fsdp2_dp_cp (dp, cp): FSDP2 over the
#       flattened dp x cp axis (torchtitan's dp_shard_cp);
#   pp_fsdp2 (pp, dp): 4 pipeline stages (emb | fc1, norm | fc2 | head), 2 per rank (interleaved:
#       pp coordinate c holds stages c and c + 2), each stage FSDP2 on dp.
# Ranks that share a dp coordinate (tp, cp) train on the same batches, as they do in real runs.
ND = ("fsdp2_tp", "hsdp_tp", "fsdp2_shard1", "fsdp2_cp", "fsdp2_dp_cp", "pp_fsdp2")


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.fc1 = nn.Linear(6, 10)
        self.norm = nn.LayerNorm(10)
        self.fc2 = nn.Linear(10, 5)
        self.head = nn.Linear(5, 1)
        self.register_buffer("scale", torch.ones(1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(self.emb(idx)))
        return self.head(self.fc2(self.norm(h))).squeeze(-1) * self.scale


def batch(step: int, rank: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 7, (n,), generator=g), torch.randn(n, generator=g)


@dataclass
class Setup:
    engine: str
    model: nn.Module  # the module as wrapped by the engine
    target: object  # what PostHocEMA receives
    step: Callable[[], None]
    full_params: Callable[[], dict[str, torch.Tensor]]
    steps_done: int = 0
    optimizer: object = None  # the torch optimizer (under DeepSpeed: the one its ZeRO optimizer wraps)


def _mesh(mesh_shape: tuple[int, int] | None):
    from torch.distributed.device_mesh import init_device_mesh

    if mesh_shape is None:
        raise ValueError("hybrid engines need mesh_shape=(replicas, shards)")
    return init_device_mesh("cpu", tuple(mesh_shape), mesh_dim_names=("replicate", "shard"))


def build(engine: str, seed: int = 0, lr: float = 0.05, grad_accum: int = 1,
          mesh_shape: tuple[int, int] | None = None) -> Setup:
    """Build TinyNet under ``engine`` on the current gloo process group.

    ``mesh_shape`` = (replicas, shards) for the engines in ``HYBRID``; ranks r*S .. r*S+S-1
    form replica r (the replicate axis is the outer one, as across nodes).
    """
    torch.manual_seed(seed)
    net = TinyNet()
    rank = dist.get_rank() if dist.is_initialized() else 0
    counter = {"n": 0}

    if engine.startswith("zero"):
        import sys

        import deepspeed
        import deepspeed.comm.torch  # noqa: F401  (the attribute deepspeed.comm.torch is torch itself)

        # deepspeed.initialize JIT-builds a shared-memory op on CPU (~60 s, needs g++); only inference
        # all-reduce uses it, so the tests skip the build
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        stage = int(engine[-1])
        cfg = {
            "train_micro_batch_size_per_gpu": 8,
            "gradient_accumulation_steps": grad_accum,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        opt = torch.optim.AdamW(net.parameters(), lr=lr)
        eng, *_ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)

        def step() -> None:
            for _ in range(grad_accum):
                x, y = batch(counter["n"], rank)
                counter["n"] += 1
                loss = ((eng(x) - y) ** 2).mean()
                eng.backward(loss)
                eng.step()

        def full() -> dict[str, torch.Tensor]:
            from deepspeed.utils import safe_get_full_fp32_param

            return {n: safe_get_full_fp32_param(p).detach().double().clone() for n, p in eng.module.named_parameters()}

        return Setup(engine, eng.module, eng, step, full, optimizer=getattr(eng.optimizer, "optimizer", opt))

    if engine in ("fsdp2", "fsdp2_bf16", "fsdp2_keep", "fsdp2_hsdp"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if engine == "fsdp2_bf16" else MixedPrecisionPolicy()
        keep = {"reshard_after_forward": False} if engine == "fsdp2_keep" else {}
        if engine == "fsdp2_hsdp":
            keep = {"mesh": _mesh(mesh_shape)}
        fully_shard(net.fc1, mp_policy=mp, **keep)
        fully_shard(net.fc2, mp_policy=mp, **keep)
        fully_shard(net, mp_policy=mp, **({"mesh": keep["mesh"]} if engine == "fsdp2_hsdp" else {}))
        model = net

        def full() -> dict[str, torch.Tensor]:
            return {n: p.full_tensor().detach().double().clone() for n, p in model.named_parameters()}

    elif engine in ("fsdp1", "fsdp1_flat", "fsdp1_grad_op", "fsdp1_hybrid", "fsdp1_hybrid_zero2", "fsdp1_no_shard"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy

        opts = dict(use_orig_params=(engine != "fsdp1_flat"), device_id=torch.device("cpu"))
        if engine == "fsdp1_grad_op":
            opts["sharding_strategy"] = ShardingStrategy.SHARD_GRAD_OP
        if engine == "fsdp1_no_shard":
            opts["sharding_strategy"] = ShardingStrategy.NO_SHARD
        if engine in ("fsdp1_hybrid", "fsdp1_hybrid_zero2"):
            hybrid = ShardingStrategy.HYBRID_SHARD if engine == "fsdp1_hybrid" else ShardingStrategy._HYBRID_SHARD_ZERO2
            opts.update(sharding_strategy=hybrid, device_mesh=_mesh(mesh_shape))
        net.fc1 = FSDP(net.fc1, **opts)
        model = FSDP(net, **opts)

        def full() -> dict[str, torch.Tensor]:
            with FSDP.summon_full_params(model, writeback=False):
                return {
                    n.replace("_fsdp_wrapped_module.", ""): p.detach().double().clone()
                    for n, p in model.named_parameters()
                }

    elif engine == "ddp":
        model = nn.parallel.DistributedDataParallel(net)

        def full() -> dict[str, torch.Tensor]:
            return {n: p.detach().double().clone() for n, p in model.module.named_parameters()}

    elif engine == "replicated":
        model = net

        def full() -> dict[str, torch.Tensor]:
            return {n: p.detach().double().clone() for n, p in model.named_parameters()}

    elif engine in ND:
        return _build_nd(engine, net, lr, mesh_shape, counter)
    else:
        raise ValueError(engine)

    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step() -> None:
        x, y = batch(counter["n"], rank)
        counter["n"] += 1
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if engine == "replicated" and dist.is_initialized():  # plain module: average grads by hand
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        opt.step()
        opt.zero_grad()

    return Setup(engine, model, model, step, full, optimizer=opt)


def _build_nd(engine: str, net: TinyNet, lr: float, mesh_shape, counter: dict) -> Setup:
    """The layouts of training at scale (see ``ND``) on TinyNet."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    def tp_plan(mesh) -> None:
        parallelize_module(net, mesh, {
            "emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "fc1": ColwiseParallel(output_layouts=Replicate()),
            "fc2": RowwiseParallel(input_layouts=Replicate()),
        })

    def shard(mod, mesh, **kw) -> None:
        fully_shard(mod.fc1, mesh=mesh, **kw)
        fully_shard(mod.fc2, mesh=mesh, **kw)
        fully_shard(mod, mesh=mesh, **kw)

    data_rank = dist.get_rank()
    if engine == "fsdp2_tp":
        mesh = init_device_mesh("cpu", tuple(mesh_shape), mesh_dim_names=("dp", "tp"))
        tp_plan(mesh["tp"])
        shard(net, mesh["dp"])
        data_rank = mesh["dp"].get_local_rank()
    elif engine == "hsdp_tp":
        mesh = init_device_mesh("cpu", tuple(mesh_shape), mesh_dim_names=("replicate", "shard", "tp"))
        tp_plan(mesh["tp"])
        shard(net, mesh["replicate", "shard"])
        data_rank = mesh["replicate"].get_local_rank() * mesh_shape[1] + mesh["shard"].get_local_rank()
    elif engine == "fsdp2_shard1":
        ws = dist.get_world_size()  # FSDP2 needs even splits on dim 1
        shard(net, None, shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 and p.shape[1] % ws == 0 else Shard(0))
    elif engine == "fsdp2_cp":
        mesh = init_device_mesh("cpu", tuple(mesh_shape), mesh_dim_names=("dp", "cp"))
        shard(net, mesh["dp"])
        data_rank = mesh["dp"].get_local_rank()
    elif engine == "fsdp2_dp_cp":
        mesh = init_device_mesh("cpu", tuple(mesh_shape), mesh_dim_names=("dp", "cp"))
        shard(net, mesh["dp", "cp"]._flatten("dp_cp"))
        data_rank = mesh["dp"].get_local_rank()
    if engine != "pp_fsdp2":
        model = net
        opt = torch.optim.AdamW(model.parameters(), lr=lr)

        def step() -> None:
            x, y = batch(counter["n"], data_rank)
            counter["n"] += 1
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()

        def full() -> dict[str, torch.Tensor]:
            return {n: p.full_tensor().detach().double().clone() for n, p in model.named_parameters()}

        return Setup(engine, model, model, step, full, optimizer=opt)

    # pipeline: stage modules keep the full model's names (the other stages' modules deleted)
    mesh = init_device_mesh("cpu", tuple(mesh_shape), mesh_dim_names=("pp", "dp"))
    pp, dp = mesh["pp"].get_local_rank(), mesh["dp"]
    keep = [["emb"], ["fc1", "norm"], ["fc2"], ["head"]]
    stages = []
    for s in (pp, pp + 2):
        stage = copy.deepcopy(net)
        for name in ["emb", "fc1", "norm", "fc2", "head"]:
            if name not in keep[s]:
                delattr(stage, name)
        if "head" not in keep[s]:
            del stage.scale  # a buffer of the last stage only: snapshots gather it from there
        for name in keep[s]:
            fully_shard(getattr(stage, name), mesh=dp)
        fully_shard(stage, mesh=dp)
        stages.append(stage)
    params = [p for st in stages for p in st.parameters()]
    opt = torch.optim.AdamW(params, lr=lr)
    widths = {"emb": None, "fc1": 6, "norm": 10, "fc2": 10, "head": 5}

    def run_stage(stage: nn.Module, s: int, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        first = keep[s][0]
        h = getattr(stage, first)(x if first == "emb" else torch.randn(x.shape[0], widths[first], generator=g))
        for name in keep[s][1:]:
            h = getattr(stage, name)(h)
        return h

    def step() -> None:
        x, y = batch(counter["n"], dp.get_local_rank())
        g = torch.Generator().manual_seed(counter["n"])
        counter["n"] += 1
        outs = [run_stage(st, s, x, g) for st, s in zip(stages, (pp, pp + 2))]
        loss = sum(((h.float() - y.unsqueeze(-1)) ** 2).mean() for h in outs)
        loss.backward()
        opt.step()
        opt.zero_grad()

    def full() -> dict[str, torch.Tensor]:
        mine = {n: p.full_tensor().detach().double().clone() for st in stages for n, p in st.named_parameters()}
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return {k: v for part in everyone for k, v in part.items()}

    return Setup(engine, stages[0], stages, step, full, optimizer=opt)
