"""dist_ema.kernels: the fused K-profile update matches the foreach reference."""

from __future__ import annotations

import shutil

import pytest
import torch

from dist_ema.kernels import FusedUpdate, coalesce, foreach_update


def _setup(sizes, K=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sources = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    flats = [torch.randn(sum(sizes), generator=g) for _ in range(K)]
    offs = [0]
    for n in sizes:
        offs.append(offs[-1] + n)
    views = [[f[a:b] for a, b in zip(offs[:-1], offs[1:])] for f in flats]
    return flats, views, sources


def _reference(flats, sources, sizes, weights_per_step):
    ref = [f.clone() for f in flats]
    offs = [0]
    for n in sizes:
        offs.append(offs[-1] + n)
    views = [[f[a:b] for a, b in zip(offs[:-1], offs[1:])] for f in ref]
    for w in weights_per_step:
        foreach_update(views, sources, w)
    return ref


WEIGHTS = [[1.0, 1.0], [0.5, 0.25], [0.01, 0.3], [0.75, 0.001]]  # w = 1: first update (beta = 0)


def test_coalesce_merges_adjacent_only():
    base = torch.arange(10.0)
    srcs = [base[0:3], base[3:5], base[6:10]]  # gap between the 2nd and 3rd
    ema = torch.zeros(9)
    views = [[ema[0:3], ema[3:5], ema[5:9]]]
    e, s = coalesce(views, srcs)
    assert [x.numel() for x in s] == [5, 4]
    assert torch.equal(s[0], base[0:5]) and torch.equal(s[1], base[6:10])
    e[0][0].fill_(7.0)
    assert torch.all(ema[0:5] == 7.0) and torch.all(ema[5:] == 0.0)  # merged views alias the buffer


def test_foreach_plan_is_bitwise_the_reference():
    sizes = [5, 300, 17, 4096]
    flats, views, sources = _setup(sizes)
    ref = _reference(flats, sources, sizes, WEIGHTS)
    plan = FusedUpdate(views, sources, compile=False)
    assert plan.mode == "foreach"
    for w in WEIGHTS:
        plan(w)
    for a, b in zip(flats, ref):
        assert torch.equal(a, b)


def test_flat_source_coalesces_to_one_run():
    sizes = [64, 128, 32]
    flat_src = torch.randn(sum(sizes))
    sources = list(torch.split(flat_src, sizes))  # like an FSDP1 / ZeRO flat fp32 partition
    flats = [torch.zeros(sum(sizes)) for _ in range(2)]
    views = [list(torch.split(f, sizes)) for f in flats]
    plan = FusedUpdate(views, sources, compile=False)
    assert plan.runs == 1
    plan([1.0, 1.0])
    assert torch.equal(flats[0], flat_src) and torch.equal(flats[1], flat_src)


NO_CXX = shutil.which("g++") is None and shutil.which("c++") is None


@pytest.mark.skipif(NO_CXX, reason="inductor's CPU backend needs a C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_matches_foreach(dtype):
    sizes = [256, 256, 7, 256, 33]  # three runs of one signature, two small runs on the foreach path
    flats, views, sources = _setup(sizes, dtype=dtype, seed=1)
    ref = _reference(flats, sources, sizes, WEIGHTS)
    plan = FusedUpdate(views, sources, compile=True, min_numel=256, group=4)
    assert (plan.compiled_runs, plan.signatures, plan.mode) == (3, 1, "mixed")
    counters = torch._dynamo.utils.counters["stats"]
    plan(WEIGHTS[0])
    for f in flats:  # w = 1 (the first EMA update) copies the source exactly
        assert torch.equal(f, torch.cat([s.float() for s in sources]))
    graphs = counters["unique_graphs"]
    for w in WEIGHTS[1:]:
        plan(w)  # new weights: same kernel (0-d tensor weights), no recompile
    assert counters["unique_graphs"] == graphs
    assert plan.failed is None
    for a, b in zip(flats, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_compile_failure_falls_back(monkeypatch):
    sizes = [512, 512]
    flats, views, sources = _setup(sizes)
    ref = _reference(flats, sources, sizes, WEIGHTS[:2])
    plan = FusedUpdate(views, sources, compile=True, min_numel=1)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    for w in WEIGHTS[:2]:
        plan(w)
    assert plan.mode == "foreach" and "no C++ compiler" in plan.failed
    for a, b in zip(flats, ref):
        assert torch.equal(a, b)


def test_bad_arguments():
    flats, views, sources = _setup([4, 5])
    with pytest.raises(ValueError, match="one per source"):
        FusedUpdate([views[0][:1]], sources)
    with pytest.raises(ValueError, match="1-d float32"):
        FusedUpdate([[v.double() for v in views[0]]], sources)
    with pytest.raises(ValueError, match="2 weights"):
        FusedUpdate(views, sources, compile=False)([0.1])


def test_one_failing_kernel_is_demoted_alone(monkeypatch):
    import dist_ema.kernels as K

    sizes = [300, 300, 500]  # two signatures: (2, 300, ...) and (1, 500, ...)
    flats, views, sources = _setup(sizes)
    ref = _reference(flats, sources, sizes, WEIGHTS)
    plan = FusedUpdate(views, sources, compile=True, min_numel=1, group=2)
    assert plan.signatures == 2

    def fake_fn(self, sig):
        if sig[1] == 500:
            raise RuntimeError("compiler crashed")
        return K._new_body()  # the eager body: same math, no compiler

    monkeypatch.setattr(FusedUpdate, "_fn", fake_fn)
    for w in WEIGHTS:
        plan(w)
    assert (plan.signatures, plan.compiled_runs, plan.mode) == (1, 2, "mixed")
    assert "compiler crashed" in plan.failed
    for a, b in zip(flats, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_runtime_error_after_a_kernel_ran_is_raised(monkeypatch):
    import dist_ema.kernels as K

    flats, views, sources = _setup([64, 64])
    plan = FusedUpdate(views, sources, compile=True, min_numel=1)
    calls = {"n": 0}

    def fake_fn(self, sig):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("device lost")
        return K._new_body()

    monkeypatch.setattr(FusedUpdate, "_fn", fake_fn)
    plan([0.1, 0.2])
    with pytest.raises(RuntimeError, match="device lost"):
        plan([0.1, 0.2])


# ----------------------------------------------------------------------------- staged small runs, in the tracker


def test_small_runs_are_staged_into_one_run():
    sizes = [32, 64, 288, 9, 1152] * 240  # 1,200 small tensors
    flats, views, sources = _setup(sizes)
    ref = _reference(flats, sources, sizes, WEIGHTS)
    plan = FusedUpdate(views, sources, compile=False)
    assert plan.staged_runs == len(sizes) and plan.stages == 1
    for w in WEIGHTS:
        plan(w)
    for a, b in zip(flats, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the plan reads the live sources at every call: a changed source is seen
    with torch.no_grad():
        for s in sources:
            s.add_(1.0)
    ref = _reference(flats, sources, sizes, [[0.5, 0.5]])
    plan([0.5, 0.5])
    for a, b in zip(flats, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _convnet(n_layers=150):
    layers = []
    for _ in range(n_layers):  # 4 tensors a layer: conv weight/bias, norm weight/bias
        layers += [torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.GroupNorm(2, 8)]
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("impl", ["auto", "foreach"])
def test_tracker_update_paths_agree_with_a_brute_force_ema(impl):
    from dist_ema import phema
    from dist_ema.tracker import PostHocEMA

    torch.manual_seed(0)
    m = torch.nn.Sequential(_convnet(150), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 60))
    ema = PostHocEMA(m, sigma_rels=(0.05, 0.10), update_impl=impl, update_every=2)
    traj = []
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    for step in range(1, 7):
        m(torch.randn(2, 8, 4, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if ema.update():
            traj.append((float(step), {k: v.detach().double().clone() for k, v in m.named_parameters()}))
    if impl == "auto":
        plan = ema._update_plan
        assert plan.staged_runs >= 600 and plan.stages <= 2  # ~1 call per profile instead of 600+
    for g in ema.gammas:
        got = ema.full_state_dict(gamma=g)
        ref, t_prev = None, 0.0
        for t, params in traj:  # independent: EMA recursion with the exact beta of each update
            beta = (1 - (t - t_prev) / t) ** (g + 1)
            ref = params if ref is None else {k: beta * ref[k] + (1 - beta) * params[k] for k in ref}
            t_prev = t
        for k in ref:
            torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-5, atol=1e-6)
    assert phema.sigma_rel_to_gamma(0.05) in [pytest.approx(g) for g in ema.gammas]


def test_update_impl_is_validated():
    from dist_ema.tracker import PostHocEMA

    with pytest.raises(ValueError, match="update_impl must be 'auto', 'fused' or 'foreach'"):
        PostHocEMA(torch.nn.Linear(2, 2), update_impl="fast")


def test_piece_order_keeps_memory_neighbours_together():
    """tracker._piece_order groups pieces by kernels.adjacent (one rule for both), owned first, small last."""
    from dist_ema.kernels import DEFAULT_MIN_NUMEL, adjacent
    from dist_ema.sharding.base import ShardPiece
    from dist_ema.tracker import _piece_order

    n = DEFAULT_MIN_NUMEL
    flat = torch.zeros(3 * n)
    small = torch.zeros(10)

    def piece(src, owner=True):
        return ShardPiece("w", (src.numel(),), torch.float32, 0, src.numel(), src, owner)

    pieces = [piece(flat[0:n]), piece(flat[n : 2 * n]), piece(small), piece(flat[2 * n :], owner=False),
              piece(torch.zeros(n))]
    # [0, 1] are one block (neighbours), the small block goes after the large owned ones, the unowned last
    assert _piece_order(pieces) == [0, 1, 4, 2, 3]
    assert adjacent(flat[0:n], flat[n : 2 * n]) and not adjacent(flat[n : 2 * n], flat[0:n])
    assert not adjacent(flat[0:4].view(2, 2), flat[4:8])  # 1-d tensors only
    assert not adjacent(flat[0:n], flat[n : 2 * n].double())
