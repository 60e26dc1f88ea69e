"""Benchmark 6: the coefficient solver, 1,000 snapshots x 16 targets, and planning at scale.

``phema.solve_coefficients`` with 1,000 snapshots of 2 tracked profiles (2,000 rows) and 16
targets at the newest snapshot's time, vs the bare linear algebra any solver needs
(``numpy.linalg.solve`` of the 2,000 x 2,000 system with 16 right-hand sides) and
ema-pytorch's ``solve_weights`` on the same inputs. The library solves above
``phema.MAX_ROWS`` rows over a subset of the snapshots (``phema.choose_snapshots``); the
dense solve over all of them is timed too (``max_rows`` unbounded).

Planning at scale (:func:`plan_scale`, also ``python -m bench.solver --scale 1000 2000 10000``):
seconds and peak traced memory (tracemalloc) of one plan (``synthesis.plan_coefficients``, what
synthesize, swapped() and load_synthesized call) for n snapshots, with the subset and, where it
fits, dense, and both reconstruction errors.

The library solves each target separately and computes each target's condition number
with an SVD (``np.linalg.cond``), which costs ~50x the solve at this size. When one target
takes more than a few seconds, the 16-target figure is extrapolated from it (the loop does
identical work for every target here: all targets share t) and marked as such.
``solve_grouped`` below is the fix as proposed (targets sharing a snapshot set share one
matrix, one condition number by ``eigvalsh``: the matrix is symmetric, and one multi-column
solve); it stays as a reference, checked against the library's coefficients, errors and
conditions.
"""

from __future__ import annotations

import argparse
import cProfile
import math
import os
import pstats
import time
import tracemalloc

import numpy as np

from bench.common import Goal, Result, Table, fmt_x, interleaved, med, paired_ratio


def solve_grouped(t, gamma, target_t, target_gamma):
    """Proposed ``phema.solve_coefficients`` core (same results; validation omitted here)."""
    from dist_ema.phema import Solution, p_dot_p

    ts, gs = np.asarray(t, np.float64), np.asarray(gamma, np.float64)
    tr, gr = np.broadcast_arrays(np.atleast_1d(np.asarray(target_t, np.float64)),
                                 np.atleast_1d(np.asarray(target_gamma, np.float64)))
    n, m = ts.size, tr.size
    X = np.zeros((n, m))  # => [snapshots, targets]
    err, cond = np.zeros(m), np.zeros(m)
    used = ts[:, None] <= tr[None, :]  # => [snapshots, targets]
    groups: dict[bytes, list[int]] = {}
    for j in range(m):
        groups.setdefault(used[:, j].tobytes(), []).append(j)
    for cols in groups.values():
        sel = np.flatnonzero(used[:, cols[0]])
        ti, gi = ts[sel], gs[sel]
        A = p_dot_p(ti[:, None], gi[:, None], ti[None, :], gi[None, :])  # => [k, k]
        B = p_dot_p(ti[:, None], gi[:, None], tr[None, cols], gr[None, cols])  # => [k, len(cols)]
        d = 1.0 / np.sqrt(np.diag(A))
        As = A * d[:, None] * d[None, :]
        ev = np.abs(np.linalg.eigvalsh(As))  # symmetric: singular values = |eigenvalues|
        c = ev.max() / ev.min() if ev.min() > 0 else math.inf
        try:
            Y = np.linalg.solve(As, B * d[:, None])
        except np.linalg.LinAlgError:
            Y = np.linalg.lstsq(As, B * d[:, None], rcond=None)[0]
        Xg = Y * d[:, None]
        Xg = Xg / Xg.sum(axis=0, keepdims=True)
        rr = p_dot_p(tr[cols], gr[cols], tr[cols], gr[cols])
        sq = np.einsum("ij,ik,kj->j", Xg, A, Xg) - 2.0 * np.einsum("ij,ij->j", Xg, B) + rr
        err[cols] = np.sqrt(np.maximum(sq, 0.0) / rr)
        cond[cols] = c
        X[np.ix_(sel, cols)] = Xg
    return Solution(coefficients=X, error=err, condition=cond, used=used)


