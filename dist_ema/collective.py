"""Small collective helpers: every rank learns about every rank's error.

A failure on one rank must never leave the others waiting in a collective: code that
may fail on some ranks runs locally, then :func:`raise_if_any` exchanges the outcome
and raises the same error on every rank.
"""

from __future__ import annotations

import pickle
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import TypeVar

import torch
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


_RELEASE_SECONDS = 2.0  # the most a collective waits for gloo's worker thread to let go of its tensors


def _collective(run: Callable[[], object], tensors: list) -> None:
    """``run()`` (a blocking collective over ``tensors``), returning once the process group holds none of them.

    A gloo worker thread drops its references to a collective's tensors just after the caller has
    seen the collective complete, and that drop takes the GIL. A process that reaches interpreter
    exit first, as a job does right after its last collective, aborts with "terminate called
    without an active exception" (SIGABRT: the launcher reports a failed job that had finished).
    So on CPU groups the call waits, releasing the GIL, until every tensor's reference count is
    back where it was (a C++ holder adds one), at most ``_RELEASE_SECONDS``: microseconds in practice.
    """
    before = _refcounts(tensors)
    run()
    if tensors and tensors[0].device.type != "cpu":  # NCCL: its watchdog drops them, on its own schedule
        return
    deadline = time.monotonic() + _RELEASE_SECONDS
    while _refcounts(tensors) != before and time.monotonic() < deadline:
        time.sleep(0.0002)


def _refcounts(tensors: list) -> list[int]:
    return [sys.getrefcount(t) for t in tensors]  # measured the same way before and after


def _object_device(group: object | None) -> torch.device:
    """The device that ``group``'s object collectives use (torch's own rule: CPU for gloo, the current GPU for NCCL)."""
    from torch.distributed.distributed_c10d import _get_object_coll_device

    kind = _get_object_coll_device(group)
    return torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)


def _encode(obj: object, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    data = pickle.dumps(obj)
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    return payload, torch.tensor([len(data)], dtype=torch.int64, device=device)


def _decode(buf: torch.Tensor, size: int) -> object:
    return pickle.loads(buf[:size].cpu().numpy().tobytes())


def _padded(payload: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros(size, dtype=torch.uint8, device=payload.device)
    out[: payload.numel()] = payload
    return out


@contextmanager
def _peers_checked():
    """A peer that stopped responding inside the block is a CollectiveError that says what to do."""
    try:
        yield
    except RuntimeError as e:
        if not stopped_responding(e):
            raise
        from dist_ema.errors import CollectiveError

        raise CollectiveError(
            f"a rank stopped responding in one of dist-ema's collectives (no answer within the timeout; "
            f"{type(e).__name__}: {str(e)[:200]}). The snapshots committed so far are intact; restart the job "
            f"with resume=True. A stuck rank inside the engine's own collectives is the process group's timeout"
        ) from e


def _padded_payload(obj: object, group: object | None) -> tuple[torch.Tensor, list[int]]:
    """This rank's pickled ``obj``, padded to the longest of the group's, and every rank's length (one all_gather)."""
    payload, size = _encode(obj, _object_device(group))
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
    _collective(lambda: dist.all_gather(sizes, size, group=group), [size, *sizes])
    lengths = [int(s.item()) for s in sizes]
    return _padded(payload, max(lengths)), lengths


def all_gather_object(obj: object, group: object | None = None) -> list:
    """Every rank's ``obj`` on every rank, as a list by group rank (pickled, as torch's all_gather_object)."""
    if not is_distributed():
        return [obj]
    with _peers_checked():
        mine, lengths = _padded_payload(obj, group)
        bufs = [torch.empty_like(mine) for _ in lengths]
        _collective(lambda: dist.all_gather(bufs, mine, group=group), [mine, *bufs])
    return [_decode(b, k) for b, k in zip(bufs, lengths)]


def gather_to_rank0(obj: object, group: object | None = None) -> list | None:
    """Every rank's ``obj`` on rank 0 of ``group``, as a list by group rank; None on the other ranks.

    Without a process group: ``[obj]``. Collective: every rank of ``group`` calls it. Only the
    lengths travel to every rank; the objects go to rank 0 alone.
    """
    if not is_distributed():
        return [obj]
    me = dist.get_rank(group)
    dst = dist.get_global_rank(group, 0) if group is not None else 0
    with _peers_checked():
        mine, lengths = _padded_payload(obj, group)
        bufs = [torch.empty_like(mine) for _ in lengths] if me == 0 else None
        _collective(lambda: dist.gather(mine, bufs, dst=dst, group=group), [mine, *(bufs or [])])
    return [_decode(b, k) for b, k in zip(bufs, lengths)] if me == 0 else None


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
    """``obj`` of rank ``src`` (a group rank) on every rank (the object itself in one process)."""
    if not is_distributed():
        return obj
    root = dist.get_global_rank(group, src) if group is not None else src
    sender = dist.get_rank(group) == src
    device = _object_device(group)
    with _peers_checked():
        payload, size = _encode(obj, device) if sender else (None, torch.zeros(1, dtype=torch.int64, device=device))
        _collective(lambda: dist.broadcast(size, src=root, group=group), [size])
        buf = payload if sender else torch.empty(int(size.item()), dtype=torch.uint8, device=device)
        _collective(lambda: dist.broadcast(buf, src=root, group=group), [buf])
    return obj if sender else _decode(buf, int(size.item()))
