"""PostHocEMA under torch.distributed.checkpoint: Stateful, reshards like the model, exact clock.

Saved at one world size and loaded at another, the EMA of every profile must come back
bitwise, with the clock (step, t, updates) that makes the next update the formula's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dist_ema import open_store, phema
from dist_ema.store.layout import flat_blocks as _flat_blocks
from dist_ema.tracker import PostHocEMA
from tests.dist_harness import run_workers
from tests.engines import TinyNet, build

SIGMAS = (0.05, 0.10, 0.20)


def _model_sd(setup):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(setup.model)


def _save(setup, ema, ckpt: Path, rank: int) -> None:
    """DCP checkpoint of the EMA (and the model under FSDP2, the documented form) plus the reference."""
    state = {"ema": ema}
    if setup.engine == "fsdp2":
        state["model"] = _model_sd(setup)
    dcp.save(state, checkpoint_id=str(ckpt / "dcp"))
    torch.save(ema.state_dict(), ckpt / f"ema-rank{rank}.pt")  # the per-rank torch.save path
    ref = {s: ema.full_state_dict(sigma_rel=s) for s in SIGMAS}
    if rank == 0:
        torch.save({"ema": ref, "clock": (ema.step, ema.t, ema._t_updated, ema.updates)}, ckpt / "ref.pt")


def _load_and_check(setup, ckpt: Path, rank: int, other_sharding: bool = True) -> PostHocEMA:
    """Load ``ckpt`` into a fresh EMA of ``setup``: bitwise EMA, clock, next update = the formula."""
    ema = PostHocEMA(setup.target, sigma_rels=SIGMAS)
    state = {"ema": ema}
    if setup.engine == "fsdp2" and (ckpt / "model-saved").exists():
        state["model"] = _model_sd(setup)
    dcp.load(state, checkpoint_id=str(ckpt / "dcp"))
    if "model" in state:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(setup.model, state["model"])
    ref = torch.load(ckpt / "ref.pt", weights_only=True)
    assert (ema.step, ema.t, ema._t_updated, ema.updates) == tuple(ref["clock"])
    got = {s: ema.full_state_dict(sigma_rel=s) for s in SIGMAS}
    if rank == 0:
        for s in SIGMAS:
            for k, v in ref["ema"][s].items():
                assert torch.equal(got[s][k], v), (setup.engine, s, k)
    # a per-rank torch.save from another sharding is refused on every rank, naming DCP and the store
    other = PostHocEMA(setup.target, sigma_rels=SIGMAS)
    if other_sharding:
        with pytest.raises(ValueError, match="another sharding.*dcp.load.*resume=True"):
            other.load_state_dict(torch.load(ckpt / f"ema-rank{rank % 2}.pt", weights_only=True))
    # the next update continues the schedule: lerp(ema, theta, 1 - beta(t, 1)) at t = saved t + 1
    setup.step()
    assert ema.update()
    theta = setup.full_params()
    now = {s: ema.full_state_dict(sigma_rel=s) for s in SIGMAS}
    if rank == 0:
        t = ref["clock"][1] + 1.0
        for s in SIGMAS:
            w = 1.0 - phema.power_beta(phema.sigma_rel_to_gamma(s), t, 1.0)
            for k, v in ref["ema"][s].items():
                if k != "scale":
                    want = torch.lerp(v, theta[k].float(), w)
                    torch.testing.assert_close(now[s][k], want, rtol=1e-6, atol=1e-7, msg=f"{setup.engine} {s} {k}")
    # torch.save per rank reloads at the same sharding
    path = ckpt.parent / f"again-{setup.engine}-{dist.get_world_size()}-rank{rank}.pt"
    torch.save(ema.state_dict(), path)
    other.load_state_dict(torch.load(path, weights_only=True))
    assert all(torch.equal(a.flat, b.flat) for a, b in zip(ema.profiles, other.profiles))
    assert (other.step, other.t, other.updates) == (ema.step, ema.t, ema.updates)
    return ema


def _run(setup, ema, steps):
    for _ in range(steps):
        setup.step()
        ema.update()


def worker_save(rank, ws, out, engines, steps=4):
    out = Path(out)
    for engine in engines:
        setup = build(engine)
        ema = PostHocEMA(setup.target, sigma_rels=SIGMAS)
        _run(setup, ema, steps)
        (out / engine).mkdir(exist_ok=True)
        if engine == "fsdp2":
            (out / engine / "model-saved").touch()
        _save(setup, ema, out / engine, rank)


def worker_load(rank, ws, out, loads, save_again=None):
    """``loads``: [(engine, checkpoint dir)]; ``save_again``: checkpoint the last loaded EMA there."""
    for engine, ckpt in loads:
        setup = build(engine, seed=1)  # other initial weights: everything must come from the checkpoint
        ema = _load_and_check(setup, Path(ckpt), rank)
    if save_again:
        again = Path(save_again)
        again.mkdir(exist_ok=True)
        _run(setup, ema, 2)
        (again / "model-saved").touch()
        _save(setup, ema, again, rank)


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_reshards_fsdp2_2_to_3_to_2_fsdp1_2_to_3_and_across_engines(tmp_path):
    a, b = tmp_path / "at2", tmp_path / "at3"
    run_workers("tests.test_dcp:worker_save", 2, a, kwargs=dict(engines=["fsdp2", "fsdp1"]))
    run_workers("tests.test_dcp:worker_load", 3, b, kwargs=dict(
        loads=[("fsdp1", str(a / "fsdp1")), ("ddp", str(a / "fsdp2")), ("fsdp2", str(a / "fsdp2"))],
        save_again=str(b / "fsdp2")))
    run_workers("tests.test_dcp:worker_load", 2, tmp_path / "back", kwargs=dict(loads=[("fsdp2", str(b / "fsdp2"))]))


def worker_same_world_size(rank, ws, out, engines):
    out = Path(out)
    for engine in engines:
        setup = build(engine)
        ema = PostHocEMA(setup.target, sigma_rels=SIGMAS)
        _run(setup, ema, 4)
        (out / engine).mkdir(exist_ok=True)
        _save(setup, ema, out / engine, rank)
        _load_and_check(setup, out / engine, rank, other_sharding=False)


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_deepspeed_zero2_zero3_same_world_size(tmp_path):
    pytest.importorskip("deepspeed")
    run_workers("tests.test_dcp:worker_same_world_size", 2, tmp_path, kwargs=dict(engines=["zero2", "zero3"]))


# ----------------------------------------------------------------------------- the previous per-rank format


def worker_per_rank_format(rank, ws, out):
    out = Path(out)
    setup = build("fsdp1")
    ema = PostHocEMA(setup.target, sigma_rels=SIGMAS)
    for _ in range(3):
        setup.step()
        ema.update()
    dcp.save({"ema": ema.per_rank_state_dict()}, checkpoint_id=str(out / "old"))
    ref = ema.full_state_dict(sigma_rel=0.20)
    fresh = PostHocEMA(setup.target, sigma_rels=SIGMAS)
    sd = {"ema": fresh.per_rank_state_dict()}
    dcp.load(sd, checkpoint_id=str(out / "old"))
    fresh.load_state_dict(sd["ema"])
    assert (fresh.step, fresh.t, fresh.updates) == (3, 3.0, 3)
    got = fresh.full_state_dict(sigma_rel=0.20)
    if rank == 0:
        for k in ref:
            assert torch.equal(got[k], ref[k]), k


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_per_rank_format_still_loads_at_the_same_world_size(tmp_path):
    run_workers("tests.test_dcp:worker_per_rank_format", 2, tmp_path)


def test_per_rank_format_with_another_sharding_is_refused():
    torch.manual_seed(0)
    a = PostHocEMA(TinyNet(), sigma_rels=SIGMAS)
    old = a.per_rank_state_dict()
    b = PostHocEMA(torch.nn.Linear(3, 3), sigma_rels=SIGMAS)
    with pytest.raises(ValueError, match=r"dist_ema.tracker/2.*different sharding.*resume=True"):
        b.load_state_dict(old)
    with pytest.raises(ValueError, match="not a dist-ema tracker state dict"):
        b.load_state_dict({"dist_ema": {"format": "dist_ema.tracker/1"}})


# ----------------------------------------------------------------------------- one process


def _train(m, ema, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(n):
        m(torch.randint(0, 7, (8,), generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update()


def test_dcp_without_a_process_group_and_a_mismatch_is_caught_before_loading(tmp_path):
    assert not dist.is_initialized()
    torch.manual_seed(0)
    m = TinyNet()
    ema = PostHocEMA(m, sigma_rels=SIGMAS, update_every=2)
    _train(m, ema, 5)
    dcp.save({"ema": ema}, checkpoint_id=str(tmp_path / "c"))
    want = [p.flat.clone() for p in ema.profiles]
    clock = (ema.step, ema.t, ema._t_updated, ema.updates)
    b = PostHocEMA(m, sigma_rels=SIGMAS, update_every=2)
    dcp.load({"ema": b}, checkpoint_id=str(tmp_path / "c"))
    assert (b.step, b.t, b._t_updated, b.updates) == clock
    assert all(torch.equal(p.flat, w) for p, w in zip(b.profiles, want))
    c = PostHocEMA(m, sigma_rels=SIGMAS, update_every=2)
    torch.save(b.state_dict(), tmp_path / "ema.pt")
    c.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(3):  # the same steps: every copy continues the update_every=2 schedule identically
        m(torch.arange(7)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        assert ema.update() == b.update() == c.update()
    assert all(torch.equal(x.flat, y.flat) and torch.equal(x.flat, z.flat)
               for x, y, z in zip(ema.profiles, b.profiles, c.profiles))
    # other profiles: refused by DCP while planning, before anything is written into the EMA
    d = PostHocEMA(m, sigma_rels=(0.05, 0.15, 0.20))
    before = [p.flat.clone() for p in d.profiles]
    with pytest.raises(CheckpointException, match="Missing key in checkpoint state_dict: ema.sigma_rel_0.15"):
        dcp.load({"ema": d}, checkpoint_id=str(tmp_path / "c"))
    assert all(torch.equal(p.flat, w) for p, w in zip(d.profiles, before))


def test_flat_blocks_cover_each_range_exactly():
    g = torch.Generator().manual_seed(0)
    for shape in [(), (7,), (5, 4), (3, 4, 5), (2, 1, 3, 2), (1, 6)]:
        n = int(torch.tensor(shape).prod().item()) if shape else 1
        full = torch.arange(n, dtype=torch.float32).view(shape)
        for _ in range(30):
            a = int(torch.randint(0, n, (1,), generator=g))
            b = int(torch.randint(a + 1, n + 1, (1,), generator=g))
            blocks = _flat_blocks(a, b, shape)
            assert len(blocks) <= max(1, 2 * len(shape) - 1)
            pos = a
            for offs, sizes, x, y in blocks:
                assert x == pos and y > x
                pos = y
                sl = full[tuple(slice(o, o + s) for o, s in zip(offs, sizes))] if shape else full
                assert torch.equal(sl.reshape(-1), torch.arange(x, y, dtype=torch.float32)), (shape, a, b)
            assert pos == b


# ----------------------------------------------------------------------------- older checkpoint, through DCP


def worker_retire_once(rank, ws, out, url, phase):
    out = Path(out)
    setup = build("replicated", seed=0)
    if phase == "a":
        ema = PostHocEMA(setup.target, sigma_rels=(0.05, 0.10), store=url, snapshot_every=2, writer="sync")
        for _ in range(10):
            setup.step()
            ema.update()
            if ema.step == 6:
                ema.flush()
                dcp.save({"ema": ema}, checkpoint_id=str(out / "ckpt"))
        ema.close()
        return
    ema = PostHocEMA(setup.target, sigma_rels=(0.05, 0.10), store=url, snapshot_every=2, writer="sync", resume=True)
    assert ema.step == 10
    calls = []
    orig = ema.snapshots.restored
    ema.snapshots.restored = lambda step, t: calls.append(step) or orig(step, t)
    dcp.load({"ema": ema}, checkpoint_id=str(out / "ckpt"))
    assert calls == [6] and ema.step == 6
    for _ in range(4):
        setup.step()
        ema.update()
    ema.close()


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_dcp_load_of_an_older_checkpoint_retires_newer_snapshots_once(tmp_path):
    url = str(tmp_path / "store")
    for phase in ("a", "b"):
        run_workers("tests.test_dcp:worker_retire_once", 2, tmp_path / "w", kwargs=dict(url=url, phase=phase))
    store = open_store(url)
    assert [s.step for s in store.snapshots()] == [2, 4, 6, 8, 10]
    assert [s.step for s in store.retired()] == [8, 10]
