"""Synthesize straight into a live (sharded) model: no files, each rank reads only its own shards.

    res = dist_ema.load_synthesized(model, "s3://bucket/run/snapshots", sigma_rel=0.15)
    evaluate(model)                        # computes with the EMA for sigma_rel 0.15

Phases, as in synthesis: **plan** (rank 0 lists the store, matches it with the model and
solves for the target; every rank gets the same plan), **map** (every rank reads, from every
snapshot with a non-zero coefficient, exactly the ranges its own shards hold, at any world
size and under any engine, and sums them in float64), **load** (every rank writes its shards:
the parameter shard or working weights and the engine's fp32 master where it has one, and the
newest used snapshot's buffers, as ``synthesize`` exports them; then the engine's after-load
hook so that every layer's next forward computes with what was written).

Matching: a store written with ``include_frozen=False`` holds no EMA of the parameters that
were frozen in training. Those are left as the model has them, provided they are frozen here
too (``requires_grad=False``); a parameter the store lacks that this model trains, a
parameter only in the store, or a different shape is a mismatch, refused before anything is
written. A store written with ``params=`` (its snapshots record the choice) holds exactly the
chosen parameters and buffers: exactly those are loaded (each must be in the model, with its
shape) and every other parameter and buffer of the model is left as it is, trainable or not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from dist_ema.collective import broadcast_object, is_distributed, run_and_check
from dist_ema.store.fs import StoreError
from dist_ema.store.layout import param_mismatch
from dist_ema.store.reader import Snapshot, SnapshotStore

__all__ = ["LoadResult", "load_synthesized"]

log = logging.getLogger("dist_ema")


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
    buffers: tuple[str, ...] = ()  # buffers written: the newest used snapshot's (snapshots[-1])
    kept_params: tuple[str, ...] = ()  # parameters the store holds no EMA of (frozen, or not chosen by params=): kept
    kept_buffers: tuple[str, ...] = ()  # buffers left as they were (buffers=False, or not in the store)


@dataclass(frozen=True)
class _Plan:
    used: tuple[Snapshot, ...]
    rows: tuple[tuple[int, int], ...]
    x: tuple[float, ...]
    sigma_rel: float
    gamma: float
    t: float
    error: float
    kept_params: tuple[str, ...]  # model parameters the store does not hold (all frozen here)
    buffers: tuple[str, ...]  # the buffers to write from the newest used snapshot
    kept_buffers: tuple[str, ...]


def _match_params(url: str, mine: dict, theirs: dict, trainable, chosen: dict | None = None) -> tuple[str, ...]:
    """The model's parameters the store does not hold, or StoreError for a real mismatch.

    ``mine`` / ``theirs``: {fqn: shape} of the model and of the store; ``trainable()``: the
    model's parameters with requires_grad (asked only when the store lacks some); ``chosen``: the
    store's ``params=`` record (its snapshots hold only the chosen parameters: the others are kept).
    """
    missing = sorted(set(mine) - set(theirs))
    if not missing:
        diff = param_mismatch(mine, theirs)
        if diff is not None:
            raise StoreError(f"the model does not match the snapshots in {url}: {diff}")
        return ()
    common = {f: s for f, s in mine.items() if f in theirs}
    diff = param_mismatch(common, theirs)
    if diff is not None:
        raise StoreError(f"the model does not match the snapshots in {url}: {diff}")
    trained = sorted(set(missing) & set(trainable())) if chosen is None else []
    if trained:
        raise StoreError(
            f"the snapshots in {url} hold no EMA of {len(trained)} parameter(s) that are trainable "
            f"(requires_grad=True) in this model: {trained[:5]}. A store written with include_frozen=False "
            f"leaves out the parameters frozen in training: freeze them here too (p.requires_grad_(False)) to "
            f"keep their current values, or load a store that tracks them (include_frozen=True)"
        )
    return tuple(missing)


def _match_buffers(url: str, snap: Snapshot, model_buffers: dict, load: bool) -> tuple[tuple, tuple]:
    """(buffers to write, buffers left alone) for the newest used snapshot, or StoreError for a mismatch."""
    stored = {r[0]: tuple(r[1]) for r in snap.meta.get("buffers") or []}
    if not load:
        return (), tuple(sorted(model_buffers))
    only_store = sorted(set(stored) - set(model_buffers))
    shapes = sorted(b for b in set(stored) & set(model_buffers) if tuple(model_buffers[b].shape) != stored[b])
    if only_store or shapes:
        raise StoreError(
            f"the model's buffers do not match snapshot {snap.id} in {url}: buffers only in the store "
            f"{only_store[:5]}, different shapes {shapes[:5]}; load into the model the snapshots were taken of, "
            f"or pass buffers=False to load the parameters only"
        )
    return tuple(sorted(stored)), tuple(sorted(set(model_buffers) - set(stored)))


def _plan(store: SnapshotStore, sigma_rel, gamma, t, step, layout, trainable, load_buffers: bool,
          model_buffers: dict) -> _Plan:
    from dist_ema.synthesis import _choose_time, _targets, only_planned, plan_coefficients

    (s,), (g,) = _targets([sigma_rel] if sigma_rel is not None else None, [gamma] if gamma is not None else None)
    snaps = store.snapshots()
    if not snaps:
        raise StoreError(f"no committed snapshot in {store.url}: nothing to synthesize from")
    target_t = _choose_time(snaps, t, step)
    used = [x for x in snaps if x.t <= target_t]
    kept = _match_params(store.url, {f: shape for f, (shape, _) in layout.global_params.items()},
                         {f: shape for f, (shape, _) in store.params(used[-1]).items()}, trainable,
                         used[-1].meta.get("params"))
    X, sol, rows = plan_coefficients([(x.t, x.gammas) for x in used], target_t, [g])
    used, rows = only_planned(used, rows)
    bufs, kept_bufs = _match_buffers(store.url, used[-1], model_buffers, load_buffers)
    return _Plan(tuple(used), tuple((int(i), int(k)) for i, k in rows), tuple(float(v) for v in X[:, 0]), s, g,
                 target_t, float(sol.error[0]), kept, bufs, kept_bufs)


@torch.no_grad()
def load_synthesized(model_or_engine, url: str, sigma_rel: float | None = None, *, gamma: float | None = None,
                     t: float | None = None, step: int | None = None,
                     storage_options: dict | None = None, buffers: bool = True) -> LoadResult:
    """Write the EMA for ``sigma_rel`` (or ``gamma``) at time ``t`` into the model's own shards. Collective.

    ``model_or_engine``: what :class:`~dist_ema.PostHocEMA` accepts (FSDP2, FSDP1, DeepSpeed
    ZeRO 1/2/3, DDP, a plain module), at any world size, not only the training run's.
    ``t`` / ``step``: the target time (default: the newest snapshot's). ``buffers``: also write
    the buffers stored with the newest snapshot used (BatchNorm running statistics), as
    ``synthesize`` exports them, so the model computes what the exported file computes
    (default True; False keeps the model's buffers, logged). Parameters frozen in training
    and left out of the store (``include_frozen=False``) keep their values when they are
    frozen here too; the result names them. A store written with ``params=`` loads exactly the
    chosen parameters and buffers and leaves every other one as it is (named in the result too).
    The training weights are overwritten: save them
    first if you need them back (or use ``PostHocEMA.swapped`` inside training). Returns what
    was used and written; errors on any rank are raised on every rank, before anything is written.

    Example:
        >>> for s in (0.05, 0.10, 0.15, 0.20):
        ...     res = dist_ema.load_synthesized(model, url, sigma_rel=s)
        ...     print(s, res.error, evaluate(model))
    """
    from dist_ema.sharding.checks import verify_layout
    from dist_ema.sharding.detect import make_layout
    from dist_ema.sharding.parts import as_model
    from dist_ema.swap import write_into_pieces

    model_or_engine = as_model(model_or_engine)
    layout = verify_layout(make_layout(model_or_engine))
    rank = torch.distributed.get_rank() if is_distributed() else 0

    # ---- plan: rank 0 lists, matches and solves once; everyone gets the plan or the same error
    box: dict = {}

    def trainable() -> list[str]:  # the parameters a PostHocEMA with include_frozen=False tracks
        return list(make_layout(model_or_engine, include_frozen=False).params)

    model_buffers = dict(layout.buffers)
    if layout.all_params is not None:  # pipeline stages: match the buffers of every stage
        from dist_ema.collective import all_gather_object

        for part in all_gather_object({k: torch.empty(tuple(b.shape), device="meta")
                                       for k, b in layout.buffers.items()}):
            for k, b in part.items():
                model_buffers.setdefault(k, b)

    def plan0() -> None:
        box["store"] = SnapshotStore(url, storage_options)
        box["plan"] = _plan(box["store"], sigma_rel, gamma, t, step, layout, trainable, buffers, model_buffers)

    run_and_check(plan0 if rank == 0 else (lambda: None), f"planning the synthesis from {url}", None, StoreError)
    plan: _Plan = broadcast_object(box.get("plan"))

    # ---- map: this rank's ranges of every snapshot with a coefficient, summed in float64
    kept = set(plan.kept_params)
    pieces = [p for p in layout.pieces if p.fqn not in kept]
    offsets = np.cumsum([0] + [p.numel for p in pieces])
    total = int(offsets[-1])

    def read_all() -> tuple[np.ndarray, dict, int]:
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
        bufs = store.buffer_tensors(plan.used[-1]) if plan.buffers else {}
        return acc, bufs, nbytes

    acc, bufs, nbytes = run_and_check(read_all, f"reading the snapshots of {url} for load_synthesized", None,
                                      StoreError)

    # ---- load: every piece (replicas too), master and working weights, the buffers, then the engine's hook
    write_into_pieces(pieces, [torch.from_numpy(acc[int(offsets[j]) : int(offsets[j + 1])])
                               for j in range(len(pieces))])
    for name in plan.buffers:  # full and identical on every rank holding it (pipeline stages: some ranks)
        live = layout.buffers.get(name)
        if live is None:
            continue
        live.copy_(bufs[name].to(device=live.device, dtype=live.dtype).reshape(live.shape))
    if layout.after_load is not None:
        layout.after_load()
    _log_kept(plan, buffers)
    return LoadResult(sigma_rel=plan.sigma_rel, gamma=plan.gamma, t=plan.t, error=plan.error,
                      snapshots=tuple(s.id for s in plan.used), coefficients=plan.x, rows=plan.rows,
                      bytes_read=int(nbytes), buffers=plan.buffers, kept_params=plan.kept_params,
                      kept_buffers=plan.kept_buffers)


def _log_kept(plan: _Plan, buffers: bool) -> None:
    """Rank 0: say what was not loaded (frozen parameters the store lacks, buffers kept)."""
    if is_distributed() and torch.distributed.get_rank() != 0:
        return
    if plan.kept_params:
        log.info("dist-ema: load_synthesized left %d parameter(s) the store holds no EMA of (frozen in training, or "
                 "not chosen by params=) as they were: %s",
                 len(plan.kept_params), list(plan.kept_params[:10]))
    if plan.kept_buffers:
        why = "buffers=False" if not buffers else "not stored with the snapshots"
        log.info("dist-ema: load_synthesized kept the model's own values of %d buffer(s) (%s): %s",
                 len(plan.kept_buffers), why, list(plan.kept_buffers[:10]))
