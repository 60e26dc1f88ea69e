"""Synthesize straight into a live (sharded) model: no files, each rank reads only its own shards.

    res = dist_ema.load_synthesized(model, "s3://bucket/run/snapshots", sigma_rel=0.15)
    evaluate(model)                        # computes with the EMA for sigma_rel 0.15

Phases, as in synthesis: **plan** (rank 0 lists the store and solves for the target; every
rank gets the same plan), **map** (every rank reads, from every snapshot with a non-zero
coefficient, exactly the ranges its own shards hold, at any world size and under any
engine, and sums them in float64), **load** (every rank writes its shards: the parameter
shard or working weights and the engine's fp32 master where it has one, then the engine's
after-load hook so that every layer's next forward computes with what was written).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dist_ema.collective import broadcast_object, is_distributed, run_and_check
from dist_ema.store.fs import StoreError
from dist_ema.store.layout import param_mismatch
from dist_ema.store.reader import Snapshot, SnapshotStore

__all__ = ["LoadResult", "load_synthesized"]


@dataclass(frozen=True)
class LoadResult:
    """What ``load_synthesized`` put into the model (the same on every rank)."""

    sigma_rel: float
    gamma: float
    t: float
    error: float  # the target's relative reconstruction error
    snapshots: tuple[str, ...]  # the snapshots used
    coefficients: tuple[float, ...]  # per (snapshot, profile) row
    rows: tuple[tuple[int, int], ...]  # row -> (index in snapshots, profile)
    bytes_read: int  # by this rank


@dataclass(frozen=True)
class _Plan:
    used: tuple[Snapshot, ...]
    rows: tuple[tuple[int, int], ...]
    x: tuple[float, ...]
    sigma_rel: float
    gamma: float
    t: float
    error: float


def _plan(store: SnapshotStore, sigma_rel, gamma, t, step, params: dict) -> _Plan:
    from dist_ema.synthesis import _choose_time, _targets, plan_coefficients

    (s,), (g,) = _targets([sigma_rel] if sigma_rel is not None else None, [gamma] if gamma is not None else None)
    snaps = store.snapshots()
    if not snaps:
        raise StoreError(f"no committed snapshot in {store.url}: nothing to synthesize from")
    target_t = _choose_time(snaps, t, step)
    used = [x for x in snaps if x.t <= target_t]
    diff = param_mismatch({f: shape for f, (shape, _) in params.items()},
                          {f: shape for f, (shape, _) in store.params(used[-1]).items()})
    if diff is not None:
        raise StoreError(f"the model does not match the snapshots in {store.url}: {diff}")
    X, sol, rows = plan_coefficients([(x.t, x.gammas) for x in used], target_t, [g])
    return _Plan(tuple(used), tuple((int(i), int(k)) for i, k in rows), tuple(float(v) for v in X[:, 0]), s, g,
                 target_t, float(sol.error[0]))


@torch.no_grad()
def load_synthesized(model_or_engine, url: str, sigma_rel: float | None = None, *, gamma: float | None = None,
                     t: float | None = None, step: int | None = None,
                     storage_options: dict | None = None) -> LoadResult:
    """Write the EMA for ``sigma_rel`` (or ``gamma``) at time ``t`` into the model's own shards. Collective.

    ``model_or_engine``: what :class:`~dist_ema.PostHocEMA` accepts (FSDP2, FSDP1, DeepSpeed
    ZeRO 1/2/3, DDP, a plain module), at any world size, not only the training run's.
    ``t`` / ``step``: the target time (default: the newest snapshot's). The training weights
    are overwritten: save them first if you need them back (or use ``PostHocEMA.swapped``
    inside training). Returns what was used; errors on any rank are raised on every rank.

    Example:
        >>> for s in (0.05, 0.10, 0.15, 0.20):
        ...     res = dist_ema.load_synthesized(model, url, sigma_rel=s)
        ...     print(s, res.error, evaluate(model))
    """
    from dist_ema.sharding.checks import verify_layout
    from dist_ema.sharding.detect import make_layout

    layout = make_layout(model_or_engine)
    verify_layout(layout)
    rank = torch.distributed.get_rank() if is_distributed() else 0

    # ---- plan: rank 0 lists and solves once; everyone gets the plan or the same error
    box: dict = {}

    def plan0() -> None:
        box["store"] = SnapshotStore(url, storage_options)
        box["plan"] = _plan(box["store"], sigma_rel, gamma, t, step, layout.params)

    run_and_check(plan0 if rank == 0 else (lambda: None), f"planning the synthesis from {url}", None, StoreError)
    plan: _Plan = broadcast_object(box.get("plan"))

    # ---- map: this rank's ranges of every snapshot with a coefficient, summed in float64
    pieces = layout.pieces
    offsets = np.cumsum([0] + [p.numel for p in pieces])
    total = int(offsets[-1])

    def read_all() -> tuple[np.ndarray, int]:
        store = box.get("store") or SnapshotStore(url, storage_options)
        acc = np.zeros(total, dtype=np.float64)
        vals = np.empty(total, dtype=np.float64)
        scratch = bytearray()
        nbytes = 0
        for (i, k), x in zip(plan.rows, plan.x):
            if x == 0.0 or total == 0:
                continue
            nbytes += store.read_pieces(plan.used[i], k, pieces, offsets, vals, scratch)[1]
            acc += x * vals
        return acc, nbytes

    acc, nbytes = run_and_check(read_all, f"reading the snapshots of {url} for load_synthesized", None, StoreError)

    # ---- load: every piece (replicas too), master and working weights, then the engine's hook
    for j, p in enumerate(pieces):
        v = torch.from_numpy(acc[int(offsets[j]) : int(offsets[j + 1])])
        for target in [p.source] + ([p.load_target] if p.load_target is not None else []):
            target.copy_(v.to(device=target.device, dtype=target.dtype).view_as(target))
    if layout.after_load is not None:
        layout.after_load()
    return LoadResult(sigma_rel=plan.sigma_rel, gamma=plan.gamma, t=plan.t, error=plan.error,
                      snapshots=tuple(s.id for s in plan.used), coefficients=plan.x, rows=plan.rows,
                      bytes_read=int(nbytes))