def _cprofile_top(fn, rows: int = 3) -> list[str]:
    """Own-time shares of the top functions of one call, e.g. '87% _linalg.py:1667(svd)'."""
    prof = cProfile.Profile()
    prof.runcall(fn)
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values()) or 1.0
    items = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:rows]
    return [f"{100 * v[2] / total:.0f}% {fname.rsplit('/', 1)[-1]}:{line}({func})" for (fname, line, func), v in items]


def run(quick: bool = False, threads: int = 1) -> Result:
    import torch

    torch.set_num_threads(threads)
    from dist_ema import phema

    snaps = 100 if quick else 1000
    targets = 16
    rounds = 3
    tracked = phema.sigma_rel_to_gamma(np.array([0.05, 0.10]))
    t = np.repeat(np.arange(1, snaps + 1, dtype=np.float64) * 1000.0, 2)  # => [2 * snaps]
    g = np.tile(tracked, snaps)
    tg = phema.sigma_rel_to_gamma(np.linspace(0.03, 0.25, targets))
    tt = np.full(targets, t[-1])
    A = phema.p_dot_p(t[:, None], g[:, None], t[None, :], g[None, :])  # => [rows, rows]
    B = phema.p_dot_p(t[:, None], g[:, None], tt[None, :], tg[None, :])  # => [rows, targets]
    res = Result("solver", f"6. Solver: {snaps:,} snapshots (x 2 profiles = {t.size:,} rows) x {targets} targets")
    res.config = {"rows": int(t.size), "targets": targets, "rounds": rounds,
                  "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset")}

    dense = 10**9  # max_rows: every snapshot enters
    t0 = time.perf_counter()
    one = phema.solve_coefficients(t, g, tt[:1], tg[:1], max_rows=dense)
    t_one = time.perf_counter() - t0
    extrapolated = t_one * targets > 20.0
    fns = {
        "numpy.linalg.solve (floor)": lambda: np.linalg.solve(A, B),
        "grouped solve (bench reference)": lambda: solve_grouped(t, g, tt, tg),
        "dist-ema solve_coefficients (subset above MAX_ROWS)": lambda: phema.solve_coefficients(t, g, tt, tg),
    }
    if not extrapolated:
        fns["dist-ema solve_coefficients"] = lambda: phema.solve_coefficients(t, g, tt, tg, max_rows=dense)
    try:
        import torch
        from ema_pytorch.post_hoc_ema import solve_weights

        ti, gi = torch.from_numpy(t), torch.from_numpy(g)
        tr, gr = torch.from_numpy(tt), torch.from_numpy(tg)
        fns["ema-pytorch solve_weights"] = lambda: solve_weights(ti, gi, tr, gr)
    except ImportError:
        pass
    times = interleaved(fns, rounds=rounds, warmup=1)
    base = times["numpy.linalg.solve (floor)"]
    if extrapolated:
        times["dist-ema solve_coefficients"] = [t_one * targets]
    tab = Table("Time to solve (median)", ["solver", "ms", "vs numpy.linalg.solve"])
    for name in ("dist-ema solve_coefficients", "dist-ema solve_coefficients (subset above MAX_ROWS)",
                 "grouped solve (bench reference)", "ema-pytorch solve_weights", "numpy.linalg.solve (floor)"):
        if name not in times:
            continue
        ts = times[name]
        dense_lib = name == "dist-ema solve_coefficients"
        ratio = med(ts) / med(base) if extrapolated and dense_lib else paired_ratio(ts, base)
        label = name + (" (dense)" if dense_lib else "")
        if extrapolated and dense_lib:
            label += f" (extrapolated: 1 target took {t_one:.1f}s, x{targets})"
        tab.rows.append([label, f"{med(ts) * 1e3:.0f}", fmt_x(ratio)])
    res.tables.append(tab)

    got = solve_grouped(t, g, tt[:1], tg[:1])
    same = (np.allclose(got.coefficients, one.coefficients, rtol=1e-6, atol=1e-9)
            and np.allclose(got.error, one.error, rtol=1e-4, atol=1e-9)
            and np.allclose(got.condition, one.condition, rtol=1e-3))
    d = med(times["dist-ema solve_coefficients"])
    p = med(times["grouped solve (bench reference)"])
    why = (f"bench reference (targets grouped by snapshot set, eigvalsh condition): {p * 1e3:.0f} ms, same "
           f"coefficients/errors/conditions as the library: {same}")
    if d >= 1.0:
        why += "; cProfile of one target (own time): " + ", ".join(_cprofile_top(lambda: phema.solve_coefficients(
            t, g, tt[:1], tg[:1], max_rows=dense)))
    res.goals.append(Goal(f"solve {snaps:,} snapshots x {targets} targets in under a second", f"{d:.2f} s",
                          d < 1.0, why))
    res.notes.append("dist-ema also computes each target's reconstruction error and condition number and drops "
                     "snapshots after the target time; ema-pytorch's solve_weights is the bare solve.")
    scale = plan_scale((100, 600, 1000) if quick else (1000, 2000, 10000), dense_max=1000 if quick else 2000)
    res.tables.append(scale)
    res.data = {"times_s": times, "one_target_s": t_one, "extrapolated": extrapolated, "proposed_matches": same,
                "plan_scale": scale.rows}
    return res


