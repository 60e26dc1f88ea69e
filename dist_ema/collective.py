"""Small collective helpers: every rank learns about every rank's error.

A failure on one rank must never leave the others waiting in a collective: code that
may fail on some ranks runs locally, then :func:`raise_if_any` exchanges the outcome
and raises the same error on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

__all__ = ["all_gather_object", "gather_to_rank0", "is_distributed", "rank", "raise_if_any", "run_and_check",
           "world_size"]

T = TypeVar("T")


_SIDE: dict[tuple[int, float], object] = {}


def side_group(timeout: float) -> object | None:
    """A gloo group over every rank whose collectives give up after ``timeout`` seconds.

    dist-ema's own collectives run on it, so a rank that stops responding makes every other
    rank raise within ``timeout`` (not the process group's timeout), and host-side objects never
    travel over NCCL. Collective the first time for a timeout (every rank, in the same order).
    """
    if not is_distributed():
        return None
    key = (id(dist.group.WORLD), float(timeout))  # a new process group (after a destroy) gets a new one
    if key not in _SIDE:
        from datetime import timedelta

        _SIDE[key] = dist.new_group(backend="gloo", timeout=timedelta(seconds=key[1]))
    return _SIDE[key]


def stopped_responding(e: BaseException) -> bool:
    """Whether a collective's error means a peer stopped responding (a timeout or a lost connection)."""
    text = f"{type(e).__name__}: {e}".lower()
    return isinstance(e, RuntimeError) and any(k in text for k in ("timed out", "timeout", "connection closed",
                                                                     "connection reset", "broken pipe"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group: object | None = None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group: object | None = None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def all_gather_object(obj: object, group: object | None = None) -> list:
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(out, obj, group=group)
    except RuntimeError as e:
        if stopped_responding(e):
            from dist_ema.errors import CollectiveError

            raise CollectiveError(
                f"a rank stopped responding in one of dist-ema's collectives (no answer within the timeout; "
                f"{type(e).__name__}: {str(e)[:200]}). The snapshots committed so far are intact; restart the job "
                f"with resume=True. A stuck rank inside the engine's own collectives is the process group's timeout"
            ) from e
        raise
    return out


def gather_to_rank0(obj: object, group: object | None = None) -> list | None:
    """Every rank's ``obj`` on rank 0 of ``group``, as a list by group rank; None on the other ranks.

    Without a process group: ``[obj]``. Collective: every rank of ``group`` calls it.
    """
    if not is_distributed():
        return [obj]
    me = dist.get_rank(group)
    out: list | None = [None] * dist.get_world_size(group) if me == 0 else None
    dist.gather_object(obj, out, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return out


def raise_if_any(
    error: BaseException | None, what: str, group: object | None = None, exc_type: type[Exception] = RuntimeError
) -> None:
    """Exchange each rank's error (or None); if any rank failed, raise on every rank.

    The message names every failed rank and its error, e.g.
    "snapshot step-000000000100 failed on rank 1: PermissionError: ...".
    """
    msg = None if error is None else f"{type(error).__name__}: {error}"
    everyone = all_gather_object(msg, group)
    bad = [(r, m) for r, m in enumerate(everyone) if m is not None]
    if not bad:
        return
    detail = "; ".join(f"rank {r}: {m}" for r, m in bad[:4]) + (f"; and {len(bad) - 4} more" if len(bad) > 4 else "")
    exc = exc_type(f"{what} failed on {len(bad)} of {len(everyone)} rank(s): {detail}")
    exc.failures = dict(bad)  # each rank's own failure, on every rank (DistEMAError declares it)
    if error is not None:
        raise exc from error
    raise exc


def run_and_check(fn: Callable[[], T], what: str, group: object | None = None,
                  exc_type: type[Exception] = RuntimeError) -> T | None:
    """Run ``fn`` on this rank, then :func:`raise_if_any`. Returns fn's result."""
    result, err = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised on every rank below
        err = e
    raise_if_any(err, what, group, exc_type)
    return result


def broadcast_object(obj: object, src: int = 0, group: object | None = None) -> object:
    """``obj`` of rank ``src`` on every rank (the object itself in one process)."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
    return box[0]
