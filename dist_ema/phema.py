"""Power-function EMA math of EDM2 (Karras et al., arXiv 2312.02696), float64 NumPy.

Pure functions, no torch.distributed, no I/O. Equation numbers refer to the paper.

Notation:
    t        time of a profile (steps, or samples when a batch size is given)
    gamma    exponent of the power-function profile p(tau) = (g+1) tau^g / t^(g+1) on [0, t]
    sigma_rel  relative standard deviation of that profile (Eq. 3)

Example:
    >>> g = sigma_rel_to_gamma(0.10)            # ~6.94
    >>> sol = solve_coefficients(t=[100, 200, 100, 200], gamma=[g, g, 16.97, 16.97],
    ...                          target_t=[200], target_gamma=[sigma_rel_to_gamma(0.15)])
    >>> sol.coefficients.shape                  # => [snapshots, targets]
    (4, 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dist_ema.errors import ConfigError, TargetError

__all__ = [
    "MAX_ROWS",
    "beta_to_sigma_rel",
    "sigma_rel_to_beta",
    "SIGMA_REL_MAX",
    "PROFILE_RTOL",
    "Solution",
    "find_gamma",
    "gamma_to_sigma_rel",
    "p_dot_p",
    "power_beta",
    "profile",
    "reconstructed_profile",
    "resolve_profiles",
    "choose_snapshots",
    "same_gamma",
    "sigma_rel_to_gamma",
    "solve_coefficients",
    "step_weights",
    "validate_gamma",
    "validate_sigma_rel",
]

ArrayLike = npt.ArrayLike

SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)  # sigma_rel of gamma = 0 (uniform average); larger has no gamma >= 0
PROFILE_RTOL = 1e-6  # gammas closer than this (relative; absolute below gamma = 1) are one profile
MAX_ROWS = 1024  # rows (snapshot x profile) one target time's solve uses at most: 512 snapshots of 2 profiles


def _as_f64(x: ArrayLike, name: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} must be numeric; got {x!r}") from e
    if not np.all(np.isfinite(a)):
        raise ConfigError(f"{name} must be finite; got {x!r}")
    return a


def _unwrap(a: np.ndarray, like: ArrayLike) -> float | np.ndarray:
    return float(a) if np.ndim(like) == 0 else a


def validate_sigma_rel(sigma_rel: ArrayLike, name: str = "sigma_rel") -> np.ndarray:
    """Return sigma_rel as float64, or raise ConfigError (a ValueError) unless 0 < sigma_rel < 1/sqrt(12)."""
    s = _as_f64(sigma_rel, name)
    bad = (s <= 0) | (s >= SIGMA_REL_MAX)
    if np.any(bad):
        why = ("sigma_rel is the EMA's width relative to the training time, so it must be > 0"
               if np.any(s <= 0) else "sigma_rel >= 1/sqrt(12) has no power-function profile (gamma < 0)")
        raise ConfigError(
            f"{name} must be in (0, {SIGMA_REL_MAX:.4f}); got {np.asarray(sigma_rel)[bad].tolist()}. "
            f"{why}; typical values are 0.05-0.20."
        )
    return s


def validate_gamma(gamma: ArrayLike, name: str = "gamma") -> np.ndarray:
    """Return gamma as float64, or raise ConfigError (a ValueError) unless gamma >= 0."""
    g = _as_f64(gamma, name)
    if np.any(g < 0):
        raise ConfigError(
            f"{name} must be >= 0; got {np.asarray(gamma)[g < 0].tolist()}. "
            f"gamma = 0 is the uniform average; typical values are 5-30."
        )
    return g


def sigma_rel_to_gamma(sigma_rel: ArrayLike) -> float | np.ndarray:
    """Exponent gamma of the power-function profile with relative std sigma_rel.

    gamma is the largest real root of g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2) = 0 (Eq. 125).
    Accepts a scalar (returns float) or an array (returns an array of the same shape).
    """
    s = validate_sigma_rel(sigma_rel)
    out = np.empty(s.shape, dtype=np.float64)
    for i, si in np.ndenumerate(s):
        k = si**-2
        roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
        g = roots[np.abs(roots.imag) < 1e-9 * max(1.0, np.abs(roots).max())].real.max()
        # one Newton step on the cubic sharpens the root from np.roots' eigenvalue solve
        f = ((g + 7.0) * g + 16.0 - k) * g + 12.0 - k
        df = (3.0 * g + 14.0) * g + 16.0 - k
        out[i] = g - f / df
    return _unwrap(out, sigma_rel)


def gamma_to_sigma_rel(gamma: ArrayLike) -> float | np.ndarray:
    """Relative std of the power-function profile with exponent gamma (Eq. 3)."""
    g = validate_gamma(gamma)
    return _unwrap(np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))), gamma)


def beta_to_sigma_rel(beta: ArrayLike, t: ArrayLike) -> float | np.ndarray:
    """The sigma_rel of a classic EMA with constant ``beta`` (one update per step) at time ``t`` steps.

    A classic EMA, ``ema <- beta * ema + (1 - beta) * x`` every step, weighs the value k steps back
    by ``(1 - beta) * beta**k``: a geometric profile whose standard deviation is
    ``sqrt(beta) / (1 - beta)`` steps. sigma_rel is a profile's standard deviation relative to its
    time t (EDM2), so::

        sigma_rel = sqrt(beta) / ((1 - beta) * t)

    It depends on t: a fixed beta is a narrower profile, relative to the run, the longer the run.
    Exact where the profile's tail before step 0 is negligible (t >> 1 / (1 - beta)). The result
    must be a valid target (below 1/sqrt(12)); a beta too close to 1 for this t is refused.
    Scalars or arrays (broadcast).
    """
    b, ts = _as_f64(beta, "beta"), _as_f64(t, "t")
    if np.any((b <= 0) | (b >= 1)):
        raise ConfigError(f"beta must be in (0, 1), e.g. 0.999; got {np.asarray(beta)[(b <= 0) | (b >= 1)].tolist()}")
    if np.any(ts <= 0):
        raise ConfigError(f"t must be > 0 (steps); got {np.asarray(t)[ts <= 0].tolist()}")
    s = np.sqrt(b) / ((1.0 - b) * ts)
    if np.any(s >= SIGMA_REL_MAX):
        raise ConfigError(
            f"beta {np.broadcast_to(b, s.shape)[s >= SIGMA_REL_MAX].tolist()} at t="
            f"{np.broadcast_to(ts, s.shape)[s >= SIGMA_REL_MAX].tolist()} averages over more than the run so far "
            f"(sigma_rel >= {SIGMA_REL_MAX:.4f}); no power-function profile matches it: use a smaller beta or a "
            f"later t")
    return float(s) if s.ndim == 0 else s


def sigma_rel_to_beta(sigma_rel: ArrayLike, t: ArrayLike) -> float | np.ndarray:
    """The constant beta of the classic EMA with the spread of ``sigma_rel`` at time ``t`` steps (the
    inverse of :func:`beta_to_sigma_rel`): with s = sigma_rel * t, sqrt(beta) = (sqrt(1 + 4 s^2) - 1) / (2 s)."""
    sr, ts = validate_sigma_rel(sigma_rel), _as_f64(t, "t")
    if np.any(ts <= 0):
        raise ConfigError(f"t must be > 0 (steps); got {np.asarray(t)[ts <= 0].tolist()}")
    s = sr * ts
    x = 2.0 * s / (np.sqrt(1.0 + 4.0 * s * s) + 1.0)  # (sqrt(1 + 4 s^2) - 1) / (2 s), without the cancellation
    out = x * x
    return float(out) if out.ndim == 0 else out


def same_gamma(a: float, b: float) -> bool:
    """True when the exponents a and b are the same profile: |a - b| <= 1e-6 * max(1, |a|, |b|).

    The one rule for "the same profile" everywhere (tracked profiles, duplicates in a list,
    a state dict's or a snapshot's profiles, a requested target): compare gammas, not
    sigma_rels (convert with :func:`sigma_rel_to_gamma`). The tolerance absorbs the
    round trip sigma_rel -> gamma -> sigma_rel and decimal spellings of one value; two
    profiles this close are indistinguishable to synthesis anyway (a singular system).

    Example:
        >>> same_gamma(sigma_rel_to_gamma(0.10), 6.94)
        False
        >>> same_gamma(sigma_rel_to_gamma(0.10), sigma_rel_to_gamma(0.1 + 1e-12))
        True
    """
    return abs(float(a) - float(b)) <= PROFILE_RTOL * max(1.0, abs(float(a)), abs(float(b)))


def find_gamma(gammas: ArrayLike, gamma: float) -> int | None:
    """Index of the first of ``gammas`` that is the same profile as ``gamma`` (:func:`same_gamma`), or None."""
    for i, g in enumerate(np.atleast_1d(np.asarray(gammas, dtype=np.float64)).tolist()):
        if same_gamma(g, gamma):
            return i
    return None


def resolve_profiles(
    sigma_rels: ArrayLike | None, gammas: ArrayLike | None, what: str = "profiles"
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(sigma_rels, gammas) of a list of profiles given by exactly one of the two, validated.

    Raises ConfigError (a ValueError) naming the problem: both or neither given, an empty list,
    a value out of range, or the same profile twice. ``what`` names the profiles in messages.
    """
    if (sigma_rels is None) == (gammas is None):
        raise ConfigError(f"give either sigma_rels or gammas for the {what}, not both and not neither")
    if sigma_rels is not None:
        s = tuple(float(x) for x in np.atleast_1d(sigma_rels))
        if not s:
            raise ConfigError(f"sigma_rels is empty: give at least one of the {what}, e.g. sigma_rels=(0.05, 0.10)")
        validate_sigma_rel(s, "sigma_rels")
        g = tuple(float(x) for x in np.atleast_1d(sigma_rel_to_gamma(s)))
    else:
        g = tuple(float(x) for x in np.atleast_1d(gammas))
        if not g:
            raise ConfigError(f"gammas is empty: give at least one of the {what}, e.g. gammas=(16.97, 6.94)")
        validate_gamma(g, "gammas")
        s = tuple(float(x) for x in np.atleast_1d(gamma_to_sigma_rel(g)))
    if any(find_gamma(g[:i], x) is not None for i, x in enumerate(g)):
        raise ConfigError(f"duplicate {what}: sigma_rels={list(s)}; list each profile once")
    return s, g


