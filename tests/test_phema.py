"""phema against independent computations: quadrature, high-precision solves, brute-force weights."""

from __future__ import annotations

import json
import math

import mpmath as mp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_ema import phema

mp.mp.dps = 40


def mp_profile(t, g):
    t, g = mp.mpf(t), mp.mpf(g)
    return lambda tau: (g + 1) * tau**g / t ** (g + 1) if 0 <= tau <= t else mp.mpf(0)


def mp_inner(ta, ga, tb, gb):
    pa, pb = mp_profile(ta, ga), mp_profile(tb, gb)
    return mp.quad(lambda x: pa(x) * pb(x), [0, min(ta, tb)])


# ----------------------------------------------------------------------------- sigma_rel <-> gamma


@pytest.mark.parametrize("g", [0.0, 0.5, 3.0, 6.94, 16.97, 80.0])
def test_sigma_rel_is_relative_std_of_profile(g):
    # sigma_rel = std of the profile / t, by numerical integration
    t = 1.0
    p = mp_profile(t, g)
    mean = mp.quad(lambda x: x * p(x), [0, t])
    var = mp.quad(lambda x: (x - mean) ** 2 * p(x), [0, t])
    assert phema.gamma_to_sigma_rel(g) == pytest.approx(float(mp.sqrt(var) / t), rel=1e-12)


@given(st.floats(min_value=1e-3, max_value=0.2886))
@settings(max_examples=200, deadline=None)
def test_sigma_rel_round_trip(s):
    g = phema.sigma_rel_to_gamma(s)
    assert g >= 0
    assert phema.gamma_to_sigma_rel(g) == pytest.approx(s, rel=1e-9)


def test_known_gammas_and_arrays():
    # EDM2 reports sigma_rel 0.05 -> gamma ~16.97 and 0.10 -> ~6.94
    g = phema.sigma_rel_to_gamma(np.array([0.05, 0.10]))
    assert isinstance(g, np.ndarray) and g.shape == (2,)
    np.testing.assert_allclose(g, [16.97, 6.94], atol=0.01)
    assert isinstance(phema.sigma_rel_to_gamma(0.1), float)
    assert phema.sigma_rel_to_gamma([[0.1]]).shape == (1, 1)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.2887, 0.3, 1.0, float("nan"), float("inf")])
def test_bad_sigma_rel(bad):
    with pytest.raises(ValueError, match="sigma_rel"):
        phema.sigma_rel_to_gamma(bad)


def test_bad_sigma_rel_names_value_and_range():
    with pytest.raises(ValueError, match=r"\(0, 0\.2887\); got \[0\.3\]"):
        phema.sigma_rel_to_gamma([0.1, 0.3])


@pytest.mark.parametrize("bad", [-1e-9, -1.0])
def test_bad_gamma(bad):
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        phema.gamma_to_sigma_rel(bad)


# ----------------------------------------------------------------------------- inner product


@pytest.mark.parametrize(
    "ta,ga,tb,gb",
    [(1.0, 0.0, 1.0, 0.0), (1.0, 6.94, 1.0, 16.97), (300.0, 3.0, 1000.0, 7.0), (1000.0, 7.0, 300.0, 3.0),
     (5.0, 0.2, 7.0, 40.0), (1e6, 16.97, 9e5, 6.94)],
)
def test_p_dot_p_against_quadrature(ta, ga, tb, gb):
    assert float(phema.p_dot_p(ta, ga, tb, gb)) == pytest.approx(float(mp_inner(ta, ga, tb, gb)), rel=1e-10)


def test_p_dot_p_no_overflow_for_large_t_and_gamma():
    v = phema.p_dot_p(1e12, 500.0, 2e12, 400.0)
    assert np.isfinite(v) and v > 0


# ----------------------------------------------------------------------------- per-update beta


