"""Retention: which committed snapshots to keep. Pure.

Keeping only the last K snapshots ruins reconstruction (the last 20 of 1M steps give
~30-40% profile error): a power-function profile reaches back to the start of
training. ``thin_evenly`` keeps at most K snapshots spread over the whole run.
"""

from __future__ import annotations

from collections.abc import Sequence

from dist_ema.errors import ConfigError

__all__ = ["thin_evenly", "validate_keep"]


def validate_keep(keep: int | None) -> int | None:
    if keep is None:
        return None
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 2:
        raise ConfigError(
            f"keep must be None (keep every snapshot) or an integer >= 2 (thin to that many, spread evenly over "
            f"the run); got {keep!r}"
        )
    return keep


def thin_evenly(times: Sequence[float], keep: int) -> list[int]:
    """Indices (into ``times``, sorted ascending) of snapshots to delete so that at most ``keep`` remain.

    Kept: for each of ``keep`` evenly spaced times t_last * i / keep (i = 1..keep), the
    snapshot closest to it (later wins ties); always the newest. Deterministic.
    """
    n = len(times)
    if n <= keep:
        return []
    if any(b < a for a, b in zip(times, times[1:])):
        raise ConfigError("times must be sorted ascending")
    last = times[-1]
    kept = {n - 1}
    for i in range(1, keep):
        target = last * i / keep
        best = min(range(n), key=lambda j: (abs(times[j] - target), -j))
        kept.add(best)
    # targets can collide: fill up with the largest gaps' midpoints' nearest snapshots
    while len(kept) < keep:
        ks = sorted(kept)
        gaps = [(times[b] - times[a], a, b) for a, b in zip([-1, *ks], ks) if b - a > 1 and a >= 0] + (
            [(times[ks[0]], -1, ks[0])] if ks[0] > 0 else [])
        if not gaps:
            break
        _, a, b = max(gaps)
        lo = times[a] if a >= 0 else 0.0
        mid = (lo + times[b]) / 2
        kept.add(min(range(a + 1, b), key=lambda j: (abs(times[j] - mid), -j)))
    return [j for j in range(n) if j not in kept]
