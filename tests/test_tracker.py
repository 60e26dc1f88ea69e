"""PostHocEMA under every engine: gathered EMA == brute-force weighted sum of the trajectory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from dist_ema import phema
from dist_ema.tracker import EMAConfig, PostHocEMA
from tests.dist_harness import run_workers
from tests.engines import TinyNet, build

SIGMAS = (0.05, 0.10, 0.20)


def reference_ema(traj: list[dict[str, torch.Tensor]], times: list[float], gamma: float) -> dict[str, torch.Tensor]:
    """sum_j w_j theta_j with w_j = (t_j^(g+1) - t_(j-1)^(g+1)) / t_n^(g+1): the profile's mass over each update."""
    tn = times[-1]
    out = {k: torch.zeros_like(v) for k, v in traj[0].items()}
    prev = 0.0
    for theta, t in zip(traj, times):
        w = (t / tn) ** (gamma + 1) - (prev / tn) ** (gamma + 1)
        prev = t
        for k in out:
            out[k] += w * theta[k]
    return out


def worker_ema_matches_reference(rank, ws, out, engine, update_every, steps, batch_size=None):
    setup = build(engine)
    ema = PostHocEMA(setup.target, sigma_rels=SIGMAS, update_every=update_every, batch_size=batch_size)
    traj, times = [], []
    for _ in range(steps):
        setup.step()
        if ema.update():
            traj.append(setup.full_params())
            times.append(ema.t)
    assert ema.step == steps and len(times) == steps // update_every
    assert ema.t == steps * (batch_size or 1)
    for s in SIGMAS:
        got = ema.full_state_dict(sigma_rel=s)
        if rank != 0:
            assert got == {}
            continue
        ref = reference_ema(traj, times, phema.sigma_rel_to_gamma(s))
        assert set(ref) <= set(got)
        for k, v in ref.items():
            assert got[k].dtype == torch.float32 and got[k].shape == v.shape, k
            torch.testing.assert_close(got[k].double(), v, rtol=2e-5, atol=2e-6, msg=f"{engine} {k} sigma_rel={s}")
        # the widest EMA differs from the last parameters: the test can tell them apart
        last = traj[-1]
        assert s != 0.20 or max((got[k].double() - last[k]).abs().max().item() for k in ref) > 1e-3
    # tracked_swapped puts the tracked EMA into the live model and restores it exactly
    before = setup.full_params()
    with ema.tracked_swapped(sigma_rel=0.10):
        inside = setup.full_params()
    after = setup.full_params()
    ref = ema.full_state_dict(sigma_rel=0.10)
    if rank == 0:
        for k in before:
            torch.testing.assert_close(inside[k], ref[k].double(), rtol=0, atol=0, msg=k)
            assert torch.equal(before[k], after[k]), k


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("ws", [2, 3])
@pytest.mark.parametrize("engine", ["replicated", "ddp", "fsdp2", "fsdp2_bf16", "fsdp1", "fsdp1_flat"])
def test_torch_engines(engine, ws, tmp_path):
    run_workers("tests.test_tracker:worker_ema_matches_reference", ws, tmp_path,
                kwargs=dict(engine=engine, update_every=1, steps=12))


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine,ws", [("fsdp2", 3), ("replicated", 2)])
def test_update_every_and_samples(engine, ws, tmp_path):
    run_workers("tests.test_tracker:worker_ema_matches_reference", ws, tmp_path,
                kwargs=dict(engine=engine, update_every=3, steps=14, batch_size=16))


@pytest.mark.dist
@pytest.mark.timeout(400)
@pytest.mark.parametrize("ws", [2, 3])
@pytest.mark.parametrize("engine", ["zero1", "zero2", "zero3"])
def test_deepspeed_engines(engine, ws, tmp_path):
    pytest.importorskip("deepspeed")
    run_workers("tests.test_tracker:worker_ema_matches_reference", ws, tmp_path,
                kwargs=dict(engine=engine, update_every=2 if ws == 3 else 1, steps=10))


