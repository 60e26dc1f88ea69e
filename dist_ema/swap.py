"""Swapping an EMA into the live (sharded) model, and back.

``PostHocEMA.swapped`` / ``tracked_swapped`` delegate here. A swap writes one profile's
values into every piece's ``source`` (and ``load_target``, where the engine computes with
another copy), runs the engine's re-sync (``layout.after_load``, the replicated resync)
so that every rank's next forward computes with them, and on exit writes the saved
training weights back, bit for bit, the same way. An untracked profile is synthesized
first (:func:`synthesized_shards`): this rank's pieces only, from the store's committed
snapshots and the live EMA state, with no gathers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from dist_ema import phema

if TYPE_CHECKING:
    from dist_ema.tracker import PostHocEMA

__all__ = ["after_load", "swapped", "swapped_values", "synthesized_shards", "tracked_swapped"]


def after_load(ema: PostHocEMA) -> None:
    """Make every rank's next forward compute with what was just written into the pieces (collective)."""
    if ema._resync is not None:
        ema._resync()
    if ema.layout.after_load is not None:
        ema.layout.after_load()


@torch.no_grad()
def synthesized_shards(ema: PostHocEMA, sigma_rel: float | None = None, gamma: float | None = None) -> torch.Tensor:
    """This rank's shards of the EMA for any profile at the current time, as one flat fp32 tensor.

    Combines every snapshot taken so far with the live EMA state (the newest "snapshot", at
    the current time) using the paper's least-squares coefficients; sets
    ``ema.last_synthesis_error``. Snapshots still in the writer are committed first
    (``flush``), so the result never depends on the writer's timing. Rank 0 lists the store
    and solves; every rank gets the same coefficients. A tracked profile is returned as it is
    (a copy). Each rank reads only its own pieces: no gathers. Collective.
    """
    from dist_ema.synthesis import _targets

    _, (g,) = _targets([sigma_rel] if sigma_rel is not None else None, [gamma] if gamma is not None else None)
    if ema.clock.updates == 0:
        raise ValueError("no EMA yet: call update() after optimizer steps before synthesizing")
    k = phema.find_gamma(ema.gammas, g)
    if k is not None:
        return ema.profiles[k].flat.clone()
    t_now = ema.clock.t_updated
    snaps, reader = [], None
    if ema.snapshots is not None:
        ema.snapshots.flush()  # every snapshot taken so far committed, whatever the writer's timing (collective)
        reader, snaps = ema.snapshots.committed_snapshots()
        snaps = [s for s in snaps if s.t < t_now]  # one at t_now holds what the live state holds
    sources = [(s.t, s.gammas) for s in snaps] + [(t_now, ema.gammas)]
    X, error, rows = _plan(ema, sources, t_now, g)
    out = torch.zeros(ema.offsets[-1], dtype=torch.float64, device=ema.device)
    for x, (i, k) in zip(X, rows):
        if x == 0.0:
            continue
        if i == len(snaps):  # the live state
            out.add_(ema.profiles[k].flat.double(), alpha=x)
        else:
            from dist_ema.collective import run_and_check
            from dist_ema.snapshots import read_pieces
            from dist_ema.store.fs import StoreError

            # a read error on one rank (a damaged or missing object) is raised on every rank
            vals = run_and_check(lambda i=i, k=k: read_pieces(reader, snaps[i], k, ema.pieces, ema.offsets),
                                 f"reading snapshot {snaps[i].id} for swapped()", ema.snapshots.group, StoreError)
            out.add_(torch.from_numpy(vals).to(ema.device).double(), alpha=x)
    ema.last_synthesis_error = error
    return out.float()


def _plan(ema: PostHocEMA, sources: list, t_now: float, g: float) -> tuple[list[float], float, list[tuple[int, int]]]:
    """(coefficients, error, rows) for target gamma ``g`` at ``t_now``: solved on rank 0 and broadcast.

    Without a store the sources are the live tracked profiles only, the same on every rank:
    each rank solves that small system itself (no collective is needed).
    """
    from dist_ema.collective import broadcast_object, rank, run_and_check
    from dist_ema.synthesis import plan_coefficients

    def solve() -> tuple[list[float], float, list[tuple[int, int]]]:
        X, sol, rows = plan_coefficients(sources, t_now, [g])
        return [float(x) for x in X[:, 0]], float(sol.error[0]), rows

    if ema.snapshots is None:
        return solve()
    group = ema.snapshots.group
    box: dict = {}
    run_and_check((lambda: box.setdefault("plan", solve())) if rank(group) == 0 else (lambda: None),
                  "planning swapped()", group, ValueError)
    return broadcast_object(box.get("plan"), 0, group)  # type: ignore[return-value]


@contextlib.contextmanager
def swapped(ema: PostHocEMA, sigma_rel: float | None = None, *, gamma: float | None = None) -> Iterator[None]:
    """The EMA for any sigma_rel (or gamma) at the current time in the live model; see ``PostHocEMA.swapped``."""
    values = synthesized_shards(ema, sigma_rel=sigma_rel, gamma=gamma)
    views = [values[a:b] for a, b in zip(ema.offsets[:-1], ema.offsets[1:])]
    with swapped_values(ema, views):
        yield


@contextlib.contextmanager
def tracked_swapped(ema: PostHocEMA, sigma_rel: float) -> Iterator[None]:
    """A tracked profile in the live model; see ``PostHocEMA.tracked_swapped``."""
    prof = ema.profile(sigma_rel=sigma_rel)
    with swapped_values(ema, prof.views):
        yield


@contextlib.contextmanager
def swapped_values(ema: PostHocEMA, values: Sequence[torch.Tensor]) -> Iterator[None]:
    """``values`` (one tensor per piece, indexed like ``ema.pieces``) in the live model, the training weights
    saved and restored exactly on exit (collective: every rank enters and leaves together)."""
    # a refresh keeps the pieces' order (or raises), so values stay aligned with ema.pieces
    if ema._stale:  # the model loaded a checkpoint (maybe assign=True) since the views were listed
        ema.refresh_views()
    backups = []
    with torch.no_grad():
        for p, v in zip(ema.pieces, values):
            targets = [p.source] + ([p.load_target] if p.load_target is not None else [])
            backups.append([x.clone() for x in targets])
            for x in targets:
                x.copy_(v)
        after_load(ema)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, saved in zip(ema.pieces, backups):
                targets = [p.source] + ([p.load_target] if p.load_target is not None else [])
                for x, s in zip(targets, saved):
                    x.copy_(s)
            after_load(ema)
