"""A proposed replacement for ``dist_ema.synthesis._map_units`` (benchmark 5 measures it).

Same inputs, same reads, same accumulation order, so the output is bitwise the same. The
differences are all allocation and per-read overhead that profiles of the library showed:

1. ``layout.layout_id()`` is asked once, not per read (uncached it hashes the whole layout
   JSON: 0.4-0.7 s for a 1,024-rank 70B layout; newer layouts cache it).
2. Every read's float32 values went into a *new* float64 tensor (``.double()``: a fresh
   2x-unit allocation per read, page-faulted in by the kernel each time), or, in newer
   versions, are added with dtype promotion (no allocation, but ATen's dynamic-cast path:
   ~3.4x slower than a same-dtype add here). Values are copied once into one reused float64
   scratch buffer, then added per target.
3. Accumulators were a new ``torch.zeros`` per unit; one buffer is reused (``zero_()``).
4. Every read allocated its float32 destination; reads now take buffers from a small pool
   (prefetch + 1 buffers, returned after use), so memory stays bounded the same way.

Use: ``dist_ema.synthesis._map_units = bench.proposed.map_units`` (in a child process).
"""

from __future__ import annotations

import queue
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def map_units(store, used, rows, X, layout, units, out_io, snap_name, dtype, unit_bytes, prefetch, stats, show,
              m) -> None:
    from dist_ema.store.layout import Read, merge_reads, translate, unit_segments
    from dist_ema.synthesis import _write_unit

    by_snap: dict[int, list[tuple[int, int]]] = {}
    for row, (i, k) in enumerate(rows):
        if np.any(X[row] != 0):
            by_snap.setdefault(i, []).append((row, k))
    order = sorted(by_snap)
    indexes = {s.layout_id: store.layout(s).piece_index() for s in used}
    ref_id = layout.layout_id()  # (1) once, not per read
    cap = max((u.numel for u in units), default=0)
    pool_bufs: queue.SimpleQueue = queue.SimpleQueue()  # (4) bounded pool of read buffers
    for _ in range(prefetch + 1):
        pool_bufs.put(np.empty(cap, dtype=np.float32))
    scratch = torch.empty(cap, dtype=torch.float64)  # (2)
    acc_buf = torch.empty((m, cap), dtype=torch.float64)  # (3)
    pool = ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="dist-ema-read")

    def read(unit, i: int, k: int):
        snap = used[i]
        if snap.layout_id == ref_id:
            reads = [Read(unit.rank, unit.start, 0, unit.numel)]
        else:
            reads = merge_reads(translate(indexes[snap.layout_id], unit_segments(layout, unit)))
        full = pool_bufs.get()
        buf = full[: unit.numel]
        nbytes = store.read_reads(snap, k, reads, buf)
        return full, buf, nbytes

    try:
        jobs = [(u, i, row, k) for u in units for i in order for row, k in by_snap[i]]
        q: deque = deque()
        it = iter(jobs)
        acc = None
        cur = None
        for _ in range(prefetch):
            j = next(it, None)
            if j is None:
                break
            q.append((j, pool.submit(read, j[0], j[1], j[3])))
        while q:
            (u, i, row, k), fut = q.popleft()
            j = next(it, None)
            if j is not None:
                q.append((j, pool.submit(read, j[0], j[1], j[3])))
            if cur is None or cur.key != u.key:
                if cur is not None:
                    _write_unit(out_io, layout, snap_name, cur, acc, dtype, unit_bytes)
                cur, acc = u, acc_buf[:, : u.numel]
                acc.zero_()
            full, vals, nbytes = fut.result()
            stats["bytes"] += nbytes
            v = scratch[: u.numel]
            v.copy_(torch.from_numpy(vals))
            pool_bufs.put(full)
            for jt in range(m):
                x = float(X[row, jt])
                if x != 0.0:
                    acc[jt].add_(v, alpha=x)
        if cur is not None:
            _write_unit(out_io, layout, snap_name, cur, acc, dtype, unit_bytes)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