# ----------------------------------------------------------------------------- single process


def test_single_process_matches_reference():
    torch.manual_seed(0)
    m = TinyNet()
    opt = torch.optim.SGD(m.parameters(), lr=0.3)
    ema = PostHocEMA(m, gammas=(3.0, 12.0), update_every=4)
    traj, times = [], []
    for _ in range(23):
        m(torch.arange(7)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if ema.update():
            traj.append({k: v.detach().double().clone() for k, v in m.named_parameters()})
            times.append(ema.t)
    assert times == [4.0, 8.0, 12.0, 16.0, 20.0]
    for g in (3.0, 12.0):
        got = ema.full_state_dict(gamma=g)
        ref = reference_ema(traj, times, g)
        for k in ref:
            torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-5, atol=1e-6)
        assert torch.equal(got["scale"], m.scale)


class _Sync(Exception):
    pass


def test_update_never_syncs_or_allocates(monkeypatch):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    ema = PostHocEMA(m, sigma_rels=(0.05, 0.1), update_every=2)
    ema.update()

    def forbid(name):
        def f(*a, **k):
            raise _Sync(f"update() called Tensor.{name}")
        return f

    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    monkeypatch.setattr(torch.cuda, "synchronize", forbid("cuda.synchronize"))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(6):
            ema.update()
    monkeypatch.undo()
    allocs = [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage > 0]
    assert allocs == []
    assert ema.updates == 3
    # sanity: the probe does see allocations when there are some
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _ = m[0].weight * 2
    assert any(e.cpu_memory_usage > 0 for e in prof.events())


def test_views_follow_a_checkpoint_load_with_assign():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 4)
    ema = PostHocEMA(m, sigma_rels=(0.1,))
    ema.update()
    w0 = m.weight.detach().clone()
    new = {k: torch.full_like(v, 3.0) for k, v in m.state_dict().items()}
    m.load_state_dict(new, assign=True)  # replaces the parameter storages
    with torch.no_grad():
        m.weight.add_(1.0)  # 4.0 now, in the new storage
    ema.update()  # beta at t=2 for gamma(0.1): the new storage must be what is averaged
    w = 1 - phema.power_beta(phema.sigma_rel_to_gamma(0.1), 2.0, 1.0)
    got = ema.full_state_dict(sigma_rel=0.1)["weight"]
    assert ema.pieces[0].source.data_ptr() == m.weight.data_ptr()
    torch.testing.assert_close(got, torch.lerp(w0, torch.full_like(w0, 4.0), w), rtol=1e-6, atol=1e-6)


def test_bf16_params_are_averaged_in_fp32():
    m = torch.nn.Linear(8, 8).to(torch.bfloat16)
    ema = PostHocEMA(m, sigma_rels=(0.1,))
    ema.update()
    assert ema.profiles[0].flat.dtype == torch.float32
    torch.testing.assert_close(ema.full_state_dict(sigma_rel=0.1)["weight"], m.weight.float())


def test_state_dict_round_trip():
    torch.manual_seed(0)
    m = TinyNet()
    a = PostHocEMA(m, sigma_rels=(0.05, 0.1))
    with torch.no_grad():
        for _ in range(3):
            for p in m.parameters():
                p.add_(torch.randn_like(p))
            a.update()
    b = PostHocEMA(m, sigma_rels=(0.05, 0.1))
    b.load_state_dict(a.state_dict())
    assert (b.step, b.t) == (3, 3.0)
    for pa, pb in zip(a.profiles, b.profiles):
        assert torch.equal(pa.flat, pb.flat)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    a.update()
    b.update()
    assert torch.equal(a.profiles[1].flat, b.profiles[1].flat)
    c = PostHocEMA(m, sigma_rels=(0.05, 0.2))
    with pytest.raises(ValueError, match="tracks gammas"):
        c.load_state_dict(a.state_dict())
    d = PostHocEMA(m, sigma_rels=(0.05, 0.1), batch_size=4)
    with pytest.raises(ValueError, match="counts time in steps"):
        d.load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(sigma_rels=(0.3,)), r"sigma_rels must each be in \(0, 0.2887\); got \[0.3\]"),
        (dict(sigma_rels=(0.1, 0.1)), "sigma_rels lists a profile twice"),
        (dict(sigma_rels=()), "sigma_rels is empty"),
        (dict(gammas=(-1.0,)), "gammas must be >= 0"),
        (dict(sigma_rels=(0.1,), gammas=(3.0,)), "either sigma_rels or gammas"),
        (dict(update_every=0), "update_every must be an integer >= 1"),
        (dict(update_every=1.5), "update_every must be an integer >= 1"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(buffers="avg"), "buffers must be 'copy' or 'ignore'"),
    ],
)
def test_config_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        EMAConfig(**kwargs)