def power_beta(gamma: ArrayLike, t: ArrayLike, t_delta: ArrayLike) -> float | np.ndarray:
    """Exact per-update decay of a power-function EMA: beta = (1 - t_delta / t)^(gamma + 1).

    t is the time *after* this update, t_delta the time since the previous update
    (any size: updating every k steps with t_delta = k is exact). The first update has
    t_delta = t, so beta = 0 and the EMA starts at the current parameter.
    Use as ``ema.lerp_(param, 1 - beta)``.
    """
    g = validate_gamma(gamma)
    t_ = _as_f64(t, "t")
    td = _as_f64(t_delta, "t_delta")
    if np.any(t_ <= 0) or np.any(td <= 0) or np.any(td > t_):
        raise ConfigError(f"need 0 < t_delta <= t; got t={t!r}, t_delta={t_delta!r}")
    out = (1.0 - td / t_) ** (g + 1.0)
    return float(out) if out.ndim == 0 else out


def step_weights(gamma: float, t: ArrayLike) -> np.ndarray:
    """Weight of each past parameter value in a power-function EMA updated at times t.

    t: increasing update times t_1 < ... < t_n (t_0 = 0 implied). The parameter applied
    at t_k carries the profile's mass on (t_{k-1}, t_k]:
    (t_k^(g+1) - t_{k-1}^(g+1)) / t_n^(g+1). The weights sum to 1.
    """
    g = float(validate_gamma(gamma))
    tt = _as_f64(t, "t")
    if tt.ndim != 1 or tt.size == 0 or tt[0] <= 0 or np.any(np.diff(tt) <= 0):
        raise ConfigError("t must be a non-empty, strictly increasing sequence of positive times")
    r = tt / tt[-1]
    c = r ** (g + 1.0)
    return np.diff(np.concatenate([[0.0], c]))


