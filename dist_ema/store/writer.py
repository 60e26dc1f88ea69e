"""Background snapshot writer: the training thread stages, another process does the I/O.

Measured here: a zarr writer *thread* inside the training process slowed GIL-bound
training code by up to ~90% (zarr runs an event loop and thread pool in Python); a
writer *process* fed through shared memory cost 1-4%. So the default is a child
process (``mode="process"``) that reads staged bytes from shared-memory slots;
``"thread"`` and ``"sync"`` (inline, for debugging) are available.

Memory is bounded: ``slots`` staging buffers (default 2: one snapshot in flight
beyond the one being staged). A job that needs a slot while all are busy waits for
the oldest (backpressure), with a logged warning.

Jobs and results are the frozen types of store/jobs.py (``DataJob``, ``CommitJob`` in an
``Envelope`` with their id and slot; one ``JobResult`` each), pickled over the pipe.

A data job writes only under ``prefix``, the job's own attempt folder of the snapshot.

Lifecycle of the writer process:

- It runs in a session of its own, so a Ctrl-C (SIGINT to the terminal's foreground
  process group) reaches only the trainer; the trainer's exit hook then still has a
  writer to commit its pending snapshots with. SIGINT is ignored in it as well.
- It never outlives the trainer: a thread checks every ``_WATCH_SECONDS`` that its parent
  is still the trainer; once the trainer is gone (SIGKILL, a crash) the writer unlinks the
  staging slots and exits at once, whatever it was writing (a torn attempt, cleaned up at
  the next start).
- The owner's heartbeat (rank 0: ``jobs/<job>.json``, see store/io.py ``job_doc``) is
  rewritten by the writer every ``Heartbeat.every`` seconds on its own clock (a thread of
  the writer process; of the trainer in "thread" and "sync" modes), however long training
  goes without ``update()``; it stops before :meth:`SnapshotWriter.close` returns, so a job
  record removed after close() is never written again.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.connection import Connection

import numpy as np

from dist_ema.errors import ConfigError
from dist_ema.store.format import STORAGE_DTYPES, geometry, np_dtype
from dist_ema.store.fs import StoreError, StoreIO
from dist_ema.store.io import check_owner, commit_snapshot, remove_snapshot, write_buffers, write_rank_data
from dist_ema.store.jobs import CommitJob, DataJob, Envelope, Job, JobResult
from dist_ema.store.multipart import UploadConfig

__all__ = ["Heartbeat", "SnapshotWriter", "WriterSpec"]

log = logging.getLogger("dist_ema")

_WATCH_SECONDS = 0.5  # how often a writer process checks that its trainer still lives


@dataclass(frozen=True)
class WriterSpec:
    """What one rank's writer writes: ``profiles`` arrays of ``numel`` elements each."""

    rank: int
    numel: int  # owned elements per profile
    profiles: int
    dtype: str
    compression: str | None
    inner_bytes: int
    upload: UploadConfig = UploadConfig()  # how shards go to an object store (part size, parts in flight)

    @property
    def slot_bytes(self) -> int:
        return max(1, self.numel * self.profiles * STORAGE_DTYPES[self.dtype])


@dataclass(frozen=True)
class Heartbeat:
    """The owner's liveness record: ``doc`` (a JSON object) written to ``key`` every ``every`` seconds.

    Each write sets ``last_seen`` to the time of writing. ``every`` comes from the caller (store/io.py
    ``HEARTBEAT_SECONDS``, read when the writer starts), so a test can shorten it.
    """

    key: str
    doc: dict
    every: float  # seconds