def test_untracked_profile_error():
    ema = PostHocEMA(torch.nn.Linear(2, 2), sigma_rels=(0.05, 0.1))
    with pytest.raises(ValueError, match=r"sigma_rel=0.15 is not tracked \(tracked: \[0.05, 0.1\]\)"):
        ema.full_state_dict(sigma_rel=0.15)


def test_one_rule_for_the_same_profile():
    """phema.same_gamma decides everywhere: duplicates in a list, tracked lookups, state dicts, synthesis."""
    from dist_ema.config import DistEMAConfig

    g = phema.sigma_rel_to_gamma(0.1)
    near, far = g * (1 + 1e-8), g * (1 + 1e-4)
    assert phema.same_gamma(g, near) and not phema.same_gamma(g, far)
    assert phema.same_gamma(0.0, 1e-7) and not phema.same_gamma(0.0, 1e-5)  # absolute below gamma = 1
    assert phema.find_gamma([1.0, near], g) == 1 and phema.find_gamma([1.0, far], g) is None
    s_near = phema.gamma_to_sigma_rel(near)
    for make in (lambda x: EMAConfig(gammas=(g, x)), lambda x: phema.resolve_profiles(None, (g, x)),
                 lambda x: EMAConfig(sigma_rels=(0.1, phema.gamma_to_sigma_rel(x))),
                 lambda x: DistEMAConfig(sigma_rels=(0.1, phema.gamma_to_sigma_rel(x)))):
        with pytest.raises(ValueError, match="twice|duplicate"):
            make(near)
        make(far)
    m = torch.nn.Linear(2, 2)
    ema = PostHocEMA(m, sigma_rels=(0.05, 0.1))
    assert ema.profile(gamma=near) is ema.profiles[1] and ema.profile(sigma_rel=s_near) is ema.profiles[1]
    with pytest.raises(ValueError, match="not tracked"):
        ema.profile(gamma=far)
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update()
    assert torch.equal(ema.synthesized_shards(gamma=near), ema.profiles[1].flat)  # tracked: no synthesis
    other = PostHocEMA(m, gammas=(phema.sigma_rel_to_gamma(0.05), near))
    other.load_state_dict(ema.state_dict())  # the same profiles
    state = ema.state_dict()
    state["dist_ema"] = {**state["dist_ema"], "gammas": state["dist_ema"]["gammas"][:1]}
    with pytest.raises(ValueError, match="tracks gammas"):  # one profile fewer is not the same profiles
        other.load_state_dict(state)


