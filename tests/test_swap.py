"""``swapped()`` / ``tracked_swapped()``: the weights every layer really computes with.

Forward pre-hooks on every leaf module record the full weights the layer reads in its
forward (the unsharded parameters under FSDP, the gathered ones under ZeRO-3), so a
stale unsharded copy (the FSDP root, or any unit that keeps its parameters unsharded
after forward) is seen, not only the shards the EMA writes. For every engine, on 2
gloo ranks:

* inside the context, an eval forward uses the EMA in every layer (bitwise the gathered
  ``full_state_dict``, which itself matches a brute-force EMA of the trajectory);
* after it, an eval forward and the next training forward use the training weights of
  before the swap in every layer, and the training step gives bitwise the parameters of
  a control run that never swapped.

Each swap is entered right after an eval forward, so a unit left unsharded by that
forward is in the state that used to leak.

The last test loads the model with ``load_state_dict(assign=True)`` (new parameter
tensors) under DDP and a plain module and swaps right after: every element of every
layer must be the EMA.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_ema import phema
from dist_ema.sharding.replicated import clean_fqn
from dist_ema.tracker import PostHocEMA
from tests.dist_harness import run_workers
from tests.engines import ENGINES, KEEP_UNSHARDED, Setup, TinyNet, batch, build

SIGMA = 0.05
WARMUP = 8  # steps before the first round: by then the EMA differs from the weights in every layer
STEPS_PER_ROUND = 2
ROUNDS = 2


class UsedWeights:
    """Forward pre-hooks on the leaf modules: the weights of the latest forward, by clean fqn."""

    def __init__(self, model: nn.Module) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # names as full_params() gives them
        self.seen: dict[str, torch.Tensor] = {}
        self.names: set[str] = set()
        for mod_name, mod in model.named_modules():
            if next(iter(mod.children()), None) is not None:
                continue
            attrs = [a for a in ("weight", "bias") if getattr(mod, a, None) is not None]
            if attrs:
                self.names.update(clean_fqn(f"{mod_name}.{a}") for a in attrs)
                mod.register_forward_pre_hook(self._hook(mod_name, attrs))

    def _hook(self, mod_name: str, attrs: list[str]):
        def pre(mod: nn.Module, args: object) -> None:
            for a in attrs:  # read at call time: the tensor forward is about to use
                self.seen[clean_fqn(f"{mod_name}.{a}")] = getattr(mod, a).detach().clone()

        return pre

    def take(self) -> dict[str, torch.Tensor]:
        out, self.seen = self.seen, {}
        assert set(out) == self.names, f"layers that ran: {sorted(out)}, expected {sorted(self.names)}"
        return out


def eval_forward(setup: Setup, rank: int) -> None:
    with torch.no_grad():
        setup.target(batch(10_000, rank)[0])


def check_used(used: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    """Every layer computed with ``want`` (cast to the dtype the layer computed in)."""
    wrong = []
    for k, u in used.items():
        w = want[k].to(u.dtype).view(u.shape)
        if not torch.equal(u, w):
            wrong.append(f"{k} ({int((u != w).sum())} of {u.numel()} elements differ)")
    assert not wrong, f"{what}: layers that did not use the expected weights: {wrong}"


def broadcast(obj: object) -> object:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def worker_swap_uses_ema_inside_and_raw_after(rank: int, ws: int, out: str, engine: str) -> None:
    control = build(engine, seed=3)
    control_params = []
    for i in range(WARMUP + ROUNDS * (STEPS_PER_ROUND + 1)):
        control.step()
        if i >= WARMUP and (i + 1 - WARMUP) % (STEPS_PER_ROUND + 1) == 0:
            control_params.append(control.full_params())
    del control

    setup = build(engine, seed=3)
    ema = PostHocEMA(setup.target, sigma_rels=(SIGMA, 0.10))
    used = UsedWeights(setup.model)
    gamma = phema.sigma_rel_to_gamma(SIGMA)
    brute: dict[str, torch.Tensor] = {}

    def train_step() -> None:
        setup.step()
        assert ema.update()
        w = 1.0 - phema.power_beta(gamma, ema.t, 1.0)
        for k, v in setup.full_params().items():
            brute[k] = v.clone() if k not in brute else brute[k].lerp_(v, w)

    for _ in range(WARMUP):
        train_step()
        used.take()
    for rnd in range(ROUNDS):
        for _ in range(STEPS_PER_ROUND):
            train_step()
            used.take()
        raw = setup.full_params()
        full = ema.full_state_dict(sigma_rel=SIGMA)
        if rank == 0:
            for k, v in brute.items():
                torch.testing.assert_close(full[k].double(), v, rtol=2e-5, atol=2e-6, msg=k)
        full = broadcast(full)

        eval_forward(setup, rank)  # leaves unsharded copies behind where the engine keeps them
        seen = used.take()
        check_used(seen, raw, f"{engine} round {rnd}: eval before the swap")
        same = [k for k, u in seen.items() if torch.equal(full[k].to(u.dtype), raw[k].to(u.dtype))]
        assert not same, f"the EMA equals the training weights in {same}: the test could not tell them apart"
        swaps = (("tracked_swapped", lambda: ema.tracked_swapped(SIGMA)),
                 ("swapped", lambda: ema.swapped(sigma_rel=SIGMA)))
        for name, ctx in swaps:
            with ctx():
                eval_forward(setup, rank)
                check_used(used.take(), full, f"{engine} round {rnd}: eval inside {name}()")
                eval_forward(setup, rank)  # a second forward: copies kept from the first are the EMA
                check_used(used.take(), full, f"{engine} round {rnd}: second eval inside {name}()")
            eval_forward(setup, rank)
            check_used(used.take(), raw, f"{engine} round {rnd}: eval after {name}()")
        train_step()
        check_used(used.take(), raw, f"{engine} round {rnd}: training forward after the swaps")
        # full_params() of this round was taken in train_step; compare the parameters it gave
        now = setup.full_params()
        for k, v in control_params[rnd].items():
            assert torch.equal(now[k], v), f"{engine} round {rnd}: {k} differs from the run without swaps"


@pytest.mark.dist
@pytest.mark.timeout(400)
@pytest.mark.parametrize("engine", ENGINES + KEEP_UNSHARDED)
def test_swap_uses_ema_inside_and_training_weights_after(engine, tmp_path):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    run_workers("tests.test_swap:worker_swap_uses_ema_inside_and_raw_after", 2, tmp_path,
                kwargs=dict(engine=engine))


def worker_swap_after_assign_load(rank: int, ws: int, out: str, engine: str, refresh: bool) -> None:
    setup = build(engine, seed=4)
    ema = PostHocEMA(setup.target, sigma_rels=(SIGMA, 0.10))
    for _ in range(3):
        setup.step()
        ema.update()
    raw = setup.full_params()
    before = {n: p for n, p in setup.model.named_parameters()}
    # a checkpoint load that replaces every parameter tensor
    sd = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
    setup.model.load_state_dict(sd, assign=True)
    assert all(p is not before[n] for n, p in setup.model.named_parameters())
    if refresh:  # re-listed by hand (update() does it too); without it, swapped() re-lists them
        ema.refresh_views()
    full = broadcast(ema.full_state_dict(sigma_rel=SIGMA))
    used = UsedWeights(setup.model)
    for name, ctx in (("swapped", lambda: ema.swapped(sigma_rel=SIGMA)),
                      ("tracked_swapped", lambda: ema.tracked_swapped(SIGMA))):
        with ctx():
            eval_forward(setup, rank)
            check_used(used.take(), full, f"{engine}: eval inside {name}() after load_state_dict(assign=True)")
        eval_forward(setup, rank)
        check_used(used.take(), raw, f"{engine}: eval after {name}() after load_state_dict(assign=True)")
        assert all(torch.equal(v, raw[k]) for k, v in setup.full_params().items())


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("refresh", [False, True])
@pytest.mark.parametrize("engine", ["replicated", "ddp"])
def test_swap_after_assign_load_puts_every_element_in(engine, refresh, tmp_path):
    run_workers("tests.test_swap:worker_swap_after_assign_load", 2, tmp_path,
                kwargs=dict(engine=engine, refresh=refresh))


def worker_swap_before_first_forward(rank: int, ws: int, out: str) -> None:
    # FSDP allocates its unsharded buffers lazily, at the first forward: nothing to drop yet
    for engine in ("fsdp2", "fsdp1", "fsdp1_flat", "fsdp1_grad_op"):
        setup = build(engine, seed=5)
        ema = PostHocEMA(setup.target, sigma_rels=(SIGMA,))
        used = UsedWeights(setup.model)
        torch.manual_seed(5)  # the initial weights, without touching the model (full_params() would run FSDP's init)
        raw = dict(TinyNet().named_parameters())
        with ema.tracked_swapped(SIGMA):
            pass
        eval_forward(setup, rank)
        check_used(used.take(), raw, f"{engine}: first forward after a swap before any forward")
        setup.step()


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_swap_before_the_first_forward(tmp_path):
    run_workers("tests.test_swap:worker_swap_before_first_forward", 2, tmp_path)


def test_swap_module_and_methods_agree():
    """PostHocEMA.swapped / tracked_swapped / synthesized_shards are dist_ema.swap's functions."""
    from dist_ema import swap

    torch.manual_seed(0)
    model = TinyNet()
    ema = PostHocEMA(model, sigma_rels=(0.05, 0.10))
    with torch.no_grad():
        for _ in range(5):
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            ema.update()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}
    values = ema.synthesized_shards(sigma_rel=0.07)
    views = [values[a:b] for a, b in zip(ema.offsets[:-1], ema.offsets[1:])]
    for name, ctx in [("method", lambda: ema.swapped(sigma_rel=0.07)),
                      ("function", lambda: swap.swapped_values(ema.pieces, views, ema.layout.after_load))]:
        with ctx():
            seen[name] = {k: v.clone() for k, v in model.state_dict().items()}
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), name
    assert all(torch.equal(seen["method"][k], seen["function"][k]) for k in before)
    assert not all(torch.equal(seen["method"][k], before[k]) for k in before)  # the EMA was in the model
    direct, error = swap.synthesized_shards(ema.clock, ema.profiles, ema.pieces, ema.snapshots, sigma_rel=0.07)
    assert torch.equal(values, direct) and error == ema.last_synthesis_error
    with ema.tracked_swapped(0.10):
        inside = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(inside, ema.profile(sigma_rel=0.10).flat)
