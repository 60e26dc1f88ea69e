"""Swapping values into the live (sharded) model, and back; synthesizing an EMA from the live state.

``PostHocEMA.swapped`` / ``tracked_swapped`` / ``synthesized_shards`` delegate here, passing
their pieces and values, not the tracker. A swap writes one value per piece into its
``source`` (and ``load_target``, where the engine computes with another copy), runs the
layout's ``after_load`` so that every rank's next forward computes with them, and on exit
writes the saved training weights back, bit for bit, the same way. An untracked profile is
synthesized first (:func:`synthesized_shards`): this rank's pieces only, from the store's
committed snapshots and the live EMA state, with no gathers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

from dist_ema import phema
from dist_ema.errors import ConfigError, TargetError
from dist_ema.sharding.base import ShardPiece

__all__ = ["swapped_values", "synthesized_shards", "write_into_pieces"]


class _Profile(Protocol):
    gamma: float
    flat: torch.Tensor


class _Clock(Protocol):
    t_updated: float
    updates: int


def write_into_pieces(pieces: Sequence[ShardPiece], values: Sequence[torch.Tensor]) -> None:
    """Copy ``values[i]`` (``pieces[i].numel`` elements, any dtype and device) into piece i's
    ``source`` and ``load_target``, converted to theirs. Call the layout's ``after_load`` after it."""
    with torch.no_grad():
        for p, v in zip(pieces, values):
            for x in [p.source] + ([p.load_target] if p.load_target is not None else []):
                x.copy_(v.reshape(x.shape))


@contextlib.contextmanager
def swapped_values(pieces: Sequence[ShardPiece], values: Sequence[torch.Tensor] | Callable[[], Sequence[torch.Tensor]],
                   after_load: Callable[[], None] | None) -> Iterator[None]:
    """``values`` (one tensor per piece, or a function returning them, called on entering) in the live model.

    The training weights are saved, and restored exactly on exit; ``after_load`` (the layout's)
    runs after each write. Collective when ``after_load`` is: every rank enters and leaves together.
    """
    if callable(values):
        values = values()
    with torch.no_grad():
        backups = [[x.clone() for x in [p.source] + ([p.load_target] if p.load_target is not None else [])]
                   for p in pieces]
    write_into_pieces(pieces, values)
    if after_load is not None:
        after_load()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, saved in zip(pieces, backups):
                targets = [p.source] + ([p.load_target] if p.load_target is not None else [])
                for x, s in zip(targets, saved):
                    x.copy_(s)
        if after_load is not None:
            after_load()


@torch.no_grad()
def synthesized_shards(clock: _Clock, profiles: Sequence[_Profile], pieces: Sequence[ShardPiece], snapshots,
                       *, sigma_rel: float | None = None, gamma: float | None = None
                       ) -> tuple[torch.Tensor, float | None]:
    """This rank's shards of the EMA for any profile at the clock's time, as one flat fp32 tensor, and its error.

    Combines every snapshot taken so far (``snapshots``: the tracker's SnapshotManager, or None)
    with the live EMA state (``profiles``' flat buffers, the newest "snapshot", at
    ``clock.t_updated``) using the paper's least-squares coefficients. Snapshots still in the
    writer are committed first (``flush``), so the result never depends on the writer's timing.
    Rank 0 lists the store and solves; every rank gets the same coefficients. A tracked profile
    is returned as it is (a copy), with error None. Each rank reads only its own pieces (in the
    order of the profiles' buffers): no gathers. Collective when there are snapshots.
    """
    from dist_ema.synthesis import _targets

    _, (g,) = _targets([sigma_rel] if sigma_rel is not None else None, [gamma] if gamma is not None else None)
    if clock.updates == 0:
        raise ConfigError("no EMA yet: call update() after optimizer steps before synthesizing")
    gammas = tuple(p.gamma for p in profiles)
    k = phema.find_gamma(gammas, g)
    if k is not None:
        return profiles[k].flat.clone(), None
    t_now = clock.t_updated
    snaps, reader = [], None
    if snapshots is not None:
        snapshots.flush()  # every snapshot taken so far committed, whatever the writer's timing (collective)
        reader, snaps = snapshots.committed_snapshots()
        snaps = [s for s in snaps if s.t < t_now]  # one at t_now holds what the live state holds
    sources = [(s.t, s.gammas) for s in snaps] + [(t_now, gammas)]
    X, error, rows = _plan(snapshots, sources, t_now, g)
    live = profiles[0].flat
    offsets = np.cumsum([0] + [p.numel for p in pieces]).tolist()
    out = torch.zeros(live.numel(), dtype=torch.float64, device=live.device)
    for x, (i, k) in zip(X, rows):
        if x == 0.0:
            continue
        if i == len(snaps):  # the live state
            out.add_(profiles[k].flat.double(), alpha=x)
        else:
            from dist_ema.collective import run_and_check
            from dist_ema.store.fs import StoreError

            # a read error on one rank (a damaged or missing object) is raised on every rank
            vals = run_and_check(lambda i=i, k=k: reader.read_pieces(snaps[i], k, pieces, offsets)[0],
                                 f"reading snapshot {snaps[i].id} for swapped()", snapshots.group, StoreError)
            out.add_(torch.from_numpy(vals).to(live.device).double(), alpha=x)
    return out.float(), error


def _plan(snapshots, sources: list, t_now: float, g: float) -> tuple[list[float], float, list[tuple[int, int]]]:
    """(coefficients, error, rows) for target gamma ``g`` at ``t_now``: solved on rank 0 and broadcast.

    Without a store the sources are the live tracked profiles only, the same on every rank:
    each rank solves that small system itself (no collective is needed).
    """
    from dist_ema.collective import broadcast_object, rank, run_and_check
    from dist_ema.synthesis import plan_coefficients

    def solve() -> tuple[list[float], float, list[tuple[int, int]]]:
        X, sol, rows = plan_coefficients(sources, t_now, [g])
        return [float(x) for x in X[:, 0]], float(sol.error[0]), rows

    if snapshots is None:
        return solve()
    group = snapshots.group
    box: dict = {}
    run_and_check((lambda: box.setdefault("plan", solve())) if rank(group) == 0 else (lambda: None),
                  "planning swapped()", group, TargetError)
    return broadcast_object(box.get("plan"), 0, group)  # type: ignore[return-value]