def p_dot_p(t_a: ArrayLike, gamma_a: ArrayLike, t_b: ArrayLike, gamma_b: ArrayLike) -> np.ndarray:
    """Inner product of two power-function profiles (Eq. 125).

    <p_a, p_b> = (g_a+1)(g_b+1) min(t_a,t_b)^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1)),
    evaluated as a ratio of times so that large t and gamma do not overflow. Broadcasts.
    """
    t_a, g_a, t_b, g_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    ratio = np.where(t_a < t_b, t_a / t_b, t_b / t_a)  # min / max, in (0, 1]
    g_small = np.where(t_a < t_b, g_b, g_a)  # exponent of the ratio: the *other* profile's gamma
    num = (g_a + 1.0) * (g_b + 1.0) * ratio**g_small
    den = (g_a + g_b + 1.0) * np.maximum(t_a, t_b)
    return num / den


@dataclass(frozen=True)
class Solution:
    """Result of :func:`solve_coefficients`.

    Attributes:
        coefficients: float64 [snapshots, targets]; column j sums to 1 and is zero for
            every snapshot with t > target_t[j].
        error: float64 [targets]; relative L2 error ||p_rec - p_target|| / ||p_target||.
        condition: float64 [targets]; 2-norm condition number of the (diagonally
            scaled) matrix solved for each target.
        used: bool [snapshots, targets]; which snapshots entered each target's solve.
        subset: bool [targets]; True where more than ``max_rows`` rows were at or before the
            target, so the solve used the snapshots :func:`choose_snapshots` picks (``error``
            is then the error of that subset's coefficients).
    """

    coefficients: np.ndarray
    error: np.ndarray
    condition: np.ndarray
    used: np.ndarray
    subset: np.ndarray | None = None


