"""The profiles a library's EMA actually applied, step by step (pure NumPy, float64; no I/O).

A library EMA (see libraries.py) counts its calls i = 1, 2, ..., updates at the calls
u_0 = 1, u_1 = 1 + k, u_2 = 1 + 2k, ... (k = update_every) with

    beta_1 = 0 (the first update copies the weights),  beta_i = (1 - 1/(i + 1))^(gamma + 1)

(nitrous-ema's ``step_size_correction``: ((1 - 1/(i+1))^(g+1) (1 - 1/(i+1+k))^(g+1))^(k/2)).
Telescoping the betas gives the weight of the model's weights at update call u_n in the EMA
after its last update u_q:

    w_n = (1 - beta_n) prod_{n < m <= q} beta_m = (1 - beta_n) exp(P_q - P_n),  P_n = sum_{1 <= m <= n} log beta_m

With k = 1 this is exactly the power-function profile at t = u_q + 1 integrated over [i, i + 1]
(the first call over [0, 2]); with k > 1 it is not (the one-step beta is applied once per k
steps: the profile is much wider than the nominal one). Here the update at u_n stands for the
calls up to the next update, [u_n, u_{n+1}] (the first from 0, the last [u_q, u_q + 1]), and
profiles are compared as piecewise-constant densities on those bins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "applied_weights",
    "bin_edges",
    "betas",
    "combined_weights",
    "effective_sigma_rels",
    "nominal_weights",
    "relative_l2",
    "update_calls",
]


def update_calls(calls: int, k: int) -> np.ndarray:
    """The EMA calls (1-based) that updated the EMA, up to call ``calls``: 1, 1 + k, ..."""
    return np.arange(1, int(calls) + 1, int(k), dtype=np.int64)


def betas(gamma: float, upd: np.ndarray, k: int, correction: bool = False) -> np.ndarray:
    """The decay the library applied at each update call in ``upd`` (the first: 0, a copy)."""
    i = upd.astype(np.float64)
    b = (1.0 - 1.0 / (i + 1.0)) ** (gamma + 1.0)
    if correction:  # nitrous-ema's step_size_correction (nitrous_ema/ema.py l.147-151)
        b = (b * (1.0 - 1.0 / (i + 1.0 + k)) ** (gamma + 1.0)) ** (k / 2.0)
    b[upd == 1] = 0.0
    return b


def _log_prefix(b: np.ndarray) -> np.ndarray:
    """P_n = sum_{1 <= m <= n} log beta_m (P_0 = 0: the first update's beta never enters a product)."""
    lb = np.log(np.where(b > 0, b, 1.0))
    lb[0] = 0.0
    return np.cumsum(lb)


def applied_weights(gamma: float, calls: int, k: int, correction: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(update calls, the weight of the model's weights at each) in the EMA after ``calls`` calls. Sums to 1."""
    upd = update_calls(calls, k)
    b = betas(gamma, upd, k, correction)
    P = _log_prefix(b)
    return upd, (1.0 - b) * np.exp(P[-1] - P)


def bin_edges(upd: np.ndarray) -> np.ndarray:
    """Bin edges of the updates ``upd``: [0, u_1, ..., u_q, u_q + 1] (the last update's bin is one step)."""
    return np.concatenate([[0.0], upd[1:].astype(np.float64), [float(upd[-1]) + 1.0]])


def nominal_weights(gamma: float, edges: np.ndarray) -> np.ndarray:
    """The power-function profile at t = edges[-1] integrated over each bin (Eq. 4's cumulative form)."""
    return np.diff((edges / edges[-1]) ** (gamma + 1.0))


def relative_l2(w: np.ndarray, p: np.ndarray, edges: np.ndarray) -> float:
    """||w - p|| / ||p|| of the densities w / width and p / width on the bins."""
    width = np.diff(edges)
    den = float(np.sum(p * p / width))
    return math.sqrt(float(np.sum((w - p) ** 2 / width)) / den) if den > 0 else float("nan")


def combined_weights(gamma: float, k: int, correction: bool, last: Sequence[int], x: Sequence[float],
                     n_updates: int) -> np.ndarray:
    """sum_s x_s w^(s) over the first ``n_updates`` updates, for snapshots s of one profile whose last update
    is update number ``last[s]`` (0-based). O(n_updates + snapshots), no overflow: the snapshots are
    visited newest first, carrying R_m = sum_{s >= m} x_s exp(P_{q_s} - P_{q_m})."""
    upd = np.arange(n_updates, dtype=np.int64) * int(k) + 1
    b = betas(gamma, upd, k, correction)
    P = _log_prefix(b)
    q, inv = np.unique(np.asarray(last, dtype=np.int64), return_inverse=True)
    xs = np.zeros(q.size)
    np.add.at(xs, inv, np.asarray(x, dtype=np.float64))
    R = np.empty(q.size)
    R[-1] = xs[-1]
    for m in range(q.size - 2, -1, -1):
        R[m] = xs[m] + math.exp(P[q[m + 1]] - P[q[m]]) * R[m + 1]
    out = np.zeros(n_updates)
    n = np.arange(q[-1] + 1)
    seg = np.searchsorted(q, n)  # the first snapshot whose last update is at or after n
    out[: q[-1] + 1] = (1.0 - b[: q[-1] + 1]) * np.exp(P[q[seg]] - P[n]) * R[seg]
    return out


def effective_sigma_rels(gamma: float, k: int, correction: bool, calls: Sequence[int]) -> np.ndarray:
    """The std of the applied weights over time, relative to t = last update + 1, for EMAs after each of
    ``calls`` (increasing). The weights at update call u sit at the middle of the step they are the weights
    of, u + 1/2 (the first call's, which cover [0, 2], at 1). One pass over the updates (moments carried
    from snapshot to snapshot)."""
    calls = [int(c) for c in calls]
    upd = update_calls(max(calls), k)
    b = betas(gamma, upd, k, correction)
    P = _log_prefix(b)
    tau = upd.astype(np.float64) + 0.5
    tau[0] = 1.0
    v = 1.0 - b
    out = np.empty(len(calls))
    M = np.zeros(3)
    prev = -1  # index of the last update already in M
    for j, c in enumerate(calls):
        q = int(np.searchsorted(upd, c, side="right")) - 1  # the last update at or before call c
        if q > prev:
            seg = slice(prev + 1, q + 1)
            w = v[seg] * np.exp(P[q] - P[seg])
            decay = math.exp(P[q] - P[prev]) if prev >= 0 else 0.0
            M = decay * M + np.array([w.sum(), (w * tau[seg]).sum(), (w * tau[seg] ** 2).sum()])
            prev = q
        mean = M[1] / M[0]
        var = max(M[2] / M[0] - mean * mean, 0.0)
        out[j] = math.sqrt(var) / (float(upd[q]) + 1.0)
    return out
