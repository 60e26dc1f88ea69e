"""The EMA update with the EMA buffers in host memory (``offload=True``).

Per update, on the training thread: the shard's sources are copied into host mirrors (one host
buffer per run of pieces that are neighbours in the source's memory, laid out like the source,
so the update sees the same runs as the device path and computes bitwise the same values on
the same hardware); on CUDA the copy runs on a side stream, the training stream waits for it on
the device (not the host), and the host thread returns at once. A worker thread then applies
the update plan (:class:`~dist_ema.kernels.FusedUpdate`, or foreach) to the host buffers from
the mirrors, overlapped with the next training steps.

Back-pressure: at most one update is in flight, because the mirrors are its input. The next
update waits for the one in flight before copying (a stall only when an update takes longer
than the steps between two updates); so does every reader of the EMA (snapshots, swaps,
state dicts: :meth:`HostUpdate.wait`). Staging memory: one copy of the rank's tracked shard in
its own dtype, allocated once. An error in the worker is raised by the next wait or submit.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from dist_ema.kernels import _span, adjacent

__all__ = ["HostUpdate", "host_buffer"]


def host_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty host tensor for data of ``device``: pinned when it is a CUDA device (asynchronous copies)."""
    return torch.empty(numel, dtype=dtype, device="cpu", pin_memory=device.type == "cuda")


def mirrors_of(sources: Sequence[torch.Tensor], device: torch.device
               ) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Host mirrors of the 1-d ``sources``, and the (host buffer, source span) copies that fill them.

    Runs of sources that are neighbours in memory (:func:`~dist_ema.kernels.adjacent`) share one host
    buffer, in the same order, so that the update coalesces them exactly as it does on the device.
    """
    mirrors: list[torch.Tensor] = []
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    i = 0
    while i < len(sources):
        j = i
        while j + 1 < len(sources) and adjacent(sources[j], sources[j + 1]):
            j += 1
        run = sources[i : j + 1]
        total = sum(s.numel() for s in run)
        buf = host_buffer(total, run[0].dtype, device)
        span = _span(run[0], total) if len(run) > 1 else run[0].detach()
        copies.append((buf, span))
        at = 0
        for s in run:
            mirrors.append(buf[at : at + s.numel()])
            at += s.numel()
        i = j + 1
    return mirrors, copies


class HostUpdate:
    """``submit(weights)`` does ``emas[k][i].lerp_(sources[i], weights[k])`` with ``emas`` in host memory.

    Args:
        emas: per profile, one fp32 1-d host tensor per source (views into a host flat buffer).
        sources: the shard's live 1-d tensors (on the training device).
        device: the sources' device.
        update_impl: "auto", "fused" or "foreach", as for the device update.
    """

    def __init__(self, emas: Sequence[Sequence[torch.Tensor]], sources: Sequence[torch.Tensor],
                 device: torch.device, update_impl: str) -> None:
        from dist_ema.kernels import DEFAULT_MIN_NUMEL, FusedUpdate

        self.device = device
        self.mirrors, self._copies = mirrors_of(sources, device)
        self._emas = [list(v) for v in emas]
        self._plan = None
        if update_impl != "foreach" and sources:
            self._plan = FusedUpdate(self._emas, self.mirrors,
                                     min_numel=1 if update_impl == "fused" else DEFAULT_MIN_NUMEL)
        self.staging_bytes = sum(b.numel() * b.element_size() for b, _ in self._copies)
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._first = True  # the first update runs on the calling thread: the plan compiles there
        self._lock = threading.Lock()
        self.waits = 0  # submits that found the previous update still running (back-pressure)

    def submit(self, weights: Sequence[float]) -> None:
        """Stage the sources to host and start the update (waits first for the one in flight)."""
        if self._pending is not None and not self._pending.done():
            self.waits += 1
        self.wait()
        event = None
        if self._cuda:  # pragma: no cover - needs a GPU
            main = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(main)  # after the optimizer step that wrote the sources
            with torch.cuda.stream(self._stream):
                for buf, src in self._copies:
                    buf.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            main.wait_stream(self._stream)  # the next step writes the sources only after the copy (on the device)
        else:
            for buf, src in self._copies:
                buf.copy_(src)
        weights = list(weights)
        if self._first:
            self._first = False
            self._run(weights, event)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist-ema-offload")
        self._pending = self._pool.submit(self._run, weights, event)

    def _run(self, weights: list[float], event: object) -> None:
        if event is not None:  # pragma: no cover - needs a GPU
            event.synchronize()
        with torch.no_grad():
            if self._plan is not None:
                self._plan(weights)
            else:
                from dist_ema.kernels import foreach_update

                foreach_update(self._emas, self.mirrors, weights)

    def busy(self) -> bool:
        """True while an update is still running (never blocks)."""
        return self._pending is not None and not self._pending.done()

    def wait(self) -> bool:
        """Block until the update in flight finished; re-raise its error. True if one was in flight."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return False
        pending.result()
        return True

    def close(self) -> None:
        """Wait for the update in flight and stop the worker thread (idempotent)."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