def choose_snapshots(times: ArrayLike, limit: int) -> np.ndarray:
    """Indices of at most ``limit`` of the increasing snapshot times ``times``, to solve a target at times[-1] or later.

    Why a subset: the dense solve over n snapshots costs O(n^2) memory and O(n^3) time, and
    snapshots much closer together than the profiles' widths add little but ill-conditioning.
    The rule, deterministic and a function of ``times`` only:

    - half of the budget evenly spaced in t over [times[0], times[-1]]: wide targets
      (sigma_rel 0.2-0.25) reach back over most of the run;
    - a quarter evenly spaced in log t: a profile's width is proportional to its time, so
      early snapshots are needed closer together than late ones;
    - a quarter at distances back from the newest snapshot growing geometrically from its
      gap to its neighbour (at least 1/1000 of its time: closer profiles are near duplicates
      that only add ill-conditioning), at least one snapshot further back each time: narrow
      targets see the snapshots just before the target densely.

    The oldest and the newest snapshots are always kept. Returns every index when
    ``times.size <= limit``. Measured on 1,000 snapshots of sigma_rel 0.05 and 0.10 at the
    newest one, limit 512 (409 kept): errors of targets 0.01-0.25 at most 7.3e-4 where the
    dense solve's are at most 5.1e-4 (target 0.15: 2.7e-5 vs 2.4e-6; 0.25: 7.3e-4 vs 5.1e-4),
    condition 6.3e9 vs 1.1e10.
    """
    ts = np.asarray(times, dtype=np.float64)
    n = ts.size
    if n <= limit:
        return np.arange(n)
    if limit < 8:
        raise ConfigError(f"limit must be >= 8 snapshot times; got {limit}")
    even, logt = limit // 2, limit // 4
    near = limit - even - logt
    idx_even = np.searchsorted(ts, np.linspace(ts[0], ts[-1], even))
    idx_log = np.searchsorted(ts, np.geomspace(ts[0], ts[-1], logt))
    back = ts[-1] - ts  # distance back from the newest snapshot, decreasing to 0
    # from the nearest gap, but no closer than 1/1000 of the time: closer profiles are near duplicates
    dist = np.geomspace(min(max(back[-2], 1e-3 * ts[-1]), back[0]), back[0], near - 1)
    k = (n - 1) - np.searchsorted(ts, ts[-1] - dist).clip(0, n - 1)  # snapshots counted back from the newest
    j = np.arange(k.size)
    k = np.minimum(j + 1 + np.maximum.accumulate(k - j - 1), n - 1)  # k[j] >= j + 1: strictly further back
    idx = np.unique(np.concatenate([idx_even.clip(0, n - 1), idx_log.clip(0, n - 1), (n - 1) - k, [0, n - 1]]))
    return _spaced(ts, idx)