def _plan_once(n: int, max_rows: int) -> tuple[float, float, np.ndarray]:
    """(seconds, peak traced MiB, errors) of one plan for targets sigma_rel 0.15 and 0.25 over n snapshots."""
    from dist_ema import phema
    from dist_ema.synthesis import plan_coefficients

    gs = phema.sigma_rel_to_gamma(np.array([0.05, 0.10])).tolist()
    sources = [(1000.0 * (i + 1), gs) for i in range(n)]
    tg = phema.sigma_rel_to_gamma(np.array([0.15, 0.25])).tolist()
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        _, sol, _ = plan_coefficients(sources, sources[-1][0], tg, max_rows=max_rows)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    return seconds, peak, sol.error


def plan_scale(counts=(1000, 2000, 10000), dense_max: int = 2000) -> Table:
    """Planning time and peak memory for n snapshots (2 profiles each), subset vs dense (n <= dense_max)."""
    from dist_ema import phema

    tab = Table("Planning at scale (synthesis.plan_coefficients, 2 profiles per snapshot, targets 0.15 and 0.25)",
                ["snapshots", "solve", "s", "peak MiB", "error 0.15", "error 0.25"])
    for n in counts:
        above = 2 * n > phema.MAX_ROWS  # at or below the bound the library's solve is the dense one
        runs = [("subset", phema.MAX_ROWS)] + ([("dense", 10**9)] if above and n <= dense_max else [])
        for label, bound in runs:
            sec, peak, err = _plan_once(n, bound)
            tab.rows.append([f"{n:,}", label if above else "dense (below the bound)",
                             f"{sec:.2f}", f"{peak:.0f}", f"{err[0]:.2e}", f"{err[1]:.2e}"])
    return tab


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="planning time and peak memory at scale")
    ap.add_argument("--scale", type=int, nargs="+", default=[1000, 2000, 10000], metavar="N")
    ap.add_argument("--dense-max", type=int, default=2000, help="also time the dense solve up to this many snapshots")
    a = ap.parse_args()
    t = plan_scale(a.scale, a.dense_max)
    print(t.title)
    for r in [t.columns, *t.rows]:
        print("  ".join(f"{c:>12}" for c in r))
