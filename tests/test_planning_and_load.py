"""Planning at scale, swapped() from every snapshot taken, load_synthesized with buffers and frozen stores.

Planning: thousands of snapshots plan in bounded memory, the reported error is the error of the
coefficients returned (checked by numerical quadrature of the profiles, independent of phema's
inner products), and below the bound the coefficients are bitwise those of the dense solve.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from dist_ema import phema
from dist_ema.synthesis import plan_coefficients

PLAN_PEAK_MIB = 128  # a dense solve over 5,000 snapshots x 2 profiles needs 763 MiB per matrix


def _gamma(sigma_rel: float) -> float:
    """gamma of a sigma_rel by bisection on the closed form sigma_rel(gamma) (not phema's cubic)."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        s = math.sqrt((mid + 1) / ((mid + 2) ** 2 * (mid + 3)))
        lo, hi = (mid, hi) if s > sigma_rel else (lo, mid)
    return 0.5 * (lo + hi)


def _sources(n: int, every: float = 1000.0, sigma_rels=(0.05, 0.10)) -> list[tuple[float, list[float]]]:
    gs = [_gamma(s) for s in sigma_rels]
    return [(every * (i + 1), gs) for i in range(n)]


def _quadrature_error(x: np.ndarray, t: np.ndarray, g: np.ndarray, tr: float, gr: float) -> float:
    """||sum_i x_i p_i - p_r|| / ||p_r|| by Gauss-Legendre quadrature on every piece between snapshot times."""
    keep = x != 0
    x, t, g = x[keep], t[keep], g[keep]
    breaks = np.unique(np.concatenate([[0.0], t, [tr]]))
    nodes, weights = np.polynomial.legendre.leggauss(48)
    a, b = breaks[:-1, None], breaks[1:, None]
    tau = (a + (b - a) * (nodes[None, :] + 1) / 2).ravel()
    w = ((b - a) / 2 * weights[None, :]).ravel()
    rec = np.zeros_like(tau)
    for xi, ti, gi in zip(x, t, g):
        inside = tau <= ti
        rec[inside] += xi * (gi + 1) * (tau[inside] / ti) ** gi / ti
    target = (gr + 1) * (tau / tr) ** gr / tr
    return math.sqrt(np.sum(w * (rec - target) ** 2) / np.sum(w * target**2))


def _dense_solve(t, gamma, target_t, target_gamma):
    """The dense solve over every snapshot at or before each target time (the algorithm as it was
    before snapshot subsets): the reference the planner must match bitwise below its bound."""
    ts, gs = np.asarray(t, np.float64), np.asarray(gamma, np.float64)
    tr, gr = np.broadcast_arrays(np.atleast_1d(np.asarray(target_t, np.float64)),
                                 np.atleast_1d(np.asarray(target_gamma, np.float64)))
    m = tr.size
    X, err, cond = np.zeros((ts.size, m)), np.zeros(m), np.zeros(m)
    for t_j in np.unique(tr):
        cols = np.flatnonzero(tr == t_j)
        sel = np.flatnonzero(ts <= t_j)
        ti, gi = ts[sel], gs[sel]
        A = phema.p_dot_p(ti[:, None], gi[:, None], ti[None, :], gi[None, :])
        B = phema.p_dot_p(ti[:, None], gi[:, None], t_j, gr[None, cols])
        d = 1.0 / np.sqrt(np.diag(A))
        As = A * d[:, None] * d[None, :]
        ev = np.linalg.eigvalsh(As)
        cond[cols] = ev[-1] / ev[0] if ev[0] > 0 else np.inf
        try:
            Y = np.linalg.solve(As, B * d[:, None])
        except np.linalg.LinAlgError:
            Y = np.linalg.lstsq(As, B * d[:, None], rcond=None)[0]
        Xs = Y * d[:, None]
        for c, j in enumerate(cols):
            x = Xs[:, c] / Xs[:, c].sum()
            b = B[:, c]
            rr = float(phema.p_dot_p(tr[j], gr[j], tr[j], gr[j]))
            err[j] = math.sqrt(max(x @ A @ x - 2.0 * x @ b + rr, 0.0) / rr)
            X[sel, j] = x
    return X, err, cond


# ---------------------------------------------------------------------------------------------- planning


@pytest.mark.parametrize("n", [100_000, 5_000])
def test_thousands_of_snapshots_plan_in_bounded_memory(n):
    sources = _sources(n, every=1.0 if n == 100_000 else 1000.0)
    targets = [_gamma(0.15), _gamma(0.25)]
    tracemalloc.start()
    try:
        X, sol, rows = plan_coefficients(sources, sources[-1][0], targets)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert peak < PLAN_PEAK_MIB, f"planning {n} snapshots peaked at {peak:.0f} MiB"
    assert X.shape[1] == 2 and np.all(np.isfinite(X))
    np.testing.assert_allclose(X.sum(axis=0), 1.0, rtol=1e-9)
    assert np.all(sol.error < 0.02), sol.error  # a subset spread over time still reconstructs well


def test_reported_error_is_the_error_of_the_coefficients_returned():
    n = 5_000
    sources = _sources(n)
    t_mid = sources[n // 2][0] + 500.0  # between two snapshots: the newest ones are not at the target
    for target_t in (sources[-1][0], t_mid):
        gr = [_gamma(0.03), _gamma(0.10), _gamma(0.15), _gamma(0.25)]
        X, sol, rows = plan_coefficients(sources, target_t, gr)
        t = np.array([sources[i][0] for i, _ in rows])
        g = np.array([sources[i][1][k] for i, k in rows])
        assert np.all(t <= target_t)
        assert len(rows) <= phema.MAX_ROWS < 2 * n and sol.subset.all()
        for j, gj in enumerate(gr):
            want = _quadrature_error(X[:, j], t, g, target_t, gj)
            assert sol.error[j] == pytest.approx(want, rel=1e-3, abs=1e-7), (target_t, j)
            if target_t == sources[-1][0]:  # between snapshots narrow targets are far off, dense or not
                assert want < 0.02


def test_below_the_bound_the_coefficients_are_the_dense_solve_bitwise():
    n = phema.MAX_ROWS // 3  # 3 profiles: the most rows at or below the bound
    sources = _sources(n, sigma_rels=(0.05, 0.10, 0.2))
    t = np.array([s for s, gs in sources for _ in gs])
    g = np.array([x for _, gs in sources for x in gs])
    tr = np.array([t[-1], t[-1], t[-1], 0.5 * t[-1] + 10.0])
    gr = np.array([_gamma(0.04), _gamma(0.10), _gamma(0.17), _gamma(0.15)])
    sol = phema.solve_coefficients(t, g, tr, gr)
    X, err, cond = _dense_solve(t, g, tr, gr)
    assert np.array_equal(sol.coefficients, X)
    assert np.array_equal(sol.error, err)
    assert np.array_equal(sol.condition, cond)
    assert np.array_equal(sol.used, t[:, None] <= tr[None, :]) and not sol.subset.any()
    # one snapshot more and the last targets' solve is a subset: the bound is where it says
    t2, g2 = np.append(t, [t[-1] + 1000.0] * 3), np.append(g, g[:3])
    assert phema.solve_coefficients(t2, g2, t2[-1], gr[0]).subset.all()


def test_cli_error_on_a_long_schedule(capsys):
    from dist_ema.cli import main

    assert main(["error", "--snapshot-every", "1", "--steps", "100000", "--targets", "0.05", "0.15"]) == 0
    out = capsys.readouterr().out
    assert "100000 snapshots" in out and "subset" in out and "rel. error" in out
    assert main(["error", "--snapshot-every", "1", "--steps", "100000", "--targets", "0.15", "--json"]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    assert doc["snapshots"] == 100_000 and doc["snapshots_used"] <= phema.MAX_ROWS
    assert doc["targets"][0]["error"] < 0.02