def _spaced(ts: np.ndarray, idx: np.ndarray, rel_gap: float = 1e-3) -> np.ndarray:
    """``idx`` (increasing) less each time closer than ``rel_gap`` x its time to the next one kept.

    Two grids can pick neighbours a step apart; two profiles that close are near duplicates
    (the condition number goes to 1e15) and add nothing. The newest is kept first.
    """
    keep = [int(idx[-1])]
    for i in idx[-2::-1].tolist():
        if ts[keep[-1]] - ts[i] >= rel_gap * ts[keep[-1]]:
            keep.append(i)
    return np.array(keep[::-1], dtype=np.int64)


def solve_coefficients(
    t: ArrayLike,
    gamma: ArrayLike,
    target_t: ArrayLike,
    target_gamma: ArrayLike,
    max_rows: int = MAX_ROWS,
) -> Solution:
    """Least-squares coefficients that combine snapshot profiles into target profiles.

    For each target (t_r, g_r), solve A x = b over the snapshots with t_i <= t_r, where
    A_ij = <p_i, p_j> and b_i = <p_i, p_r> (Eq. 126), then rescale x to sum to 1 as EDM2
    does. The solve is diagonally scaled (A -> D A D, D = diag(A)^-1/2), which leaves x
    unchanged in exact arithmetic and removes the spread of profile norms from the
    condition number. Where more than ``max_rows`` rows are at or before t_r, the solve runs
    over the snapshots :func:`choose_snapshots` picks (every profile of each chosen time, at
    most ``max_rows`` rows), so memory and time stay bounded with any number of snapshots;
    the other rows get coefficient 0, and ``error`` is the error of the coefficients
    returned. At or below the bound every snapshot enters: the dense solve, bitwise.

    Args:
        t, gamma: [n] time and exponent of each snapshot's profile.
        target_t, target_gamma: [m] time and exponent of each target (broadcast together).
        max_rows: rows one target time's solve uses at most (>= 8 x the profiles per snapshot).

    Raises:
        ConfigError: non-finite or non-positive times, negative gamma, or duplicate (t, gamma)
            snapshots (singular A).
        TargetError: no snapshots, a target with no snapshot at or before its time, or one
            that cannot be reconstructed. Both are ValueErrors.
    """
    ts = np.atleast_1d(_as_f64(t, "t"))
    gs = np.atleast_1d(validate_gamma(gamma, "gamma"))
    if ts.shape != gs.shape or ts.ndim != 1:
        raise ConfigError(f"t and gamma must be 1-d of the same length; got {ts.shape} and {gs.shape}")
    if ts.size == 0:
        raise TargetError("no snapshots: need at least one (t, gamma) snapshot to synthesize from")
    if np.any(ts <= 0):
        raise ConfigError(f"snapshot times must be > 0; got {ts[ts <= 0].tolist()}")
    tr, gr = np.broadcast_arrays(
        np.atleast_1d(_as_f64(target_t, "target_t")), np.atleast_1d(validate_gamma(target_gamma, "target_gamma"))
    )
    if tr.ndim != 1:
        raise ConfigError("target_t and target_gamma must be scalars or 1-d")
    if np.any(tr <= 0):
        raise ConfigError(f"target time must be > 0; got {tr[tr <= 0].tolist()}")
    keys = np.stack([ts, gs], axis=1)
    uniq, counts = np.unique(keys, axis=0, return_counts=True)
    if np.any(counts > 1):
        dup = uniq[counts > 1][0]
        raise ConfigError(
            f"snapshot profile (t={dup[0]:g}, gamma={dup[1]:g}) is listed {counts.max()} times; "
            f"duplicate profiles make the system singular: pass each snapshot once"
        )

    n, m = ts.size, tr.size
    X = np.zeros((n, m))  # => [snapshots, targets]
    err = np.zeros(m)
    cond = np.zeros(m)
    used = np.zeros((n, m), dtype=bool)  # => [snapshots, targets]
    subset = np.zeros(m, dtype=bool)
    # targets at the same time share the snapshot set and so the matrix: factor it once per time
    for t_j in np.unique(tr):
        cols = np.flatnonzero(tr == t_j)
        sel = np.flatnonzero(ts <= t_j)
        if sel.size == 0:
            raise TargetError(
                f"target time {t_j:g} is before the first snapshot (t={ts.min():g}): "
                f"no snapshot at or before it; choose t >= {ts.min():g}"
            )
        sel, subset[cols] = _subset(ts, sel, max_rows)
        used[np.ix_(sel, cols)] = True
        ti, gi = ts[sel], gs[sel]
        A = p_dot_p(ti[:, None], gi[:, None], ti[None, :], gi[None, :])  # => [k, k]
        B = p_dot_p(ti[:, None], gi[:, None], t_j, gr[None, cols])  # => [k, targets at t_j]
        d = 1.0 / np.sqrt(np.diag(A))
        As = A * d[:, None] * d[None, :]
        ev = np.linalg.eigvalsh(As)  # As is symmetric positive (semi)definite: cond = max / min eigenvalue
        cond[cols] = ev[-1] / ev[0] if ev[0] > 0 else np.inf
        try:
            Y = np.linalg.solve(As, B * d[:, None])
        except np.linalg.LinAlgError:
            Y = np.linalg.lstsq(As, B * d[:, None], rcond=None)[0]
        Xs = Y * d[:, None]  # => [k, targets at t_j]
        for c, j in enumerate(cols):
            x = Xs[:, c]
            total = x.sum()
            if not np.isfinite(total) or total == 0:
                raise TargetError(f"target {j} (t={tr[j]:g}, gamma={gr[j]:g}) cannot be reconstructed (singular)")
            x = x / total
            b = B[:, c]
            rr = float(p_dot_p(tr[j], gr[j], tr[j], gr[j]))
            sq = x @ A @ x - 2.0 * x @ b + rr
            err[j] = math.sqrt(max(sq, 0.0) / rr)
            X[sel, j] = x
    return Solution(coefficients=X, error=err, condition=cond, used=used, subset=subset)


