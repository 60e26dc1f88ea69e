"""Snapshots of a PostHocEMA into a store: named phases over a typed protocol.

Per snapshot, on every rank (the saver's phases, as torch.distributed.checkpoint's):

    plan      the snapshot's id and metadata from the EMA's clock (local); none when already taken
    exchange  report -> gather -> agree -> apply -> commit: every rank reports what its writer
              finished (:class:`~dist_ema.snapshot.protocol.LocalReport`), one all_gather, the same
              :class:`~dist_ema.snapshot.protocol.Decision` everywhere; the ledger applies it and
              rank 0 queues the commits (metadata, then the marker, written last), with retention
    stage     copy each profile's owned EMA into a free staging slot (backpressure when the writer
              is behind; on a GPU a non-blocking copy on a side stream)
    submit    hand staged copies that finished to the writer as data jobs

A failed write, a failed commit or a dead writer on any rank is one clear error on every rank
(``on_error="raise"``) or logged (``"warn"``). Between snapshots an exchange commits what has
finished, so a commit never waits for the next snapshot.

Who owns what: the EMA (buffers, clock) is the tracker's, read here through it; the store claim,
job id and heartbeat are the :class:`~dist_ema.snapshot.session.StoreSession`'s; each
snapshot's life and retention the :class:`~dist_ema.snapshot.ledger.SnapshotLedger`'s; the
writer process and its staging slots this manager's (created and replaced together).

Liveness and endings without close():

- The owner's heartbeat (``jobs/<job>.json``, rank 0) is beaten by the writer (store/writer.py)
  every ``store.io.HEARTBEAT_SECONDS`` on its own clock, not by ``update()``. It stops at close().
- Ctrl-C: the writer process runs in a session of its own, so SIGINT interrupts only the
  trainer; the exit hook then commits the pending snapshots of a one-process run (several
  ranks: each rank names the snapshots it could not commit; they are removed at the next start).
- A PostHocEMA garbage-collected without close() (the manager holds it only weakly): a
  finalizer commits its pending snapshots (one process) or names them (several ranks, no
  collectives), stops the writer, frees its shared memory and gives up the store's ownership.
"""

from __future__ import annotations

import atexit
import logging
import time
import weakref

import torch

from dist_ema.collective import (
    all_gather_object,
    gather_to_rank0,
    raise_if_any,
    rank,
    run_and_check,
    side_group,
    world_size,
)
from dist_ema.config import SnapshotConfig
from dist_ema.errors import ConfigError
from dist_ema.sharding.select import snapshot_record
from dist_ema.snapshot.ledger import SnapshotLedger
from dist_ema.snapshot.protocol import Decision, LocalReport, agree
from dist_ema.snapshot.session import ResumePoint, StoreSession
from dist_ema.snapshot.staging import Stager, Ticket
from dist_ema.store.format import BOX_VERSION, FORMAT_VERSION, SnapshotMeta, data_prefix, step_of
from dist_ema.store.fs import StoreError, StoreIO
from dist_ema.store.io import retire_snapshots
from dist_ema.store.jobs import CommitJob, DataJob
from dist_ema.store.layout import Layout, snapshot_id
from dist_ema.store.multipart import UploadConfig
from dist_ema.store.writer import SnapshotWriter, WriterSpec

__all__ = ["SnapshotConfig", "SnapshotManager"]

