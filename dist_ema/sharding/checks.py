"""Collective check that the owner pieces of all ranks cover every parameter exactly once.

Adapters read engine internals that can change between torch/DeepSpeed releases; a
wrong offset would silently average and store the wrong elements. ``verify_layout``
catches that at start-up with metadata only (no tensor data is moved):

1. every rank runs the local checks (``check_pieces_local``; every piece's fqn is in
   ``params`` with the piece's shape and dtype);
2. every rank has the same ``params`` (compared by digest), or, under pipeline parallelism,
   parameters of the same name have the same shape and dtype on every rank holding them;
3. pieces that several ranks own (replicas) are split among them (``replica_cuts``);
4. the owner pieces of all ranks cover each element of each tracked parameter exactly
   once (N-d boxes included; checked on the group's first rank, which broadcasts the verdict).

With ``params=`` (``layout.selection``) the ranks must also have made the same choice: the same
patterns (or each a callable), a pattern that matches no name on any rank is refused, and a name
chosen on one rank but left out on another (a predicate deciding differently) fails every rank with
a ``ConfigError`` naming it.

Whatever fails, every rank raises the same ``ShardCoverageError``: the decision is
taken from gathered data that all ranks see, so no rank is left waiting in a
collective that the others skipped. Ownership is global (HSDP replicas and NO_SHARD
ranks that do not own a range must not cover it), so the check runs over all ranks
of ``group`` (default: the whole world), not over ``layout.process_group``.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from dist_ema.sharding.base import (
    ShardLayout,
    ShardPiece,
    UnsupportedEngineError,
    check_pieces_local,
    replica_cuts,
    split_among_replicas,
)
from dist_ema.sharding.select import check_outcomes, check_summaries

__all__ = ["ShardCoverageError", "verify_layout"]

_MAX_LISTED = 5


class ShardCoverageError(UnsupportedEngineError):
    """The ranks' shard layouts are inconsistent: gaps, overlaps, or different parameter sets."""


_Key = list[tuple[str, tuple[int, ...], str]]