def _subset(ts: np.ndarray, sel: np.ndarray, max_rows: int) -> tuple[np.ndarray, bool]:
    """``sel`` (rows at or before a target time) cut to every profile of the times :func:`choose_snapshots` picks.

    Returns (rows, whether it cut). At or below ``max_rows`` rows ``sel`` comes back as it is, so
    the solve is the dense one, bitwise. Above it, at most max_rows // (most profiles of one time)
    times are kept, so the rows stay within ``max_rows``.
    """
    if sel.size <= max_rows:
        return sel, False
    times, counts = np.unique(ts[sel], return_counts=True)  # sorted
    limit = max_rows // int(counts.max())
    if limit < 8:
        raise ConfigError(f"max_rows={max_rows} is too small for snapshots of {counts.max()} profiles; "
                          f"give at least {8 * int(counts.max())}")
    keep = times[choose_snapshots(times, limit)]
    return sel[np.isin(ts[sel], keep)], True


def profile(t: float, gamma: float, tau: ArrayLike) -> np.ndarray:
    """Evaluate p(tau) = (g+1) tau^g / t^(g+1) on [0, t], zero after t."""
    tau = np.asarray(tau, dtype=np.float64)
    g = float(validate_gamma(gamma))
    inside = (tau >= 0) & (tau <= t)
    r = np.clip(tau / t, 0.0, 1.0)
    return np.where(inside, (g + 1.0) * r**g / t, 0.0)


def reconstructed_profile(
    coefficients: ArrayLike, t: ArrayLike, gamma: ArrayLike, tau: ArrayLike
) -> np.ndarray:
    """Evaluate sum_i x_i p_i(tau) for one column of coefficients (for plots)."""
    x = np.asarray(coefficients, dtype=np.float64)
    ts, gs = np.asarray(t, dtype=np.float64), np.asarray(gamma, dtype=np.float64)
    tau = np.asarray(tau, dtype=np.float64)
    return sum((xi * profile(ti, gi, tau) for xi, ti, gi in zip(x, ts, gs) if xi != 0), np.zeros_like(tau))
