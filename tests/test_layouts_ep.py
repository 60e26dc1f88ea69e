"""Expert parallel, and swap / load_synthesized / DCP under N-d (DTensor box) layouts, on real gloo ranks.

1. Expert parallel as torchtitan builds it: an MoE layer with grouped expert weights (``w1`` [E, D, H],
   ``w2`` [E, H, D]) and a top-1 router in a small model, on a (dp=2, ep=2) mesh. The expert weights are
   DTensors ``Shard(0)`` over ``ep`` (``distribute_module``), then FSDP2 over ``dp`` (``fully_shard`` of
   the experts on ``mesh["dp"]``, on dim 0: whole experts per rank, or on dim 1: N-d boxes); the rest of
   the model is FSDP2 over the flattened (dp, ep) axis. Ranks that share a dp coordinate train on the same
   batches; each computes its local experts densely, masked by the router, the ep ranks' partial outputs
   are summed (a ``Partial`` DTensor made ``Replicate``) and so are the gradients of the tokens.
   Checked here, against computations from the gathered trajectory (nothing from dist_ema): the trajectory
   == a plain 1-rank model trained on the same batches; the tracked EMA == brute force; every snapshot
   reads back == the gathered EMA when it was taken (bitwise); synthesis at 4 ranks == at 1 rank
   (bitwise), tracked target == brute force, untracked == a least-squares reconstruction; a plain
   unsharded model resumed from the store holds the last snapshot exactly.
2. Tensor parallel x FSDP2 (``fsdp2_tp``, 2 x 2): ``ema.swapped`` computes with exactly the EMA and gives
   the training weights back bitwise; ``load_synthesized`` writes what ``synthesize`` exports; the EMA
   saved with ``torch.distributed.checkpoint`` loads exactly into other layouts (plain FSDP2 on the same 4
   ranks, ``fsdp2_tp`` 1 x 2 on 2 ranks), and the expert-parallel EMA into plain FSDP2 on 4 and 2 ranks.

Two worker launches: everything on 4 ranks in one, the 2-rank loads in the other.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tests.dist_harness import run_workers
from tests.engines import TinyNet, batch, build
from tests.test_topologies import SIGMAS as TOPOLOGY_SIGMAS
from tests.test_topologies import brute_ema, reconstruct  # brute force, no dist_ema

SIGMAS = TOPOLOGY_SIGMAS  # tracked (reconstruct uses the same profiles)
TARGETS = (0.10, 0.15)  # synthesized: one tracked, one not
STEPS, EVERY = 4, 2  # snapshots at steps 2 and 4
E, D, H, VOCAB = 4, 6, 8, 7  # experts, model width, expert hidden width, vocabulary
DP, EP = 2, 2
SEED = 2  # initial weights whose router sends tokens to every expert within the STEPS batches


# ----------------------------------------------------------------------------- the MoE model


class _SumGradOverAxis(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over a mesh axis.

    The tokens are the same on every ep rank and each rank computes only its local experts from them,
    so the gradient of the tokens is the sum of the ep ranks' parts (what an all-to-all's backward
    returns to a token's rank in a dispatching implementation).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class GroupedExperts(nn.Module):
    """E two-layer experts as grouped weights: ``w1`` [E, D, H], ``w2`` [E, H, D] (torchtitan's layout).

    Under expert parallel the weights are DTensors ``Shard(0)`` on the ep axis: this rank computes its
    local experts for every token, each masked by the router's gate, and the ep ranks' partial sums
    are added (``Partial`` -> ``Replicate``, whose backward passes each rank its gradient unchanged);
    the gradients of the tokens and gates, partial on each rank, are summed over ep.
    """

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(E, D, H) * D ** -0.5)
        self.w2 = nn.Parameter(torch.randn(E, H, D) * H ** -0.5)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Partial, Replicate

        w1, w2, mesh = self.w1, self.w2, None
        if isinstance(w1, DTensor):
            mesh = w1.device_mesh
            w1, w2 = w1.to_local(), w2.to_local()
            x, gate = (_SumGradOverAxis.apply(v, mesh.get_group()) for v in (x, gate))
        first = 0 if mesh is None else mesh.get_local_rank() * w1.shape[0]
        h = F.silu(torch.einsum("nd,edh->enh", x, w1))
        y = torch.einsum("enh,ehd->end", h, w2)
        out = torch.einsum("end,ne->nd", y, gate[:, first : first + w1.shape[0]])
        if mesh is not None:
            out = DTensor.from_local(out, mesh, [Partial()]).redistribute(mesh, [Replicate()]).to_local()
        return out


class MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(D, E, bias=False)
        self.experts = GroupedExperts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.softmax(self.router(x), dim=-1)
        top = scores.argmax(dim=-1, keepdim=True)  # top-1: one expert per token, weighted by its score
        gate = torch.zeros_like(scores).scatter(1, top, scores.gather(1, top))
        return self.experts(x, gate)


class MoENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.norm = nn.LayerNorm(D)
        self.moe = MoE()
        self.head = nn.Linear(D, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(idx))
        return self.head(h + self.moe(h)).squeeze(-1)


def moe_net(seed: int = SEED) -> MoENet:
    torch.manual_seed(seed)
    return MoENet()


def loss_of(model: nn.Module, step: int, dp_rank: int) -> torch.Tensor:
    x, y = batch(step, dp_rank)
    return ((model(x) - y) ** 2).mean()


def expert_parallel(net: MoENet, experts_dim: int):
    """EP on ep, FSDP2 of the experts on dp, FSDP2 of the rest on the flattened (dp, ep) axis (torchtitan).

    ``experts_dim``: the dim FSDP2 shards the local experts on. torchtitan shards dim 0 (whole experts
    per rank: flat ranges) unless dp x ep exceeds the number of experts, then dim 1 (N-d boxes).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

    mesh = init_device_mesh("cpu", (DP, EP), mesh_dim_names=("dp", "ep"))

    def partition(name: str, mod: nn.Module, ep_mesh) -> None:
        for pname, p in list(mod.named_parameters(recurse=False)):
            mod.register_parameter(pname, nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)])))

    distribute_module(net.moe.experts, mesh["ep"], partition)
    fully_shard(net.moe.experts, mesh=mesh["dp"], shard_placement_fn=lambda p: Shard(experts_dim))
    fully_shard(net, mesh=mesh["dp", "ep"]._flatten("dp_ep"))
    return mesh