log = logging.getLogger("dist_ema")

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SnapshotManager:
    """Owns one rank's writer and the commit protocol for a :class:`~dist_ema.tracker.PostHocEMA`.

    It refers to its EMA weakly (the EMA owns it): an EMA dropped without close() is collected
    and its finalizer (:meth:`_collected`) ends the snapshots cleanly.
    """

    def __init__(self, ema, config: SnapshotConfig, resume: bool | str = False) -> None:
        self._ema = weakref.ref(ema)
        self.config = config
        # dist-ema's own gloo group over every rank (ownership is world-wide: HSDP replicas own
        # nothing but take part), with its own timeout: a stuck rank fails the others in bounded time
        self.group = side_group(config.timeout)
        self.rank = rank(self.group)
        self.world = world_size(self.group)
        self.io = StoreIO(config.url, config.storage_options)
        everyone = all_gather_object([p.key for p in ema.pieces if p.owner], self.group)
        params = [(f, shape, str(dt).replace("torch.", "")) for f, (shape, dt) in ema.layout.global_params.items()]
        self.layout = Layout.build(params, everyone, ema.layout.engine)
        self.layout_id = self.layout.layout_id()
        # what every snapshot records about the tracked set: params= and the model's PEFT adapter (sharding.select)
        self.recorded = snapshot_record(ema.model, ema.layout)
        self._buffers = self._buffer_table() if ema.config.buffers == "copy" else []  # collective (stages)
        self.bytes_written = 0
        self.stall_seconds: list[float] = []
        self.writer: SnapshotWriter | None = None
        self.stager: Stager | None = None  # made at the first snapshot, for the writer's slots (see _stager)
        self._closed = False
        # validate everything (store, resume) before creating the writer's process and shared memory;
        # ``resumed``: the snapshot the EMA then loads (PostHocEMA._restore), or None
        self.session = StoreSession(self.io, self.group, self.rank, config.storage_options)
        self.session.open(self.layout, resume)
        self.ledger = SnapshotLedger(self.session.committed, config.keep)
        try:
            self.resumed = self._find_resume() if resume else None
            self._start_writer()
        except BaseException:  # a refused resume (another model, ...) leaves the store to the next job
            self.session.release()
            raise
        _LIVE.add(self)
        # holds this manager (not the EMA) until the EMA is collected or close() detaches it
        self._finalizer = weakref.finalize(ema, SnapshotManager._collected, self)
        self._finalizer.atexit = False  # at exit _close_at_exit does the same for live EMAs

    @property
    def ema(self):
        """The PostHocEMA these snapshots are of (it is alive whenever one of its methods calls here)."""
        ema = self._ema()
        if ema is None:
            raise StoreError("the PostHocEMA of these snapshots was garbage-collected; nothing more can be taken")
        return ema

    # the session's and the ledger's state, by the names callers use
    job = property(lambda self: self.session.job)
    took_over = property(lambda self: self.session.took_over)
    skipped = property(lambda self: self.ledger.skipped)
    last_step = property(lambda self: self.ledger.last_step)
    committed_ids = property(lambda self: self.ledger.committed_ids)

    # ------------------------------------------------------------------ the writer

    def _start_writer(self) -> None:
        """A writer (and its stager) on every rank, or the same error on every rank (collective)."""
        writer, err = None, None
        try:
            writer = self._new_writer()
        except Exception as e:  # noqa: BLE001 - exchanged below
            err = e
        try:
            raise_if_any(err, "starting the snapshot writer", self.group, StoreError)
        except StoreError:
            if writer is not None:  # another rank failed: release this rank's process and shared memory
                writer.close(timeout=5)
            raise
        self._use_writer(writer)

    def _new_writer(self) -> SnapshotWriter:
        cfg = self.config
        spec = WriterSpec(self.rank, self.ema.owned_numel, len(self.ema.profiles), cfg.dtype, cfg.compression,
                          cfg.inner_chunk_bytes, UploadConfig(cfg.upload_part_bytes, cfg.upload_concurrency))
        # the owner's heartbeat: the writer beats it, however long training goes without update()
        return SnapshotWriter(self.io, spec, mode=cfg.writer, slots=cfg.slots, heartbeat=self.session.heartbeat())

    def _use_writer(self, writer: SnapshotWriter) -> None:
        """Write with ``writer`` from now on; its slots get a new stager at the next snapshot."""
        if self.stager is not None:
            self.stager.close()
        self.writer, self.stager = writer, None

    def _stager(self) -> Stager:
        """The stager of the current writer's slots, on the EMA buffers' device now (the model may have moved
        since; host memory with offload=True)."""
        device = self.ema.buffer_device
        moved = self.stager is not None and self.stager.device != device
        if self.stager is None or (moved and not any(r.ticket is not None for r in self.ledger.in_flight)):
            if self.stager is not None:
                self.stager.close()
            self.stager = Stager(device, self.writer.stage_view, self.config.slots, _TORCH_DTYPES[self.config.dtype])
        return self.stager

    # ------------------------------------------------------------------ snapshot: plan, exchange, stage, submit

    def _plan(self) -> tuple[str, dict] | None:
        """The snapshot to take now (id, metadata), or None when the EMA has not moved since the last one."""
        clock = self.ema.clock
        if clock.updates == 0:
            raise ConfigError("snapshot() before the first update(): the EMA has no time yet; call update() first")
        if self.ledger.is_taken(clock.step, clock.t_updated):
            return None  # already snapshotted at this step, or the EMA has not moved since (update_every)
        snap = snapshot_id(clock.step)
        if snap in self.ledger.committed_ids:  # the same on every rank: refuse before anything is written
            raise StoreError(
                f"snapshot {snap} is already committed in {self.io.url}; this run repeats step {clock.step} of an "
                f"earlier one. Committed snapshots are never rewritten: restore the EMA with "
                f"ema.load_state_dict(...) from the training checkpoint you restarted from (the snapshots after it "
                f"are then retired), or use a new store URL"
            )
        return snap, self._meta()

    def _meta(self) -> dict:
        ema = self.ema
        cfg = ema.config
        clock = ema.clock
        records, off = [], 0
        for n, shape, dtype, nbytes in self._buffers:
            records.append((n, shape, dtype, off, nbytes))
            off += nbytes
        return SnapshotMeta(
            step=clock.step, t=clock.t_updated, t_now=clock.t, updates=clock.updates, unit=cfg.unit,
            batch_size=cfg.batch_size, update_every=cfg.update_every,
            profiles=tuple((p.sigma_rel, p.gamma) for p in ema.profiles), dtype=self.config.dtype,
            compression=self.config.compression, inner_bytes=self.config.inner_chunk_bytes, world_size=self.world,
            engine=self.layout.engine, layout=self.layout_id, model=self.layout.model_fingerprint(),
            ties=dict(ema.ties), buffers=tuple(records), attempt=self.job, created=time.time(),
            version=BOX_VERSION if self.layout.has_boxes else FORMAT_VERSION, extra=dict(self.recorded),
        ).to_doc()

    @torch.no_grad()
    def snapshot(self) -> str | None:
        """Stage and queue a snapshot of every profile; commit finished ones. Collective.

        Returns the snapshot id, or None when none was taken (already taken at this step, or
        skipped because the writer is behind and ``when_behind="skip"``; see ``skipped``).
        """
        if self._closed:
            raise StoreError("snapshot() after close(): the EMA's store is closed")
        planned = self._plan()
        if planned is None:
            return None
        snap, meta = planned
        self.ledger.taken(self.ema.clock.step, self.ema.clock.t_updated)
        # agree first: commit what every rank finished, and learn whether every rank can stage now
        if not self.exchange() and self.config.when_behind == "skip":
            self.ledger.skip(snap)
            if self.rank == 0:
                log.warning("dist-ema: snapshot %s SKIPPED: the store is behind (a staging slot is busy on some "
                            "rank) and when_behind='skip'; %d skipped so far", snap, len(self.ledger.skipped))
            return None
        ticket = self._stage(snap, meta)
        # on a GPU the copy may still run: the writer gets the job once it finished (see submit_staged)
        self.ledger.staged(snap, float(meta["t"]), meta, ticket)
        self.submit_staged()
        return snap

    def _stage(self, snap: str, meta: dict) -> Ticket:
        """Copy the owned EMA (and rank 0: the buffers) into a free slot; the same error on every rank."""
        t0 = time.perf_counter()
        ticket, err = None, None
        staged = self._stage_buffers_of_stages() if meta["buffers"] else {}
        try:
            self.ema.wait_update()  # offload=True: the update in flight finished (its error is exchanged below)
            slot = self.writer.acquire_slot()  # blocks for the oldest write if needed (backpressure)
            buffers = self._snapshot_buffers(staged) if self.rank == 0 and meta["buffers"] else []
            # a rank that owns nothing (a small model on many ranks) stages no data; it still commits with the rest
            ticket = self._stager().start(slot, [prof.flat for prof in self.ema.profiles], self.ema.owned_numel,
                                          buffers=buffers)
        except Exception as e:  # noqa: BLE001 - exchanged below
            err = e
        self.stall_seconds.append(time.perf_counter() - t0)
        raise_if_any(err, f"staging snapshot {snap}", self.group, StoreError)
        return ticket

    def submit_staged(self, block: bool = False) -> None:
        """Hand staged snapshots whose device-to-host copy finished to the writer (local, never raises)."""
        for rec in self.ledger.in_flight:
            if rec.ticket is None:
                continue
            if not self.stager.ready(rec.ticket):
                if not block:
                    continue
                self.stager.wait(rec.ticket)
            bufs = rec.ticket.payload.get("buffers", [])
            # reshape(-1) first: a 0-dim buffer (BatchNorm's num_batches_tracked) has no byte view of its own
            packed = (b"".join(b.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for b in bufs)
                      if bufs else None)
            try:
                jid = self.writer.submit(DataJob(rec.snap, data_prefix(rec.snap, self.job), packed), rec.ticket.slot)
            except StoreError as e:  # the writer died since the exchange: reported to every rank at the next one
                self.ledger.errors[rec.snap] = str(e)
                jid = -1
            self.ledger.writing(rec, jid)

    def before_update(self) -> None:
        """Called by update() before it changes the EMA: order it after queued copies; submit finished ones.

        (The owner's heartbeat is not beaten here but by the writer, on its own clock.)
        """
        if self.ledger.in_flight and self.stager is not None:
            self.stager.order_update()
            self.submit_staged()

    def exchange(self, block: bool = False) -> bool:
        """Report, gather, agree, apply, commit. Collective.

        A writer process that died is found here on its rank and reported to every rank: with
        ``on_error="raise"`` as one StoreError everywhere, with "warn" logged, its snapshots in
        flight listed as skipped, and a new writer started. Returns True when every rank has a
        free staging slot.
        """
        report = self._report(block)
        decision = agree(all_gather_object(report, self.group))
        to_commit, settled = self.ledger.apply(decision)
        for rec in settled:
            self.writer.pop_result(rec.jid)
        for rec in to_commit:
            remove = self.ledger.retain(rec)
            if self.rank == 0:
                jid = self.writer.submit(CommitJob(rec.snap, rec.meta, tuple(remove), self.job))
                self.ledger.commit_jobs[jid] = rec.snap
        if decision.deaths:
            self._after_deaths(decision, report.writer_dead)
        if decision.failed:
            if self.config.on_error == "raise":
                raise StoreError(f"snapshot write failed, snapshot(s) not committed: {decision.failure_text()}. To "
                                 f"keep training without these snapshots, pass on_error='warn'")
            if self.rank == 0:
                log.error("dist-ema: snapshot(s) NOT committed (on_error='warn', training continues): %s",
                          decision.failure_text())
        return decision.all_slots_free

    def _after_deaths(self, decision: Decision, mine: str | None) -> None:
        """A writer died somewhere: raise everywhere, or (on_error="warn") replace the dead ones."""
        if self.config.on_error == "raise":
            raise StoreError(f"{decision.death_text()}. To keep training through writer failures, pass "
                             f"on_error='warn'")
        if self.rank == 0:
            log.error("dist-ema: %s; starting a new writer (on_error='warn', training continues)",
                      decision.death_text())
        if mine is not None:
            self.writer.close(timeout=5)
        writer = run_and_check(lambda: self._new_writer() if mine is not None else self.writer,
                               "starting a new snapshot writer", self.group, StoreError)
        if writer is not self.writer:
            self._use_writer(writer)

    def _report(self, block: bool) -> LocalReport:
        """This rank's writer results (local, never raises)."""
        if self.writer.dead() is None:
            self.submit_staged(block)  # copies finished on the device (all of them when blocking)
        written, failed, commits_done, commits_failed = [], dict(self.ledger.errors), [], {}
        self.ledger.errors = {}
        dead = self.writer.dead()
        if dead is None:
            try:
                self.writer.poll()
                for rec in self.ledger.in_flight:
                    if rec.snap in failed or rec.jid is None:
                        continue
                    res = self.writer.wait(rec.jid) if block else self.writer.done(rec.jid)
                    if res is None:
                        continue
                    if res.ok:
                        written.append(rec.snap)
                        self.bytes_written += res.bytes
                    else:
                        failed[rec.snap] = res.error
                for jid, snap in list(self.ledger.commit_jobs.items()):
                    res = self.writer.wait(jid) if block else self.writer.done(jid)
                    if res is not None:
                        self.writer.pop_result(jid)
                        del self.ledger.commit_jobs[jid]
                        if res.ok:
                            commits_done.append(snap)
                        else:
                            commits_failed[snap] = res.error
            except StoreError as e:  # the writer died while we waited
                dead = self.writer.dead() or str(e)
        if dead is not None:  # nothing in flight on this rank will finish
            for rec in self.ledger.in_flight:
                if rec.snap not in written:
                    failed.setdefault(rec.snap, dead)
            for jid, snap in list(self.ledger.commit_jobs.items()):
                commits_failed[snap] = dead
                del self.ledger.commit_jobs[jid]
        free = bool(self.writer.free) or dead is not None
        return LocalReport(tuple(written), failed, tuple(commits_done), commits_failed, free, dead)

    def after_update(self) -> None:
        """Called by update() after each EMA update: this side owns the schedule (``snapshot_every``).

        A snapshot every ``snapshot_every`` updates; halfway between two, an exchange that commits
        what has finished (so a snapshot's commit never waits for the next snapshot).
        """
        every = self.config.snapshot_every
        if every:
            u = self.ema.clock.updates
            if u % every == 0:
                self.snapshot()
            elif u % every == every // 2:
                self.maybe_exchange()

    def maybe_exchange(self) -> None:
        """Called from update(): halfway between snapshots, commit what has finished."""
        if self.ledger.busy():  # the same on every rank
            self.exchange()

    # ------------------------------------------------------------------ buffers of pipeline stages

    def _buffer_table(self) -> list[tuple[str, list[int], str, int]]:
        """The buffers a snapshot stores: (name, shape, dtype, bytes). Under pipeline parallelism, the
        union of every stage's buffers (exchanged once, collective; the first rank holding one provides it)."""
        def entry(n: str, b: torch.Tensor) -> tuple:
            return (n, list(b.shape), str(b.dtype).replace("torch.", ""), b.numel() * b.element_size())

        mine = [entry(n, b) for n, b in self.ema.layout.buffers.items()]
        self._buffer_from: dict[str, int] = {}
        if self.ema.layout.all_params is None:  # every rank holds every buffer
            return mine
        table = []
        for r, part in enumerate(all_gather_object(mine, self.group)):
            for e in part:
                if e[0] not in self._buffer_from:
                    self._buffer_from[e[0]] = r
                    table.append(tuple(e))
        return table

    def _stage_buffers_of_stages(self) -> dict[str, torch.Tensor]:
        """Pipeline stages: rank 0 receives the buffers other stages hold (collective; {} elsewhere)."""
        if not any(r != 0 for r in self._buffer_from.values()):
            return {}
        mine = {n: self.ema.layout.buffers[n].detach().cpu().clone()
                for n, r in self._buffer_from.items() if r == self.rank and r != 0}
        parts = gather_to_rank0(mine, self.group)
        return {} if parts is None else {n: t for part in parts for n, t in part.items()}

    def _snapshot_buffers(self, staged: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        local = self.ema.layout.buffers
        return [local[n] if n in local else staged[n] for n, *_ in self._buffers]

    # ------------------------------------------------------------------ close

    def flush(self) -> None:
        """Block until every snapshot taken so far is written and committed (collective).

        Use before saving a training checkpoint that must agree with the store.
        """
        if self._closed:
            return
        self.exchange(block=True)  # data of every pending snapshot -> commits queued on rank 0
        self.exchange(block=True)  # results of those commits

    def close(self, final_snapshot: bool = False) -> None:
        """Wait for every pending write, commit, and stop the writer. Collective; idempotent.

        ``final_snapshot=True`` (what ``PostHocEMA.close()`` passes by default) first snapshots the
        updates after the newest snapshot when a schedule (``snapshot_every``) is set and the EMA
        has moved since; the default here is False, so the exit hook (:meth:`_at_exit`) never takes
        one. The decision uses only state that is the same on every rank.
        """
        if self._closed:
            return
        try:
            clock = self.ema.clock if final_snapshot else None  # a collected EMA closes without one
            if (clock is not None and self.config.snapshot_every is not None and clock.updates > 0
                    and not self.ledger.is_taken(clock.step, clock.t_updated)):
                before = self.ledger.last_step
                self.flush()  # free the staging slots: a final snapshot is never skipped as "behind"
                snap = self.snapshot()
                if snap is not None and self.rank == 0:
                    since = f"the newest was step {before}" if before is not None else "none before"
                    log.info("dist-ema: close(): final snapshot at step %d (%s), so the last %d step(s) are kept; "
                             "ema.close(final_snapshot=False) skips it", clock.step, since, clock.step - (before or 0))
            self.flush()
        finally:
            self._stop()
            self.writer.close()  # its heartbeat stops before the job's record is removed
            self.session.release()

    def _stop(self) -> None:
        """Mark closed: no exit hook or finalizer runs for this manager any more."""
        self._closed = True
        _LIVE.discard(self)
        self._finalizer.detach()
        if self.stager is not None:
            self.stager.close()

    def abandon(self) -> None:
        """Stop the writer without collectives (an exception is propagating, maybe on this rank only)."""
        if self._closed:
            return
        self._stop()
        if self.writer is not None:
            self.writer.close(timeout=30)
        self.session.release()

    def _at_exit(self) -> None:
        """The interpreter exits without close(): commit when that is safe (one process), else say what is lost."""
        self._end_without_close("the program ended without ema.close()", "at exit", always=False)

    def after_error(self, what: str) -> None:
        """An exception (``what``: its type's name) leaves a ``with PostHocEMA(...)`` block: end without close().

        One process commits its pending snapshots (no other rank can be anywhere else), as at exit;
        with several ranks the exception may be on this rank only, so no collective is taken: the
        uncommitted snapshots are named and the writer, shared memory and ownership released.
        """
        self._end_without_close(f"{what} left the `with PostHocEMA(...)` block", "on the way out", always=False)

    def _collected(self) -> None:
        """Finalizer: the PostHocEMA was garbage-collected without close() (a local of a function that returned).

        Runs wherever the collection happened (any thread, between any two lines of the user's
        code), so it takes no collectives: with several ranks the others may be anywhere.
        """
        self._end_without_close("a PostHocEMA was garbage-collected without ema.close()",
                                "when it was collected", always=True)

    def _end_without_close(self, what: str, when: str, always: bool) -> None:
        """Commit the pending snapshots when that is safe (one process), else name them; free everything.

        ``always``: warn even when nothing was pending (the store's ownership and the writer were
        held until now).
        """
        if self._closed:
            return
        lost = [r.snap for r in self.ledger.in_flight] + [r.snap for r in self.ledger.unconfirmed]
        if self.world == 1:  # the world size at start: a destroyed process group must not look like one rank
            try:
                self.close()
                if lost or always:
                    log.warning("dist-ema: %s; committed the pending snapshot(s) %s of %s %s and released the "
                                "store. Call ema.close() at the end of training", what, lost, self.io.url, when)
                return
            except Exception as e:  # noqa: BLE001 - at exit or in a finalizer: report, never raise
                log.error("dist-ema: %s; committing the pending snapshot(s) %s of %s %s failed: %s", what, lost,
                          self.io.url, when, e)
        elif lost or always:
            log.warning("dist-ema: rank %d: %s: snapshot(s) %s of %s are NOT committed (they are removed at the "
                        "next start); call ema.close() on every rank at the end of training", self.rank, what,
                        lost, self.io.url)
        self.abandon()

    # ------------------------------------------------------------------ resume and restore

    def _find_resume(self) -> ResumePoint | None:
        """The snapshot the EMA resumes from (checked against it on every rank; collective), or None.

        The EMA loads it itself (:meth:`PostHocEMA._restore`: the tracker is the one writer of its
        buffers and clock); the snapshots taken from now on come after it.
        """
        ema = self.ema
        point = self.session.resume_point(self.layout, ema.config.unit, ema.profiles, ema.sigma_rels,
                                          choice=self.recorded.get("params"))
        if point is not None:
            self.ledger.taken(point.snap.step, point.snap.t)
        return point

    def restored(self, step: int, t: float) -> list[int]:
        """The EMA was restored to ``step`` from a training checkpoint (collective). Returns retired steps.

        Committed snapshots after ``step`` belong to the abandoned trajectory: they are moved
        to ``retired/<job>/`` (kept, listed by ``dist-ema ls``, never used by synthesis), so the
        new trajectory never writes into them and synthesis never mixes the two.
        """
        self.flush()  # what this job already took is committed first (it may be among the retired)
        newer = None
        if self.rank == 0:
            newer = sorted((snap for snap, _ in self.ledger.committed if step_of(snap) > step), key=step_of)
        newer = all_gather_object(newer, self.group)[0]
        if newer:
            reason = f"the EMA was restored to step {step} from a training checkpoint"
            where = run_and_check(
                lambda: retire_snapshots(self.io, newer, self.job, step, reason) if self.rank == 0 else None,
                f"retiring snapshots {newer} of {self.io.url}", self.group, StoreError,
            )
            self.ledger.retire(newer)
            if self.rank == 0:
                log.warning("dist-ema: restored to step %d from a training checkpoint: the %d snapshot(s) after it "
                            "(steps %s) belong to the abandoned run; moved to %s/%s (kept, never used by "
                            "synthesis)", step, len(newer), [step_of(x) for x in newer], self.io.url, where)
        self.ledger.taken(step, t)
        return [step_of(x) for x in newer or []]

    # ------------------------------------------------------------------ synthesis in training

    def committed_snapshots(self):
        """(reader, the committed snapshots retention keeps), the same list on every rank. Collective."""
        return self.session.committed_snapshots({snap for snap, _ in self.ledger.committed})


# Managers not closed yet: at interpreter exit each commits (one process) or names what is lost.
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    for m in list(_LIVE):
        m._at_exit()

