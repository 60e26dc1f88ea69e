"""``ema.switch(sigma_rel=...)``: the EMA written into the training weights for good (Switch EMA).

For every engine on 2 gloo ranks (replicated, DDP, FSDP2 fp32 and bf16 compute, FSDP1 per-parameter
and flat, ZeRO 1/2/3), and tensor parallel x FSDP2 and pipeline x FSDP2 on 4 ranks:

* after a switch to a tracked profile, the full parameters (fp32 masters under ZeRO) are exactly the
  gathered EMA, and the next forward computes with it in every layer (forward pre-hooks, so a stale
  unsharded or working copy is seen); after a switch to an untracked profile, exactly what
  ``swapped()`` computes with for it;
* the optimizer state (moments, step counts) is bitwise what it was before the switch;
* training continues from the switched weights: the next training forward uses them, and the next
  EMA update averages the new weights into the EMA (checked against a float64 lerp).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_ema import phema
from dist_ema.tracker import PostHocEMA
from tests.dist_harness import run_workers
from tests.engines import ENGINES, build
from tests.test_swap import UsedWeights, check_used, eval_forward

TRACKED, UNTRACKED = 0.10, 0.07


def optimizer_state(opt) -> dict:
    """Every tensor and number of the torch optimizer's state, copied."""
    out = {}
    for i, st in enumerate(opt.state.values()):
        for k, v in st.items():
            if torch.is_tensor(v):
                v = v.to_local() if hasattr(v, "to_local") else v  # DTensor moments: this rank's part
                v = v.detach().clone()
            out[(i, k)] = v
    return out


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def worker_switch(rank: int, ws: int, out: str, engines: list[str], mesh_shape: list[int] | None = None) -> None:
    for engine in engines:
        setup = build(engine, seed=2, mesh_shape=tuple(mesh_shape) if mesh_shape else None)
        ema = PostHocEMA(setup.target, sigma_rels=(0.05, TRACKED), store=f"{out}/{engine}", snapshot_every=2,
                         writer="thread")
        hooks = mesh_shape is None  # the N-d layouts' layers see DTensor pieces: compared as full parameters
        used = UsedWeights(setup.model) if hooks else None
        for _ in range(6):
            setup.step()
            assert ema.update()
        opt_before = optimizer_state(setup.optimizer)
        assert opt_before, f"{engine}: no optimizer state to compare"
        names = list(setup.full_params())
        for sigma in (UNTRACKED, TRACKED):
            if sigma == TRACKED:  # the gathered EMA, on rank 0: sent to every rank
                full = ema.full_state_dict(sigma_rel=TRACKED)
                box = [{k: full[k].double() for k in names} if rank == 0 else None]
                dist.broadcast_object_list(box, src=0)
                want = box[0]
            else:
                with ema.swapped(sigma_rel=UNTRACKED):
                    want = setup.full_params()
            error = ema.switch(sigma_rel=sigma)
            assert (error is None) == (sigma == TRACKED), f"{engine}: error {error} for sigma_rel {sigma}"
            got = setup.full_params()
            wrong = [k for k in want if not torch.equal(got[k], want[k])]
            assert not wrong, f"{engine}: after switch(sigma_rel={sigma}) these parameters are not the EMA: {wrong}"
            if hooks:
                eval_forward(setup, rank)
                check_used(used.take(), want, f"{engine}: the forward after switch(sigma_rel={sigma})")
            assert same_state(optimizer_state(setup.optimizer), opt_before), f"{engine}: the optimizer state changed"
        assert ema.switches == 2
        # training goes on from the switched weights; the EMA goes on from where it was
        ema_before = {k: v.double() for k, v in ema.full_state_dict(sigma_rel=TRACKED).items() if k in names}
        setup.step()
        if hooks:
            check_used(used.take(), want, f"{engine}: the training forward after the switch")
        after = setup.full_params()
        assert any(not torch.equal(after[k], want[k]) for k in want), f"{engine}: the step changed nothing"
        assert ema.update()
        got = ema.full_state_dict(sigma_rel=TRACKED)
        if rank == 0:
            w = 1.0 - phema.power_beta(phema.sigma_rel_to_gamma(TRACKED), ema.t, 1.0)
            for k, v in ema_before.items():
                torch.testing.assert_close(got[k].double(), v + w * (after[k] - v), rtol=1e-6, atol=1e-7)
        ema.close()
        dist.barrier()
    if rank == 0:
        Path(out, "engines.json").write_text(json.dumps(engines))


@pytest.mark.dist
def test_switch_on_every_engine(tmp_path: Path) -> None:
    run_workers("tests.test_switch:worker_switch", 2, tmp_path, {"engines": list(ENGINES)}, timeout=420)
    assert json.loads((tmp_path / "engines.json").read_text()) == list(ENGINES)


@pytest.mark.dist
def test_switch_under_tensor_and_pipeline_parallel(tmp_path: Path) -> None:
    engines = ["fsdp2_tp", "pp_fsdp2"]
    run_workers("tests.test_switch:worker_switch", 4, tmp_path, {"engines": engines, "mesh_shape": [2, 2]},
                timeout=420)
    assert json.loads((tmp_path / "engines.json").read_text()) == engines