def plain_fsdp2(net: nn.Module) -> None:
    """FSDP2 of the whole model over every rank, Shard(0) (a layout with no boxes)."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(net)


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered (``full_tensor``), float64, on every rank."""
    return {n: p.full_tensor().detach().double().clone() for n, p in model.named_parameters()}


def plain_trajectory(steps: int) -> list[dict[str, torch.Tensor]]:
    """The MoE model unsharded in one process, trained on the dp ranks' batches (mean of their losses)."""
    net = moe_net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    traj = []
    for n in range(steps):
        (sum(loss_of(net, n, r) for r in range(DP)) / DP).backward()
        opt.step()
        opt.zero_grad()
        traj.append({k: p.detach().double().clone() for k, p in net.named_parameters()})
    return traj


# ----------------------------------------------------------------------------- 4 ranks


def _gathered(ema) -> dict[float, dict[str, torch.Tensor]]:
    return {s: ema.full_state_dict(sigma_rel=s) for s in SIGMAS}


def _dcp_save(ema, ckpt: Path, rank: int) -> None:
    """DCP checkpoint of the EMA's state dict, and (rank 0) the gathered EMA and clock to compare with."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"ema": ema.state_dict()}, checkpoint_id=str(ckpt))
    ref = _gathered(ema)
    if rank == 0:
        torch.save({"ema": ref, "clock": (ema.step, ema.t, ema.updates)}, ckpt.parent / f"{ckpt.name}-ref.pt")


def _dcp_load_and_check(target, ckpt: Path, rank: int, what: str) -> None:
    """Load ``ckpt`` with dcp.load into a fresh EMA of ``target``: its EMA and clock == the saved ones."""
    import torch.distributed.checkpoint as dcp

    from dist_ema import PostHocEMA

    ema = PostHocEMA(target, sigma_rels=SIGMAS)
    state = {"ema": ema.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt))
    ema.load_state_dict(state["ema"])
    ref = torch.load(ckpt.parent / f"{ckpt.name}-ref.pt", weights_only=True)
    assert (ema.step, ema.t, ema.updates) == tuple(ref["clock"]), (what, ema.step, ema.t, ema.updates)
    got = _gathered(ema)
    if rank == 0:
        for s in SIGMAS:
            assert sorted(got[s]) == sorted(ref["ema"][s]), (what, sorted(got[s]))
            for k, v in ref["ema"][s].items():
                assert torch.equal(got[s][k], v), (what, "dcp-loaded EMA differs", s, k)


def run_expert_parallel(rank: int, out: Path, experts_dim: int) -> None:
    """Train the EP model, track, snapshot, synthesize at 4 ranks, checkpoint with DCP; rank 0 saves the record."""
    from torch.distributed.tensor import DTensor

    from dist_ema import PostHocEMA, synthesize

    net = moe_net()
    mesh = expert_parallel(net, experts_dim)
    name = f"ep{experts_dim}"
    w1 = net.moe.experts.w1
    assert isinstance(w1, DTensor) and w1.device_mesh.mesh_dim_names == ("dp", "ep"), w1.device_mesh
    local = (E // (DP * EP), D, H) if experts_dim == 0 else (E // EP, D // DP, H)
    assert w1.to_local().shape == local, (w1.to_local().shape, w1.placements)
    dp_rank = mesh["dp"].get_local_rank()
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    url = str(out / f"{name}-store")
    ema = PostHocEMA(net, sigma_rels=SIGMAS, store=url, snapshot_every=EVERY, writer="sync")
    rec: dict = {"traj": [], "snaps": {}, "expert_grad": torch.zeros(E, dtype=torch.float64)}
    for n in range(STEPS):
        loss_of(net, n, dp_rank).backward()
        rec["expert_grad"] += net.moe.experts.w1.grad.full_tensor().double().abs().sum(dim=(1, 2))
        opt.step()
        opt.zero_grad()
        assert ema.update()
        rec["traj"].append(full_params(net))
        if ema.updates % EVERY == 0:
            rec["snaps"][ema.step] = _gathered(ema)
    _dcp_save(ema, out / f"{name}-dcp", rank)
    ema.close()
    synthesize(url, sigma_rels=list(TARGETS), out=str(out / f"{name}-synth"), progress=False)
    if rank == 0:
        torch.save(rec, out / f"{name}.pt")
    # the same checkpoint into the same model under another layout: plain FSDP2 over the 4 ranks
    other = moe_net(seed=0)
    plain_fsdp2(other)
    _dcp_load_and_check(other, out / f"{name}-dcp", rank, f"{name} -> fsdp2 at 4 ranks")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def check_swapped(setup, ema, rank: int, sigma_rel: float) -> None:
    """Inside ``swapped`` the model holds and computes with the EMA; after it, the training weights bitwise."""
    model = setup.model
    x = torch.arange(VOCAB)
    ref = ema.full_state_dict(sigma_rel=sigma_rel)
    before = setup.full_params()
    local_before = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        out_train = model(x)
    with ema.swapped(sigma_rel=sigma_rel):
        inside = setup.full_params()
        with torch.no_grad():
            out_ema = model(x)
    assert _same(setup.full_params(), before), "training weights not restored after swapped()"
    for n, p in model.named_parameters():
        assert torch.equal(p.to_local(), local_before[n]), ("local shard not restored", n)
    with torch.no_grad():
        assert torch.equal(model(x), out_train), "forward after swapped() differs from before"
    model.reshard()  # a forward without backward leaves the root FSDP unit's parameters unsharded
    if rank != 0:
        return
    assert set(inside) <= set(ref), (sorted(inside), sorted(ref))
    for k, v in inside.items():
        assert torch.equal(v.float(), ref[k]), ("swapped weights != EMA", sigma_rel, k)
    plain = TinyNet()
    missing, unexpected = plain.load_state_dict(ref, strict=False)
    assert set(missing) <= {"scale"} and not unexpected, (missing, unexpected)
    with torch.no_grad():
        want = plain(x)
    torch.testing.assert_close(out_ema, want, rtol=1e-6, atol=1e-6, msg=f"forward inside swapped({sigma_rel})")
    assert not torch.allclose(out_ema, out_train), "the EMA computes what the training weights compute"


def run_tensor_parallel(rank: int, out: Path) -> None:
    """fsdp2_tp 2 x 2: swapped, a DCP checkpoint, synthesize, load_synthesized, the checkpoint into FSDP2."""
    from safetensors.torch import load_file

    from dist_ema import PostHocEMA, load_synthesized, synthesize
    from dist_ema.synthesis import target_folder

    setup = build("fsdp2_tp", mesh_shape=(2, 2))
    url = str(out / "tp-store")
    ema = PostHocEMA(setup.target, sigma_rels=SIGMAS, store=url, snapshot_every=EVERY, writer="sync")
    for _ in range(STEPS):
        setup.step()
        assert ema.update()
    for s in SIGMAS:
        check_swapped(setup, ema, rank, s)
    _dcp_save(ema, out / "tp-dcp", rank)
    ema.close()
    synthesize(url, sigma_rels=[0.15], out=str(out / "tp-synth"), progress=False)
    res = load_synthesized(setup.model, url, sigma_rel=0.15)
    assert res.t == float(STEPS), res.t
    got = setup.full_params()
    if rank == 0:
        want = load_file(str(out / "tp-synth" / target_folder(0.15) / "model.safetensors"))
        assert sorted(k for k in want if k != "scale") == sorted(got), (sorted(want), sorted(got))
        for k, v in got.items():
            assert torch.equal(v.float(), want[k]), ("load_synthesized != synthesize", k)
    _dcp_load_and_check(build("fsdp2", seed=1).target, out / "tp-dcp", rank, "fsdp2_tp -> fsdp2 at 4 ranks")


def worker_4(rank: int, ws: int, out_dir: str) -> None:
    out = Path(out_dir)
    for experts_dim in (0, 1):
        run_expert_parallel(rank, out, experts_dim)
    run_tensor_parallel(rank, out)


def worker_2(rank: int, ws: int, out_dir: str, ckpts: str) -> None:
    """The 4-rank checkpoints loaded at 2 ranks: fsdp2_tp 1 x 2, and the MoE model under plain FSDP2."""
    ckpts = Path(ckpts)
    _dcp_load_and_check(build("fsdp2_tp", seed=1, mesh_shape=(1, 2)).target, ckpts / "tp-dcp", rank,
                        "fsdp2_tp 2x2 -> fsdp2_tp 1x2 at 2 ranks")
    other = moe_net(seed=0)
    plain_fsdp2(other)
    _dcp_load_and_check(other, ckpts / "ep1-dcp", rank, "ep1 -> fsdp2 at 2 ranks")


# ----------------------------------------------------------------------------- checks


def check_expert_parallel(out: Path, experts_dim: int) -> None:
    from safetensors.torch import load_file

    from dist_ema import PostHocEMA, open_store, synthesize
    from dist_ema.synthesis import target_folder

    name = f"ep{experts_dim}"
    rec = torch.load(out / f"{name}.pt")
    traj, snaps, url = rec["traj"], rec["snaps"], str(out / f"{name}-store")
    names = sorted(traj[0])
    assert names == sorted(n for n, _ in MoENet().named_parameters()), names
    # every expert was routed tokens (got gradients), and EP trained what the unsharded model trains
    assert (rec["expert_grad"] > 0).all(), rec["expert_grad"]
    for n, (got, want) in enumerate(zip(traj, plain_trajectory(STEPS))):
        for k in names:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=f"step {n + 1}: EP != plain {k}")
    # track: the EMA at the last snapshot == brute force over the trajectory
    assert sorted(snaps) == [2, 4], sorted(snaps)
    for s in SIGMAS:
        ref = brute_ema(traj, s)
        for k in names:
            torch.testing.assert_close(snaps[STEPS][s][k].double(), ref[k], rtol=2e-5, atol=2e-6,
                                       msg=f"tracked EMA {k} sigma_rel={s}")
    # snapshot: every snapshot reads back exactly what the ranks held when it was taken. Whole experts per
    # rank are flat ranges (format 2); experts split on dim 1 are N-d boxes (format 3)
    store = open_store(url)
    listed = store.snapshots()
    assert [x.step for x in listed] == sorted(snaps), [x.step for x in listed]
    for x in listed:
        boxes = experts_dim == 1
        assert x.world_size == DP * EP and store.layout(x).has_boxes == boxes, (name, x.world_size)
        assert x.version == (3 if boxes else 2), (name, x.version)
        for s in SIGMAS:
            for k in names:
                assert torch.equal(store.read(x.step, s, k), snaps[x.step][s][k]), ("read back", x.step, s, k)
    # synthesize: 4 ranks == 1 rank (bitwise); tracked target == brute force; untracked == reconstruction
    here = out / f"{name}-synth-1"
    synthesize(url, sigma_rels=list(TARGETS), out=str(here), progress=False)
    for s in TARGETS:
        theirs = load_file(str(out / f"{name}-synth" / target_folder(s) / "model.safetensors"))
        mine = load_file(str(here / target_folder(s) / "model.safetensors"))
        for k in names:
            assert torch.equal(theirs[k], mine[k]), ("synthesis differs between world sizes", s, k)
        ref = brute_ema(traj, s) if s in SIGMAS else reconstruct(snaps, s, float(STEPS))
        for k in names:
            torch.testing.assert_close(mine[k].double(), ref[k], rtol=1e-4, atol=1e-5,
                                       msg=f"synthesized {k} sigma_rel={s}")
    # resume at 1 rank into the plain (unsharded) model: the last snapshot exactly
    ema = PostHocEMA(moe_net(seed=0), sigma_rels=SIGMAS, store=url, resume=True, writer="sync")
    try:
        assert ema.step == STEPS, ema.step
        for s in SIGMAS:
            assert _same(ema.full_state_dict(sigma_rel=s), snaps[STEPS][s]), ("1-rank resume", s)
    finally:
        ema.close(final_snapshot=False)


@pytest.mark.dist
@pytest.mark.timeout(400)
def test_expert_parallel_and_nd_swap_load_dcp(tmp_path: Path) -> None:
    run_workers("tests.test_layouts_ep:worker_4", 4, tmp_path / "w4", timeout=300)
    for experts_dim in (0, 1):
        check_expert_parallel(tmp_path / "w4", experts_dim)
    run_workers("tests.test_layouts_ep:worker_2", 2, tmp_path / "w2", kwargs={"ckpts": str(tmp_path / "w4")},
                timeout=120)


def test_plain_moe_routes_top1_and_sums_experts() -> None:
    """The dense masked computation == each token through its own expert, weighted by its router score."""
    assert not dist.is_initialized()
    net = moe_net()
    x = torch.randn(9, D)
    moe = net.moe
    scores = torch.softmax(moe.router(x), dim=-1)
    rows = []
    for i in range(x.shape[0]):
        e = int(scores[i].argmax())
        rows.append(scores[i, e] * (F.silu(x[i] @ moe.experts.w1[e]) @ moe.experts.w2[e]))
    want = torch.stack(rows)
    torch.testing.assert_close(moe(x), want, rtol=1e-6, atol=1e-6)