_HOOK_SCRIPT = """
import gc, torch
from torch.optim.optimizer import _global_optimizer_post_hooks as hooks
from dist_ema import step_counter
from dist_ema.tracker import PostHocEMA

c = step_counter.STEP_COUNTER
m = torch.nn.Linear(2, 2)
opt = torch.optim.SGD(m.parameters(), lr=0.1)
assert c.handle is None and not hooks
a, b = PostHocEMA(m), PostHocEMA(m)
h = c.handle
assert h is not None and list(hooks) == [h.id] and c.users == 2
a.close(); a.close()  # idempotent
assert c.handle is h and c.users == 1
b.close()  # the last one: the hook is gone
assert c.handle is None and not hooks and c.users == 0
e = PostHocEMA(m)  # a new EMA installs it again, and the count works
assert c.handle is not None and list(hooks) == [c.handle.id]
opt.step()
assert e.update() and not e.update()  # the second call saw no optimizer step
e.close()
m2 = torch.nn.Linear(2, 2)
g = PostHocEMA(m2)
assert c.handle is not None
del g, m2
gc.collect()  # garbage collected without close(): the hook goes too
assert c.handle is None and not hooks and c.users == 0
with PostHocEMA(m) as f:
    assert c.handle is not None
assert c.handle is None
opt.step()
assert f.update() and c.handle is not None  # updated after close(): counting again
opt.step()
assert f.update() and not f.update()
f.close()
assert c.handle is None and not hooks
print("ok")
"""


@pytest.mark.dist
def test_optimizer_hook_is_removed_with_the_last_ema():
    """The process-wide optimizer step hook: installed by the first PostHocEMA, removed after the last close."""
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-c", _HOOK_SCRIPT], cwd=Path(__file__).resolve().parent.parent,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_collectives_live_in_collective_py():
    """The tracker and the swap call no torch.distributed themselves: collective.py's helpers do."""
    import ast
    from pathlib import Path

    from dist_ema import collective

    root = Path(__file__).resolve().parent.parent / "dist_ema"
    for name in ("tracker.py", "swap.py", "checkpoint.py", "step_counter.py"):
        tree = ast.parse((root / name).read_text())
        imported = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                    and any("torch.distributed" == (getattr(n, "module", None) or a.name) for a in n.names)]
        assert not imported, (name, [ast.unparse(n) for n in imported])
    assert collective.gather_to_rank0({"a": 1}) == [{"a": 1}]  # no process group: this rank's object


def test_defaults_and_gammas():
    ema = PostHocEMA(torch.nn.Linear(2, 2))
    assert ema.sigma_rels == pytest.approx((0.05, 0.10))
    ema2 = PostHocEMA(torch.nn.Linear(2, 2), gammas=(16.97, 6.94))
    assert ema2.sigma_rels == pytest.approx((0.05, 0.10), abs=1e-4)
    assert math.isclose(ema2.gammas[0], 16.97)
    assert np.allclose(ema.gammas, phema.sigma_rel_to_gamma([0.05, 0.1]))
    assert not dist.is_initialized()


def test_the_clock_has_one_owner(tmp_path):
    """The tracker owns the clock and the EMA buffers (one writer, resume included); the snapshot side
    reads them and owns its own schedule."""
    import re
    from pathlib import Path

    from dist_ema.tracker import Clock

    folder = Path(__file__).parent.parent / "dist_ema" / "snapshot"
    src = "\n".join(f.read_text() for f in sorted(folder.glob("*.py")))
    assert "class SnapshotManager" in src
    assert not re.search(r"\bema\.(step|t|_t_updated|updates|clock)\s*=[^=]", src)
    assert not re.search(r"\.flat\.(copy_|add_|mul_|lerp_|zero_)\(", src)  # never writes the EMA buffers
    assert "every // 2" not in (Path(__file__).parent.parent / "dist_ema" / "tracker.py").read_text()
    m = torch.nn.Linear(4, 4)
    url = str(tmp_path / "s")
    with PostHocEMA(m, store=url, snapshot_every=4, writer="sync") as ema:
        for _ in range(9):
            with torch.no_grad():
                m.weight.add_(0.1)
            ema.update()
        assert ema.clock == Clock(step=9, t=9.0, t_updated=9.0, updates=9) and ema.step is ema.clock.step
    again = PostHocEMA(m, store=url, snapshot_every=4, writer="sync", resume=True)
    assert again.clock == Clock(step=9, t=9.0, t_updated=9.0, updates=9)  # the final snapshot's clock
    again.close()
