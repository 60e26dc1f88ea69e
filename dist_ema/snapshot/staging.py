"""Staging a snapshot: device to host into the writer's shared-memory slot, never stalling a GPU host thread.

On CPU the copy is a memcpy per profile, done when :meth:`Stager.start` returns.

On a GPU (all of this runs only where CUDA is available; the test suite has none):

1. each shared-memory slot is page-locked once with ``cudaHostRegister``, so a
   device-to-host copy into it is a real asynchronous DMA (into pageable memory the
   driver would stage through its own buffer and block the host);
2. ``start`` queues the copies on a side stream that first waits for the training
   stream (so the copy sees the last EMA update) and records an event; it returns at
   once, with no host-device synchronization;
3. the next ``update()`` calls :meth:`Stager.order_update`: the training stream waits
   for the side stream on the device (``wait_stream``, not a host wait), so the EMA is
   not modified while it is being copied;
4. the snapshot manager hands the slot to the writer once :meth:`Stager.ready` says the
   event completed (``Event.query()``, polled from the training side, never a block).

The check script ``bench/gpu_check.py`` runs ``update()`` and ``snapshot()`` under
``torch.cuda.set_sync_debug_mode("error")`` and compares the written snapshot with the EMA.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field

import torch

__all__ = ["Stager", "Ticket"]

log = logging.getLogger("dist_ema")


@dataclass
class Ticket:
    """One staged snapshot: ready once ``event`` completed (None: the copy is already done)."""

    slot: int
    event: object | None = None
    payload: dict = field(default_factory=dict)


class Stager:
    """Copies the owned prefix of each profile's flat EMA buffer into a staging slot.

    Args:
        device: the EMA buffers' device.
        view_of: ``view_of(slot)`` gives a staging slot (a memoryview over shared memory); the
            views are never kept (they would pin the shared memory against closing).
        slots: number of slots (registered with the CUDA driver on a GPU).
        dtype: the storage dtype the slot holds (torch dtype).
    """

    def __init__(self, device: torch.device, view_of, slots: int, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self.cuda = device.type == "cuda"
        self._view_of = view_of
        self._registered: list[int] = []
        self._stream = None
        self._in_flight = False  # a copy was queued since the last order_update()
        if self.cuda:  # pragma: no cover - needs a GPU
            self._stream = torch.cuda.Stream(device)
            for i in range(slots):
                view = view_of(i)
                ptr, size = ctypes.addressof(ctypes.c_char.from_buffer(view)), len(view)
                del view
                err = torch.cuda.cudart().cudaHostRegister(ptr, size, 0)
                if int(err) != 0:
                    log.warning("dist-ema: cudaHostRegister of a %d-byte staging slot failed (error %s); snapshot "
                                "copies into it may block the host", size, int(err))
                    continue
                self._registered.append(ptr)

    def start(self, slot: int, flats: list[torch.Tensor], numel: int,
              buffers: list[torch.Tensor] | None = None) -> Ticket:
        """Queue the copy of ``flats[k][:numel]`` for every profile k into ``slot``, and of ``buffers``.

        The buffers' host copies are in ``ticket.payload["buffers"]`` (CPU tensors) once ready.
        """
        n = numel
        ticket = Ticket(slot, None, {"buffers": []})
        dst = torch.frombuffer(self._view_of(slot), dtype=self.dtype, count=n * len(flats)) if n else None
        if not self.cuda:
            for k, flat in enumerate(flats):
                if n:
                    dst[k * n : (k + 1) * n].copy_(flat[:n])
            ticket.payload["buffers"] = [b.detach().cpu().clone() for b in buffers or []]
            return ticket
        stream = self._stream  # a GPU from here on
        stream.wait_stream(torch.cuda.current_stream(self.device))  # after the last EMA update
        with torch.cuda.stream(stream):
            for k, flat in enumerate(flats):
                if n:
                    dst[k * n : (k + 1) * n].copy_(flat[:n], non_blocking=True)
            for b in buffers or []:  # pinned host copies: asynchronous too
                host = torch.empty(b.shape, dtype=b.dtype, device="cpu", pin_memory=b.is_cuda)
                host.copy_(b.detach(), non_blocking=True)
                ticket.payload["buffers"].append(host)
            ticket.event = torch.cuda.Event()
            ticket.event.record(stream)
        self._in_flight = True
        return ticket

    def ready(self, ticket: Ticket) -> bool:
        """True once the copy of ``ticket`` finished (never blocks)."""
        return ticket.event is None or ticket.event.query()

    def wait(self, ticket: Ticket) -> None:
        """Block until the copy finished (for flush/close, where waiting is the point)."""
        if ticket.event is not None:  # pragma: no cover - needs a GPU
            ticket.event.synchronize()

    def order_update(self) -> None:
        """Before an EMA update: on the device, the training stream waits for queued copies."""
        if self._in_flight:  # pragma: no cover - needs a GPU
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            self._in_flight = False

    def close(self) -> None:
        if self._stream is not None:  # pragma: no cover - needs a GPU
            self._stream.synchronize()
            for ptr in self._registered:
                torch.cuda.cudart().cudaHostUnregister(ptr)
        self._registered = []