def brute_force_weights(t_updates, g):
    """Weight of the parameter applied at each update: the profile's mass over that step."""
    p = mp_profile(t_updates[-1], g)
    edges = [0.0, *t_updates]
    return np.array([float(mp.quad(p, [a, b])) for a, b in zip(edges[:-1], edges[1:])])


@pytest.mark.parametrize("g", [0.0, 3.558, 6.937, 16.97])
@pytest.mark.parametrize(
    "times",
    [list(range(1, 41)), list(range(10, 401, 10)), [1, 2, 3, 7, 8, 20, 21, 22, 50, 51, 90, 130, 131, 200]],
    ids=["every-step", "every-10", "irregular"],
)
def test_power_beta_ema_equals_brute_force_weights(g, times):
    # a scalar EMA over a sequence of values, with the exact t_delta rule
    rng = np.random.default_rng(0)
    values = rng.normal(size=len(times))
    ema, prev = 0.0, 0.0
    for t, v in zip(times, values):
        beta = phema.power_beta(g, t, t - prev)
        ema = beta * ema + (1 - beta) * v  # == ema.lerp_(v, 1 - beta)
        prev = t
    w = brute_force_weights(times, g)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    assert ema == pytest.approx(float(w @ values), rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(phema.step_weights(g, times), w, rtol=1e-9, atol=1e-15)


def test_first_update_has_beta_zero_and_broadcasts():
    assert phema.power_beta(6.94, 5.0, 5.0) == 0.0
    out = phema.power_beta(np.array([1.0, 2.0]), 10.0, 1.0)
    np.testing.assert_allclose(out, [0.9**2, 0.9**3])


def test_one_step_beta_with_update_every_is_wrong():
    # The one-step beta applied every k steps distorts the profile; the exact rule does not.
    g, k, n = phema.sigma_rel_to_gamma(0.10), 10, 2000
    times = np.arange(k, n + 1, k, dtype=float)
    exact = phema.step_weights(g, times)
    naive = np.empty_like(times)
    b = [(1 - 1 / t) ** (g + 1) for t in times]  # one-step beta used at every k-th step
    b[0] = 0.0
    for i in range(times.size):
        naive[i] = (1 - b[i]) * np.prod(b[i + 1:])
    sig = lambda w: math.sqrt(w @ (times / n) ** 2 - (w @ (times / n)) ** 2)  # noqa: E731
    assert sig(exact) == pytest.approx(0.10, rel=0.02)
    assert sig(naive) > 0.2


@pytest.mark.parametrize("t,td", [(0.0, 1.0), (5.0, 6.0), (5.0, 0.0), (-1.0, -1.0), (float("nan"), 1.0)])
def test_bad_power_beta(t, td):
    with pytest.raises(ValueError):
        phema.power_beta(1.0, t, td)


# ----------------------------------------------------------------------------- solver


def mp_solve(ts, gs, tr, gr):
    """Independent reference: Gram matrix by quadrature, 40-digit LU solve, error by quadrature."""
    n = len(ts)
    A = mp.matrix(n, n)
    b = mp.matrix(n, 1)
    for i in range(n):
        b[i] = mp_inner(ts[i], gs[i], tr, gr)
        for j in range(n):
            A[i, j] = mp_inner(ts[i], gs[i], ts[j], gs[j])
    x = mp.lu_solve(A, b)
    x = x / sum(x)
    pr = mp_profile(tr, gr)
    ps = [mp_profile(t, g) for t, g in zip(ts, gs)]
    diff2 = mp.quad(lambda s: (sum(xi * p(s) for xi, p in zip(x, ps)) - pr(s)) ** 2, [0, *sorted(set(ts)), tr])
    err = mp.sqrt(diff2 / mp_inner(tr, gr, tr, gr))
    return np.array([float(v) for v in x]), float(err)


@pytest.mark.parametrize(
    "tr,sr",
    [(400.0, 0.15), (400.0, 0.07), (300.0, 0.12), (400.0, 0.25)],
)
def test_solver_against_high_precision(tr, sr):
    g1, g2 = phema.sigma_rel_to_gamma([0.05, 0.10])
    ts = [100.0, 100.0, 200.0, 200.0, 300.0, 300.0, 400.0, 400.0]
    gs = [g1, g2] * 4
    gr = phema.sigma_rel_to_gamma(sr)
    sol = phema.solve_coefficients(ts, gs, [tr], [gr])
    k = sum(t <= tr for t in ts)
    x_ref, err_ref = mp_solve(ts[:k], gs[:k], tr, gr)
    np.testing.assert_allclose(sol.coefficients[:k, 0], x_ref, rtol=1e-6, atol=1e-9)
    assert np.all(sol.coefficients[k:, 0] == 0)
    assert sol.error[0] == pytest.approx(err_ref, rel=1e-4, abs=1e-7)
    assert sol.condition[0] >= 1


def test_exactly_tracked_target_has_zero_error():
    g = phema.sigma_rel_to_gamma([0.05, 0.10])
    sol = phema.solve_coefficients([10, 10, 20, 20], [g[0], g[1]] * 2, [20.0], [g[1]])
    np.testing.assert_allclose(sol.coefficients[:, 0], [0, 0, 0, 1], atol=1e-9)
    assert sol.error[0] < 1e-6


@given(
    n=st.integers(1, 12),
    m=st.integers(1, 4),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=60, deadline=None)
def test_solver_properties(n, m, seed):
    rng = np.random.default_rng(seed)
    g = phema.sigma_rel_to_gamma([0.05, 0.10])
    ts = np.repeat(np.arange(1, n + 1) * 100.0, 2)
    gs = np.tile(g, n)
    tr = rng.uniform(100.0, n * 100.0 + 50, size=m)
    gr = phema.sigma_rel_to_gamma(rng.uniform(0.03, 0.25, size=m))
    sol = phema.solve_coefficients(ts, gs, tr, gr)
    assert sol.coefficients.shape == (2 * n, m)
    np.testing.assert_allclose(sol.coefficients.sum(axis=0), 1.0, rtol=1e-9)
    assert np.all(sol.coefficients[ts[:, None] > tr[None, :]] == 0)
    assert np.all((sol.error >= 0) & np.isfinite(sol.error))
    # the reported error is the L2 distance of the reconstructed profile, checked on a fine grid
    j = 0
    tau = np.linspace(0, tr[j], 200_001)
    rec = phema.reconstructed_profile(sol.coefficients[:, j], ts, gs, tau)
    tgt = phema.profile(tr[j], gr[j], tau)
    num = np.trapezoid((rec - tgt) ** 2, tau)
    den = np.trapezoid(tgt**2, tau)
    assert math.sqrt(num / den) == pytest.approx(sol.error[j], rel=2e-2, abs=2e-4)


def test_solver_errors():
    g = phema.sigma_rel_to_gamma([0.05, 0.10])
    with pytest.raises(ValueError, match="before the first snapshot"):
        phema.solve_coefficients([100, 100], g, [50.0], [g[0]])
    with pytest.raises(ValueError, match="target time must be > 0"):
        phema.solve_coefficients([100, 100], g, [0.0], [g[0]])
    with pytest.raises(ValueError, match="finite"):
        phema.solve_coefficients([100, float("nan")], g, [100.0], [g[0]])
    with pytest.raises(ValueError, match="listed 2 times"):
        phema.solve_coefficients([100, 100, 200], [g[0], g[0], g[1]], [200.0], [g[1]])
    with pytest.raises(ValueError, match="no snapshots"):
        phema.solve_coefficients([], [], [100.0], [g[0]])
    with pytest.raises(ValueError, match="same length"):
        phema.solve_coefficients([100, 200], [g[0]], [100.0], [g[0]])
    with pytest.raises(ValueError, match="snapshot times must be > 0"):
        phema.solve_coefficients([0, 100], g, [100.0], [g[0]])
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        phema.solve_coefficients([100, 200], [-1.0, 2.0], [100.0], [g[0]])


def test_step_weights_errors():
    with pytest.raises(ValueError, match="increasing"):
        phema.step_weights(1.0, [1, 1, 2])
    with pytest.raises(ValueError, match="increasing"):
        phema.step_weights(1.0, [])


# ----------------------------------------------------------------------------- classic EMA betas


@pytest.mark.parametrize("beta,t", [(0.99, 20_000), (0.999, 200_000), (0.9995, 400_000)])
def test_beta_to_sigma_rel_is_the_spread_of_the_classic_emas_weights(beta, t):
    """Brute force: the weights a classic EMA gives every past step at step t, their std relative to t."""
    k = np.arange(t, dtype=np.float64)  # steps back
    w = (1 - beta) * beta**k
    w = np.append(w, beta**t)  # the initial value, at time 0
    tau = np.append(t - k, 0.0)
    mean = np.sum(w * tau) / np.sum(w)
    std = np.sqrt(np.sum(w * (tau - mean) ** 2) / np.sum(w))
    assert phema.beta_to_sigma_rel(beta, t) == pytest.approx(std / t, rel=1e-6)


def test_sigma_rel_to_beta_inverts_it_and_broadcasts():
    betas = np.array([0.9, 0.99, 0.999, 0.9999, 0.99999])
    ts = np.array([1e3, 1e4, 1e5, 1e6, 1e7])
    s = phema.beta_to_sigma_rel(betas, ts)
    np.testing.assert_allclose(phema.sigma_rel_to_beta(s, ts), betas, rtol=1e-12)
    assert phema.sigma_rel_to_beta(0.1, 100_000) == pytest.approx(0.9999, abs=1e-8)  # sqrt(b)/(1-b) = 1e4
    assert isinstance(phema.beta_to_sigma_rel(0.999, 1e5), float)
    # the same beta is a narrower profile (relative to the run) later in the run
    assert phema.beta_to_sigma_rel(0.9999, 2e5) == pytest.approx(phema.beta_to_sigma_rel(0.9999, 1e5) / 2)


@pytest.mark.parametrize("call,words", [
    (lambda: phema.beta_to_sigma_rel(1.0, 1e5), r"beta must be in \(0, 1\)"),
    (lambda: phema.beta_to_sigma_rel(0.0, 1e5), r"beta must be in \(0, 1\)"),
    (lambda: phema.beta_to_sigma_rel(0.999, 0), r"t must be > 0"),
    (lambda: phema.beta_to_sigma_rel(0.9999, 1000), r"averages over more than the run so far.*smaller beta"),
    (lambda: phema.sigma_rel_to_beta(0.3, 1e5), r"sigma_rel must be in \(0, 0.2887\)"),
    (lambda: phema.sigma_rel_to_beta(0.1, -1), r"t must be > 0"),
])
def test_classic_beta_conversions_refuse_bad_input(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_dist_ema_error_takes_targets_as_betas(capsys):
    from dist_ema.cli import main

    assert main(["error", "--target-betas", "0.9999", "--steps", "100000", "--snapshot-every", "1000",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["targets"]
    assert [x["beta"] for x in got] == [0.9999] and got[0]["beta_t"] == 100000.0
    assert got[0]["sigma_rel"] == pytest.approx(np.sqrt(0.9999) / (1e-4 * 1e5), rel=1e-9)
    assert main(["error", "--targets", str(got[0]["sigma_rel"]), "--steps", "100000", "--snapshot-every", "1000",
                 "--json"]) == 0
    same = json.loads(capsys.readouterr().out)["targets"][0]
    assert same["error"] == pytest.approx(got[0]["error"], rel=1e-9, abs=1e-15)
    assert main(["error", "--target-betas", "0.999", "--beta-t", "50000", "--targets", "0.1", "--steps", "100000"]) == 0
    out = capsys.readouterr().out
    assert "sigma_rel = sqrt(beta) / ((1 - beta) t)" in out and "0.999" in out and "0.1000" in out