def _params_key(params: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> _Key:
    """``params`` as a sorted, picklable, comparable list of (fqn, shape, dtype name)."""
    return [(fqn, tuple(int(d) for d in shape), str(dtype)) for fqn, (shape, dtype) in sorted(params.items())]


def _digest(key: _Key) -> str:
    return hashlib.sha256(repr(key).encode()).hexdigest()


def _local_problem(layout: ShardLayout) -> str | None:
    """This rank's own problems (as text), or None."""
    try:
        check_pieces_local(layout.pieces)
        for p in layout.pieces:
            if p.fqn not in layout.params:
                return f"piece of {p.fqn!r} names a parameter missing from layout.params"
            shape, dtype = layout.params[p.fqn]
            if tuple(shape) != tuple(p.global_shape) or dtype != p.dtype:
                return (
                    f"piece of {p.fqn!r} has global shape {tuple(p.global_shape)} and dtype {p.dtype}, "
                    f"but layout.params says {tuple(shape)} and {dtype}"
                )
    except Exception as exc:  # noqa: BLE001 - any local failure must reach every rank
        return f"{type(exc).__name__}: {exc}"
    return None


def _coverage_problems(key: _Key, owned: list[list[tuple]]) -> list[str]:
    """Gaps and overlaps of the owner pieces; ``owned[rank]`` holds (param index, start, numel, box)."""
    from dist_ema.store.layout import cover_problem, piece_blocks

    per_param: list[list[tuple]] = [[] for _ in key]
    for rank, entries in enumerate(owned):
        for idx, start, numel, box in entries:
            per_param[idx].append((start, start + numel, rank, box))
    problems: list[str] = []
    for idx, (fqn, shape, _dtype) in enumerate(key):
        total = 1
        for d in shape:
            total *= d
        where = f"parameter {fqn!r} (shape {shape}, {total} elements)"
        if any(box is not None for *_, box in per_param[idx]):
            blocks = [(s0, z, rank) for start, end, rank, box in per_param[idx]
                      for s0, z, _ in piece_blocks(shape, start, end - start, box)]
            problem = cover_problem(shape, blocks)
            if problem:
                problems.append(f"{where}: owner boxes leave a {problem}" if problem.startswith("gap")
                                else f"{where}: owner boxes {problem}")
            continue
        cursor, last_rank = 0, None
        for start, end, rank, _ in sorted(per_param[idx], key=lambda x: x[:3]):
            if start > cursor:
                problems.append(f"{where}: elements [{cursor}, {start}) are owned by no rank")
            elif start < cursor:
                problems.append(
                    f"{where}: elements [{start}, {min(cursor, end)}) are owned by both rank "
                    f"{last_rank} and rank {rank}"
                )
            if end > cursor:
                cursor, last_rank = end, rank
        if cursor < total:
            problems.append(f"{where}: elements [{cursor}, {total}) are owned by no rank")
    return problems


def _checked_coverage(key: _Key, owned: list[list[tuple]]) -> tuple[list[str], int]:
    """First few coverage problems and their total count; never raises (its result is broadcast)."""
    try:
        problems = _coverage_problems(key, owned)
    except Exception as exc:  # noqa: BLE001 - the other ranks wait for this verdict
        problems = [f"the coverage check itself failed: {type(exc).__name__}: {exc}"]
    return problems[:_MAX_LISTED], len(problems)


def _fail(summary: str, problems: list[str], total: int | None = None) -> ShardCoverageError:
    total = len(problems) if total is None else total
    listed = "\n  ".join(problems[:_MAX_LISTED])
    more = f"\n  ... and {total - _MAX_LISTED} more" if total > _MAX_LISTED else ""
    return ShardCoverageError(
        f"{summary}:\n  {listed}{more}\nThe engine adapter does not understand how this model is "
        "sharded (a torch/DeepSpeed version with different internals, or an unsupported "
        "configuration); please report it with your torch version and sharding setup."
    )


def verify_layout(layout: ShardLayout, group: Any | None = None) -> ShardLayout:
    """Check ``layout`` on this rank and across all ranks of ``group``; raise on every rank on failure.

    Must be called by every rank of ``group`` (default: the whole world). Works without
    an initialized process group (a single process checks its own coverage).

    Returns the layout to use: where several ranks hold the same piece as owners (replicas:
    ``Replicate`` placements, HSDP, a mesh that leaves out a dimension such as norms under
    tensor parallel), the ranks holding it split the writing (``replica_cuts``), every one of
    them still tracking all of it; under pipeline parallelism (ranks holding different
    parameters), ``all_params`` is the union. ``refresh`` of the result applies the same split.

    Raises:
        ShardCoverageError: (a subclass of ``UnsupportedEngineError``) on every rank, naming
            the first problem: a bad local piece, a parameter with different shapes or dtypes
            on two ranks, or the first gap or overlap (parameter name and element range).
    """
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size(group) if distributed else 1
    key = _params_key(layout.params)
    local_problem = _local_problem(layout)
    sel = layout.selection

    # 1. local problems, params digests and params= choices: small, all ranks see all of them.
    mine = (local_problem, _digest(key), None if sel is None else sel.summary(bool(layout.params)))
    gathered: list[Any] = [None] * world
    if distributed:
        dist.all_gather_object(gathered, mine, group=group)
    else:
        gathered = [mine]
    bad = [f"rank {r}: {prob}" for r, (prob, _, _) in enumerate(gathered) if prob is not None]
    if bad:
        raise _fail("shard layout check failed on some ranks", bad)
    check_summaries([s for _, _, s in gathered])  # params=: the same choice on every rank, matching something
    all_params = None
    if len({digest for _, digest, _ in gathered}) > 1:  # pipeline stages: each rank holds some parameters
        keys: list[Any] = [None] * world
        # with params=, the names each rank left out too: a name chosen on one rank may not be left out on another
        dist.all_gather_object(keys, (key, sorted(sel.left_out) if sel is not None else []), group=group)
        check_outcomes([[f for f, _, _ in k] for k, _ in keys], [out for _, out in keys],
                       None if sel is None else sel.spec)
        keys = [k for k, _ in keys]
        union: dict[str, tuple] = {}
        for r, k in enumerate(keys):
            for fqn, shape, dtype in k:
                if fqn in union and union[fqn][:2] != (shape, dtype):
                    raise _fail("ranks disagree on the tracked parameters",
                                [f"parameter {fqn!r} is {union[fqn][:2]} on rank {union[fqn][2]} but "
                                 f"{(shape, dtype)} on rank {r}"])
                union.setdefault(fqn, (shape, dtype, r))
        key = sorted((f, s, d) for f, (s, d, _) in union.items())
        dtypes = {str(dt): dt for _, dt in layout.params.values()}
        all_params = {f: (s, dtypes.get(d) or _dtype(d)) for f, s, d in key}
    index = {fqn: i for i, (fqn, _s, _d) in enumerate(key)}

    # 2. replicas: every rank's owner pieces, so each rank knows who else holds its pieces
    owned = [p.key for p in layout.pieces if p.owner]
    everyone: list[Any] = [None] * world
    if distributed:
        dist.all_gather_object(everyone, owned, group=group)
    else:
        everyone = [owned]
    me = dist.get_rank(group) if distributed else 0
    holders = _holders(everyone)
    pieces = _resolve(layout.pieces, holders, me)

    # 3. coverage of the owner pieces of all ranks after the split: computed on the group's first rank
    # from the gathered pieces, the verdict broadcast.
    def resolved_owned(r: int) -> list[tuple]:
        return [(index[f], s, n, b) for (f, s, n, b), owner in _resolve_keys(everyone[r], holders, r) if owner]

    if not distributed:
        problems, total = _checked_coverage(key, [resolved_owned(0)])
    else:
        first = 0 if group is None else dist.get_global_rank(group, 0)
        verdict: list[Any] = [None]
        if me == 0:
            try:
                verdict = [_checked_coverage(key, [resolved_owned(r) for r in range(world)])]
            except Exception as exc:  # noqa: BLE001 - the other ranks wait for this verdict
                verdict = [([f"the coverage check itself failed: {type(exc).__name__}: {exc}"], 1)]
        dist.broadcast_object_list(verdict, src=first, group=group)
        problems, total = verdict[0]
    if problems:
        summary = "the owner shards of all ranks do not cover every parameter exactly once"
        raise _fail(summary, problems, total)
    return _with_split(layout, pieces, holders, me, all_params)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


def _holders(everyone: list[list[tuple]]) -> dict[tuple, tuple[int, ...]]:
    """Owner piece key -> the ranks listing it (only keys listed by several ranks)."""
    seen: dict[tuple, list[int]] = {}
    for r, keys in enumerate(everyone):
        for k in keys:
            seen.setdefault(k, []).append(r)
    return {k: tuple(rs) for k, rs in seen.items() if len(rs) > 1}


def _resolve_keys(keys: list[tuple], holders: dict, me: int) -> list[tuple[tuple, bool]]:
    """Rank ``me``'s owner piece keys after replicas split them: [(sub-key, owned)]."""
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        if k in holders:
            groups.setdefault(holders[k], []).append(i)
    cut: dict[int, list] = {}
    for hs, idx in groups.items():
        for i, cuts in zip(idx, replica_cuts([keys[i][2] for i in idx], hs.index(me), len(hs))):
            cut[i] = cuts
    out = []
    for i, (f, s, n, b) in enumerate(keys):
        if i in cut:
            out.extend(((f, s + x, y - x, b), owner) for x, y, owner in cut[i])
        else:
            out.append(((f, s, n, b), True))
    return out


def _resolve(pieces: list[ShardPiece], holders: dict, me: int) -> list[ShardPiece]:
    """This rank's pieces after replicas split the writing of the pieces several ranks own."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(pieces):
        if p.owner and p.key in holders:
            groups.setdefault(holders[p.key], []).append(i)
    if not groups:
        return list(pieces)
    subs: dict[int, list[ShardPiece]] = {}
    for hs, idx in groups.items():
        for i, split in zip(idx, split_among_replicas([pieces[i] for i in idx], hs.index(me), len(hs))):
            subs[i] = split
    return [q for i, p in enumerate(pieces) for q in subs.get(i, [p])]


def _with_split(layout: ShardLayout, pieces: list[ShardPiece], holders: dict, me: int,
                all_params: dict | None) -> ShardLayout:
    if not holders and all_params is None:
        return layout
    refresh = layout.refresh

    def refreshed() -> ShardLayout:  # the same split, without collectives (the pieces must not change)
        new = refresh()
        return _with_split(new, _resolve(new.pieces, holders, me), holders, me, all_params)

    return replace(layout, pieces=pieces, all_params=all_params, refresh=None if refresh is None else refreshed)