class _Watch:
    """A daemon thread that beats the heart when due and, in a writer process, ends it once the trainer is gone.

    ``parent``: the trainer's pid, or None in the trainer itself ("thread"/"sync" writers). A
    parent that died makes this process an orphan (``os.getppid()`` changes): ``on_orphan`` runs.
    """

    def __init__(self, io: StoreIO, heartbeat: Heartbeat | None, parent: int | None = None, on_orphan=None) -> None:
        self.io, self.heartbeat, self.parent, self.on_orphan = io, heartbeat, parent, on_orphan
        self._stop = threading.Event()
        self._failures = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="dist-ema-watch")
        self._thread.start()

    def _run(self) -> None:
        hb = self.heartbeat
        due = time.monotonic() + hb.every if hb is not None else math.inf
        watch = _WATCH_SECONDS if self.parent is not None else math.inf
        while True:
            wait = min(watch, due - time.monotonic())
            if self._stop.wait(None if wait == math.inf else max(0.0, wait)):
                return
            if self.parent is not None and os.getppid() != self.parent:
                self.on_orphan()
                return
            if time.monotonic() >= due:
                self._beat()
                due = time.monotonic() + hb.every

    def _beat(self) -> None:
        hb = self.heartbeat
        try:
            self.io.put(hb.key, json.dumps(dict(hb.doc, last_seen=time.time())).encode())
            self._failures = 0
        except Exception as e:  # noqa: BLE001 - the next beat retries; a job unseen for long may be taken over
            self._failures += 1
            log.log(logging.WARNING if self._failures == 1 else logging.DEBUG,
                    "dist-ema: writing the heartbeat %s/%s failed (%s: %s); retried every %.0f s. A job not seen "
                    "for the store's staleness limit can be taken over by a job started with resume=True",
                    self.io.url, hb.key, type(e).__name__, e, hb.every)

    def stop(self) -> None:
        """No beat after this returns (one in progress finishes first)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


def _watch(io: StoreIO, heartbeat: Heartbeat | None, parent: int | None = None, on_orphan=None) -> _Watch | None:
    return _Watch(io, heartbeat, parent, on_orphan) if heartbeat is not None or parent is not None else None


def _execute(io: StoreIO, spec: WriterSpec, slot_buf: memoryview | None, env: Envelope) -> JobResult:
    t0 = time.perf_counter()
    nbytes = 0
    job = env.job
    if isinstance(job, DataJob):
        data = np.frombuffer(slot_buf, dtype=np_dtype(spec.dtype), count=spec.numel * spec.profiles)
        if spec.numel:
            g = geometry(spec.numel, spec.dtype, spec.inner_bytes, spec.compression)
            nbytes += write_rank_data(io, job.prefix, spec.rank, data.reshape(spec.profiles, spec.numel), g,
                                      spec.upload)
        if job.buffers is not None:
            write_buffers(io, job.prefix, job.buffers)
            nbytes += len(job.buffers)
    elif isinstance(job, CommitJob):
        if job.owner:
            check_owner(io, job.owner)  # fencing: a job that lost the store commits nothing
        commit_snapshot(io, job.snap, job.meta)
        for snap in job.remove:
            remove_snapshot(io, snap)
    else:
        raise TypeError(f"unknown writer job {type(job).__name__}")
    return JobResult(env.id, True, bytes=nbytes, seconds=time.perf_counter() - t0)


def _fail(env: Envelope, e: BaseException) -> JobResult:
    return JobResult(env.id, False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=8))


def _slot_view(shms, env: Envelope, nbytes: int) -> memoryview | None:
    """The staging slot a data job reads (None for other jobs)."""
    return shms[env.slot].buf[:nbytes] if isinstance(env.job, DataJob) else None


def _attach(name: str) -> shared_memory.SharedMemory:
    shm = shared_memory.SharedMemory(name=name)
    try:  # the trainer owns the segment: keep this process's resource tracker from unlinking it
        from multiprocessing import resource_tracker

        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - best effort
        pass
    return shm


def _orphaned(shm_names: Sequence[str]) -> None:
    """The trainer died without closing this writer: nobody is left to read a result or free the slots.

    The slots' names are unlinked here (the trainer's resource tracker may have done it already, or
    died with it) and the process ends at once, also when the main thread is inside a write.
    """
    import _posixshmem  # what SharedMemory.unlink calls, without this process's resource tracker

    for n in shm_names:
        with contextlib.suppress(OSError):
            _posixshmem.shm_unlink("/" + n)
    os._exit(0)


def _process_main(conn, io: StoreIO, spec: WriterSpec, shm_names: Sequence[str], heartbeat: Heartbeat | None,
                  parent: int) -> None:
    shms = [_attach(n) for n in shm_names]
    watch = _watch(io, heartbeat, parent, lambda: _orphaned(shm_names))
    try:
        while True:
            try:
                job = conn.recv()
            except (EOFError, OSError):  # the trainer exited (or closed the pipe): nothing to report to
                if os.getppid() != parent:
                    _orphaned(shm_names)
                return
            if job is None:
                return
            buf = None
            try:
                buf = _slot_view(shms, job, spec.slot_bytes)
                res = _execute(io, spec, buf, job)
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the trainer
                res = _fail(job, e)
            finally:
                if buf is not None:
                    _release(buf)  # no view of a slot outlives its job
                buf = None
            try:
                conn.send(res)
            except OSError:  # the trainer is gone
                return
    finally:
        if watch is not None:
            watch.stop()  # the last beat is written before the trainer removes the job's record
        for s in shms:
            with contextlib.suppress(BufferError):  # a view still held: the process ends anyway
                s.close()


def _release(view: memoryview) -> None:
    """Release a slot's view; a failed write's traceback (a reference cycle) may still hold arrays on it."""
    try:
        view.release()
    except BufferError:
        gc.collect()  # frees the cycle and the arrays it held
        with contextlib.suppress(BufferError):
            view.release()


class SnapshotWriter:
    """Per-rank writer with ``slots`` shared-memory staging buffers.

    ``stage_view(slot)`` gives the slot as a NumPy byte buffer for the training thread to
    fill; ``submit`` queues a job; ``poll``/``wait`` collect results. With ``heartbeat`` (the
    store's owner, rank 0) the writer also keeps the owner's heartbeat, until :meth:`close`.
    """

    def __init__(self, io: StoreIO, spec: WriterSpec, *, mode: str = "process", slots: int = 2,
                 heartbeat: Heartbeat | None = None) -> None:
        if mode not in ("process", "thread", "sync"):
            raise ConfigError(f"writer must be 'process', 'thread' or 'sync'; got {mode!r}")
        if slots < 1:
            raise ConfigError(f"slots must be >= 1; got {slots}")
        self.io, self.spec, self.mode, self.heartbeat = io, spec, mode, heartbeat
        self._watch: _Watch | None = None
        self._shms: list[shared_memory.SharedMemory] = []
        self.free = list(range(slots))
        self._job_slot: dict[int, int | None] = {}
        self._results: dict[int, dict] = {}
        self._dropped: set[int] = set()  # jobs whose result nobody will read: their slot comes back at the end
        self._next = 0
        self._closed = False
        self.behind_waits = 0  # times a snapshot waited for a free staging slot
        self.behind_seconds = 0.0
        try:
            self._shms = [shared_memory.SharedMemory(create=True, size=spec.slot_bytes) for _ in range(slots)]
            self._start()
        except BaseException:
            self._closed = True
            self._release()
            raise

    def _start(self) -> None:
        io, spec, mode = self.io, self.spec, self.mode
        if mode == "process":
            # a fresh interpreter running this module: unlike multiprocessing's spawn it never re-imports
            # the user's training script (which may lack an `if __name__ == "__main__"` guard). A session
            # of its own: a Ctrl-C in the terminal interrupts the trainer, never the writer that its exit
            # hook needs to commit (the writer watches the trainer's pid to end with it instead)
            parent_sock, child_sock = socket.socketpair()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "dist_ema.store.writer", str(child_sock.fileno()), str(os.getpid())],
                pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, close_fds=True, start_new_session=True,
            )
            child_sock.close()
            self._conn = Connection(parent_sock.detach())
            self._conn.send((io, spec, [s.name for s in self._shms], self.heartbeat))
            return
        self._watch = _watch(io, self.heartbeat)  # this process beats the heart
        if mode == "thread":
            self._q: queue.Queue = queue.Queue()
            self._out: queue.Queue = queue.Queue()
            self._thread = threading.Thread(target=self._thread_main, daemon=True, name="dist-ema-writer")
            self._thread.start()

    def _thread_main(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            buf = None
            try:
                buf = _slot_view(self._shms, job, self.spec.slot_bytes)
                self._out.put(_execute(self.io, self.spec, buf, job))
            except BaseException as e:  # noqa: BLE001
                self._out.put(_fail(job, e))
            finally:
                if buf is not None:
                    with contextlib.suppress(BufferError):
                        buf.release()
                buf = None

    # ------------------------------------------------------------------ staging

    def stage_view(self, slot: int) -> memoryview:
        return self._shms[slot].buf[: self.spec.slot_bytes]

    def acquire_slot(self, timeout: float | None = None) -> int | None:
        """A free slot, waiting for the oldest job when all are busy (None on timeout)."""
        self.poll()
        if not self.free:
            t0 = time.perf_counter()
            oldest = min((j for j, s in self._job_slot.items() if s is not None and j not in self._results),
                         default=None)
            if oldest is not None:
                # once as a warning, then counted (a short snapshot interval makes this the normal case)
                first = self.behind_waits == 0
                log.log(logging.WARNING if first else logging.DEBUG,
                        "dist-ema: snapshot writer is behind (all %d staging slots busy); training waits for the "
                        "oldest write (backpressure)%s", len(self._shms),
                        "; further waits are counted and reported at close()" if first else "")
                self.wait(oldest, timeout=timeout)
                self.behind_waits += 1
                self.behind_seconds += time.perf_counter() - t0
        if not self.free and timeout is None:  # every slot held, yet nothing in flight: never a None to index
            raise StoreError(f"rank {self.spec.rank}: every staging slot is held but no write is in flight")
        return self.free.pop(0) if self.free else None

    # ------------------------------------------------------------------ jobs

    def submit(self, job: Job, slot: int | None = None) -> int:
        """Queue ``job`` (a data job reads staging slot ``slot``); returns its id."""
        if self._closed:
            raise StoreError("snapshot writer is closed")
        if isinstance(job, DataJob) and slot is None:
            raise ValueError("a data job needs the staging slot it reads")
        jid = self._next
        self._next += 1
        job = Envelope(jid, job, slot)
        self._job_slot[jid] = slot
        if self.mode == "sync":
            try:
                buf = self.stage_view(slot) if isinstance(job.job, DataJob) else None
                self._finish(_execute(self.io, self.spec, buf, job))
            except BaseException as e:  # noqa: BLE001
                self._finish(_fail(job, e))
        elif self.mode == "thread":
            self._q.put(job)
        else:
            self._check_alive()
            self._conn.send(job)
        return jid

    def _finish(self, res: JobResult) -> None:
        jid = res.id
        slot = self._job_slot.get(jid)
        if slot is not None and slot not in self.free:
            self.free.append(slot)
            self.free.sort()
        if jid in self._dropped:  # its snapshot was given up while it ran: the slot is back, the result unread
            self._dropped.discard(jid)
            self._job_slot.pop(jid, None)
        else:
            self._results[jid] = res

    def dead(self) -> str | None:
        """Why the writer can no longer write (its process died), or None while it works."""
        if self.mode == "process" and not self._closed and self._proc.poll() is not None:
            return (f"the snapshot writer process of rank {self.spec.rank} died (exit code {self._proc.returncode}); "
                    f"snapshots in flight on that rank are lost")
        return None

    def _check_alive(self) -> None:
        why = self.dead()
        if why is not None:
            raise StoreError(why)

    def poll(self) -> None:
        """Collect finished results without blocking."""
        if self.mode == "process":
            while self._conn.poll():
                try:
                    self._finish(self._conn.recv())
                except EOFError:
                    break
        elif self.mode == "thread":
            while True:
                try:
                    self._finish(self._out.get_nowait())
                except queue.Empty:
                    break

    def wait(self, jid: int, timeout: float | None = None) -> JobResult | None:
        """Block until job ``jid`` has a result (None on timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while jid not in self._results and jid in self._job_slot:  # a dropped job leaves _job_slot when done
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            step = 0.5 if left is None else min(0.5, left)
            if self.mode == "process":
                if self._conn.poll(step):
                    try:
                        self._finish(self._conn.recv())
                    except EOFError:
                        self._check_alive()
                        raise StoreError("snapshot writer process closed its pipe") from None
                else:
                    self._check_alive()
            elif self.mode == "thread":
                try:
                    self._finish(self._out.get(timeout=step))
                except queue.Empty:
                    pass
            else:  # sync results are immediate
                break
        return self._results.get(jid)

    def done(self, jid: int) -> JobResult | None:
        self.poll()
        return self._results.get(jid)

    def pop_result(self, jid: int) -> JobResult | None:
        """Take (and forget) job ``jid``'s result; a job still running keeps its slot until it finishes."""
        if jid not in self._results and jid in self._job_slot:
            self._dropped.add(jid)  # its snapshot failed on another rank: the write still holds the slot
            return None
        self._job_slot.pop(jid, None)
        return self._results.pop(jid, None)

    def close(self, timeout: float = 600.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self.behind_waits and self.spec.rank == 0:
            log.info("dist-ema: waited for the snapshot writer %d times, %.2fs in all (backpressure)",
                     self.behind_waits, self.behind_seconds)
        try:
            if self.mode == "process":
                try:
                    self._conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(5)
                self._conn.close()
            elif self.mode == "thread":
                self._q.put(None)
                self._thread.join(timeout)
        finally:
            if self._watch is not None:
                self._watch.stop()
            self._release()

    def _release(self) -> None:
        for s in self._shms:
            try:
                s.close()
                s.unlink()
            except (FileNotFoundError, BufferError):
                pass


def _child_entry(fd: int, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a SIGINT meant for the trainer's group never ends a write
    conn = Connection(fd)
    try:
        io, spec, names, heartbeat = conn.recv()  # sent at the start: readable even if the trainer died since
    except (EOFError, OSError):  # the trainer exited before sending the set-up
        return
    if os.getppid() != parent:  # the trainer died while this interpreter started
        _orphaned(names)
    _process_main(conn, io, spec, names, heartbeat, parent)


if __name__ == "__main__":
    _child_entry(int(sys.argv[1]), int(sys.argv[2]))
