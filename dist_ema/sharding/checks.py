"""Collective check that the owner pieces of all ranks cover every parameter exactly once.

Adapters read engine internals that can change between torch/DeepSpeed releases; a
wrong offset would silently average and store the wrong elements. ``verify_layout``
catches that at start-up with metadata only (no tensor data is moved):

1. every rank runs the local checks (``check_pieces_local``; every piece's fqn is in
   ``params`` with the piece's shape and dtype);
2. every rank has the same ``params`` (compared by digest, full dicts only on mismatch);
3. the owner pieces of all ranks cover each element of each tracked parameter exactly
   once (gathered on the group's first rank, which broadcasts the verdict).

Whatever fails, every rank raises the same ``ShardCoverageError``: the decision is
taken from gathered data that all ranks see, so no rank is left waiting in a
collective that the others skipped. Ownership is global (HSDP replicas and NO_SHARD
ranks that do not own a range must not cover it), so the check runs over all ranks
of ``group`` (default: the whole world), not over ``layout.process_group``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

from dist_ema.sharding.base import ShardLayout, UnsupportedEngineError, check_pieces_local

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


def _params_diff(all_keys: list[_Key]) -> str:
    """Describe the first difference between rank 0's params and another rank's."""
    ref = dict((k[0], k[1:]) for k in all_keys[0])
    for rank, key in enumerate(all_keys[1:], start=1):
        other = dict((k[0], k[1:]) for k in key)
        for fqn in sorted(set(ref) | set(other)):
            if fqn not in other:
                return f"rank {rank} has no parameter {fqn!r} (rank 0 has {ref[fqn]})"
            if fqn not in ref:
                return f"rank {rank} has parameter {fqn!r} {other[fqn]} that rank 0 does not have"
            if ref[fqn] != other[fqn]:
                return f"parameter {fqn!r} is {ref[fqn]} on rank 0 but {other[fqn]} on rank {rank}"
    return "the parameter lists differ between ranks"


def _coverage_problems(
    key: _Key, owned: list[list[tuple[int, int, int]]]
) -> list[str]:
    """Gaps and overlaps of the owner pieces; ``owned[rank]`` holds (param index, start, numel)."""
    per_param: list[list[tuple[int, int, int]]] = [[] for _ in key]
    for rank, triples in enumerate(owned):
        for idx, start, numel in triples:
            per_param[idx].append((start, start + numel, rank))
    problems: list[str] = []
    for idx, (fqn, shape, _dtype) in enumerate(key):
        total = 1
        for d in shape:
            total *= d
        where = f"parameter {fqn!r} (shape {shape}, {total} elements)"
        cursor, last_rank = 0, None
        for start, end, rank in sorted(per_param[idx]):
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


def _checked_coverage(
    key: _Key, owned: list[list[tuple[int, int, int]]]
) -> tuple[list[str], int]:
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


def verify_layout(layout: ShardLayout, group: Any | None = None) -> None:
    """Check ``layout`` on this rank and across all ranks of ``group``; raise on every rank on failure.

    Must be called by every rank of ``group`` (default: the whole world). Works without
    an initialized process group (a single process checks its own coverage).

    Raises:
        ShardCoverageError: (a subclass of ``UnsupportedEngineError``) on every rank, naming
            the first problem: a bad local piece, differing ``params``, or the first gap
            or overlap (parameter name and element range).
    """
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size(group) if distributed else 1
    key = _params_key(layout.params)
    index = {fqn: i for i, (fqn, _s, _d) in enumerate(key)}
    local_problem = _local_problem(layout)

    # 1. local problems and params digests: small, all ranks see all of them.
    mine = (local_problem, _digest(key))
    gathered: list[Any] = [None] * world
    if distributed:
        dist.all_gather_object(gathered, mine, group=group)
    else:
        gathered = [mine]
    bad = [f"rank {r}: {prob}" for r, (prob, _) in enumerate(gathered) if prob is not None]
    if bad:
        raise _fail("shard layout check failed on some ranks", bad)
    if len({digest for _, digest in gathered}) > 1:
        keys: list[Any] = [None] * world
        dist.all_gather_object(keys, key, group=group)
        raise _fail("ranks disagree on the tracked parameters", [_params_diff(keys)])

    # 2. coverage of owner pieces: gathered on the group's first rank, verdict broadcast.
    owned = [(index[p.fqn], p.flat_start, p.numel) for p in layout.pieces if p.owner]
    if not distributed:
        problems, total = _checked_coverage(key, [owned])
    else:
        first = 0 if group is None else dist.get_global_rank(group, 0)
        is_first = dist.get_rank(group) == 0
        all_owned: list[Any] | None = [None] * world if is_first else None
        dist.gather_object(owned, all_owned, dst=first, group=group)
        verdict: list[Any] = [_checked_coverage(key, all_owned) if is_first else None]
        dist.broadcast_object_list(verdict, src=first, group=group)
        problems, total = verdict[0]
    if problems:
        summary = "the owner shards of all ranks do not cover every parameter exactly once"
        raise _fail(summary, problems, total)
