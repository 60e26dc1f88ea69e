"""Snapshots of a PostHocEMA into a store: start-up, staging, commit coordination, resume.

This is the bridge between the tracker (torch tensors on the shards' device) and the
store (NumPy + zarr in a writer process). Per snapshot, on every rank:

1. take a free staging slot (backpressure if the writer is behind), copy the owned
   prefix of each profile's flat EMA buffer into it (one memcpy per profile; on GPU a
   non-blocking copy on a side stream) and queue a data job;
2. exchange with the other ranks which snapshots each has finished writing (a small
   all_gather, also once between snapshots); snapshots finished on *every* rank are
   committed by rank 0 (metadata, then the marker, written last), and retention runs;
   a failed write raises one clear error on every rank.

Liveness and endings without close():

- The owner's heartbeat (``jobs/<job>.json``, rank 0) is beaten by the writer (store/writer.py)
  every ``store.io.HEARTBEAT_SECONDS`` on its own clock, not by ``update()``: a job that spends
  longer than the staleness limit in evaluation, a checkpoint save or a debugger is still seen
  alive, and a second job started with resume=True is refused. It stops at close().
- Ctrl-C: the writer process runs in a session of its own, so SIGINT interrupts only the
  trainer; the exit hook then commits the pending snapshots of a one-process run (several
  ranks: each rank names the snapshots it could not commit; they are removed at the next start).
- A PostHocEMA garbage-collected without close() (the manager holds it only weakly, so the
  two are no cycle that hides it): a finalizer commits its pending snapshots (one process) or
  names them (several ranks, no collectives), stops the writer, frees its shared memory and
  gives up the store's ownership, with a warning to call close().
"""

from __future__ import annotations

import atexit
import json
import logging
import secrets
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from dist_ema.collective import (
    all_gather_object,
    broadcast_object,
    gather_to_rank0,
    raise_if_any,
    rank,
    run_and_check,
    side_group,
    world_size,
)
from dist_ema.config import SnapshotConfig
from dist_ema.staging import Stager, Ticket
from dist_ema.store import io as store_io
from dist_ema.store.format import BOX_VERSION, FORMAT_VERSION, SnapshotMeta, data_prefix, job_key, step_of
from dist_ema.store.fs import StoreError, StoreIO, redact
from dist_ema.store.io import (
    claim_store,
    ensure_store,
    job_doc,
    read_commits,
    release_store,
    remove_leftovers,
    retire_snapshots,
    write_layout,
)
from dist_ema.store.layout import Layout, param_mismatch, snapshot_id
from dist_ema.store.reader import SnapshotStore
from dist_ema.store.retention import thin_evenly
from dist_ema.store.writer import Heartbeat, SnapshotWriter, WriterSpec

__all__ = ["SnapshotConfig", "SnapshotManager"]

log = logging.getLogger("dist_ema")

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Pending:
    snap: str
    jid: int | None  # None: staged on the device, handed to the writer once the copy finished
    meta: dict
    t: float
    ticket: Ticket | None = None


def read_pieces(reader: SnapshotStore, snap, profile: int, pieces, offsets) -> np.ndarray:
    """This rank's pieces of one profile of a snapshot (any layout), as one flat float32 array."""
    return reader.read_pieces(snap, profile, pieces, offsets)[0]


class SnapshotManager:
    """Owns one rank's writer and the commit protocol for a :class:`~dist_ema.tracker.PostHocEMA`.

    It refers to its EMA weakly (the EMA owns it): an EMA dropped without close() is collected
    and its finalizer (:meth:`_collected`) ends the snapshots cleanly.
    """

    def __init__(self, ema, config: SnapshotConfig, resume: bool = False) -> None:
        self._ema = weakref.ref(ema)
        self.config = config
        # dist-ema's own gloo group over every rank (ownership is world-wide: HSDP replicas own
        # nothing but take part), with its own timeout: a stuck rank fails the others in bounded time
        self.group = side_group(config.timeout)
        self.rank = rank(self.group)
        self.world = world_size(self.group)
        self.io = StoreIO(config.url, config.storage_options)
        owned = [p.key for p in ema.pieces if p.owner]
        everyone = all_gather_object(owned, self.group)
        params = [(f, shape, str(dt).replace("torch.", "")) for f, (shape, dt) in ema.layout.global_params.items()]
        self.layout = Layout.build(params, everyone, ema.layout.engine)
        self.layout_id = self.layout.layout_id()
        if ema.config.buffers == "copy":
            self._buffer_table()  # collective under pipeline parallelism: now, on every rank
        self.pending: list[_Pending] = []
        self.committed: list[tuple[str, float]] = []  # rank 0: (snap, t) of committed snapshots, for retention
        self.commit_jobs: dict[int, str] = {}  # rank 0: commit job id -> snap
        # every rank: snapshots whose commit rank 0 queued but whose outcome was not exchanged yet.
        # Kept on all ranks (decisions are collective), so "is there anything to exchange" is the same everywhere.
        self.unconfirmed: list[str] = []
        self.skipped: list[str] = []
        self.last_step: int | None = None
        self.last_t: float | None = None  # time of the newest snapshot taken: never two at one t
        self.bytes_written = 0
        self.stall_seconds: list[float] = []
        self.writer: SnapshotWriter | None = None
        self._closed = False
        self._resume = resume
        self._local_errors: dict[str, str] = {}  # snapshot -> error raised outside an exchange, reported at the next
        self._stage_dtype = _TORCH_DTYPES[config.dtype]
        self.stager: Stager | None = None  # made with the writer's slots at the first snapshot
        # validate everything (store, resume) before creating the writer's process and shared memory
        self._startup()
        try:
            self.resumed = self._resume_from_store() if resume else None
            self.writer = self._start_writer()
        except BaseException:  # a refused resume (another model, ...) leaves the store to the next job
            self._release_owner()
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

    def _start_writer(self) -> SnapshotWriter:
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
        return writer

    # ------------------------------------------------------------------ start-up

    def _startup(self) -> None:
        # one id per job start: the job's attempt folders and its ownership record carry it
        job = f"j{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"

        def rank0() -> None:
            ensure_store(self.io, create=True)
            self.took_over = claim_store(self.io, job, self._resume)  # before anything else is written
            self._owner = True
            done, torn = read_commits(self.io)
            # crash leftovers are removed; the uncommitted attempts of a job that may still run are kept
            removed, kept = remove_leftovers(self.io, done, torn, self.took_over)
            for key in removed:
                log.warning("dist-ema: removing uncommitted data %s from %s", key, self.io.url)
            for key, why in kept.items():
                log.warning("dist-ema: keeping uncommitted attempt %s in %s: %s; a later start removes it once "
                            "that job has stopped", key, self.io.url, why)
            self.committed = [(c.snap, float(c.meta["t"])) for c in done]
            if done and not self._resume:
                raise StoreError(
                    f"{self.io.url} already holds {len(done)} committed snapshot(s) (newest: step "
                    f"{done[-1].meta['step']}); pass resume=True to continue that run, or use a new store URL"
                )

        self.took_over = None
        self._owner = False
        where = f"store {self.io.url} (storage_options={redact(self.config.storage_options)})"
        try:
            if self.rank == 0:
                run_and_check(rank0, f"opening {where}", self.group, StoreError)
            else:
                run_and_check(lambda: None, f"opening {where}", self.group, StoreError)
        except BaseException:
            self._release_owner()
            raise
        # the job id and the committed snapshots, known on every rank, so that every rank refuses a
        # committed step the same way
        self.job, committed = all_gather_object((job, self.committed) if self.rank == 0 else None, self.group)[0]
        self.committed_ids = {snap for snap, _ in committed}
        # every rank writes its own layout file: permanent storage problems show up here, at start-up
        try:
            run_and_check(lambda: write_layout(self.io, self.layout, self.rank), f"writing the layout to {where}",
                          self.group, StoreError)
        except BaseException:
            self._release_owner()
            raise

    def _release_owner(self) -> None:
        """Rank 0: give up the store (close, or a job that stops with an error). Never raises."""
        if not getattr(self, "_owner", False):
            return
        self._owner = False
        try:
            release_store(self.io, self.job if hasattr(self, "job") else "")
        except Exception as e:  # noqa: BLE001 - reported; the next job can still take a stale owner over
            log.warning("dist-ema: could not release the ownership of %s: %s", self.io.url, e)

    # ------------------------------------------------------------------ snapshot

    def _meta(self) -> dict:
        ema = self.ema
        cfg = ema.config
        clock = ema.clock
        records, off = [], 0
        if cfg.buffers == "copy":
            for n, shape, dtype, nbytes in self._buffer_table():
                records.append((n, shape, dtype, off, nbytes))
                off += nbytes
        return SnapshotMeta(
            step=clock.step, t=clock.t_updated, t_now=clock.t, updates=clock.updates, unit=cfg.unit,
            batch_size=cfg.batch_size, update_every=cfg.update_every,
            profiles=tuple((p.sigma_rel, p.gamma) for p in ema.profiles), dtype=self.config.dtype,
            compression=self.config.compression, inner_bytes=self.config.max_object_bytes, world_size=self.world,
            engine=self.layout.engine, layout=self.layout_id, model=self.layout.model_fingerprint(),
            ties=dict(ema.ties), buffers=tuple(records), attempt=self.job, created=time.time(),
            version=BOX_VERSION if self.layout.has_boxes else FORMAT_VERSION,
        ).to_doc()

    @torch.no_grad()
    def snapshot(self) -> str | None:
        """Stage and queue a snapshot of every profile; commit finished ones. Collective.

        Returns the snapshot id, or None when none was taken (already taken at this step, or
        skipped because the writer is behind and ``when_behind="skip"``; see ``skipped``).
        """
        clock = self.ema.clock
        if self._closed:
            raise StoreError("snapshot() after close(): the EMA's store is closed")
        if clock.updates == 0:
            raise ValueError("snapshot() before the first update(): the EMA has no time yet; call update() first")
        if self.last_step == clock.step or self.last_t == clock.t_updated:
            return None  # already snapshotted at this step, or the EMA has not moved since (update_every)
        snap = snapshot_id(clock.step)
        if snap in self.committed_ids:  # the same on every rank: refuse before anything is written
            raise StoreError(
                f"snapshot {snap} is already committed in {self.io.url}; this run repeats step {clock.step} of an "
                f"earlier one. Committed snapshots are never rewritten: restore the EMA with "
                f"ema.load_state_dict(...) from the training checkpoint you restarted from (the snapshots after it "
                f"are then retired), or use a new store URL"
            )
        self.last_step, self.last_t = clock.step, clock.t_updated
        # agree first: commit what every rank finished, and learn whether every rank can stage now
        everyone_free = self.exchange()
        if not everyone_free and self.config.when_behind == "skip":
            self.skipped.append(snap)
            if self.rank == 0:
                log.warning("dist-ema: snapshot %s SKIPPED: the store is behind (a staging slot is busy on some "
                            "rank) and when_behind='skip'; %d skipped so far", snap, len(self.skipped))
            return None
        t0 = time.perf_counter()
        ticket, err = None, None
        meta = self._meta()
        staged = self._stage_buffers_of_stages() if meta["buffers"] else {}
        try:
            slot = self.writer.acquire_slot()  # blocks for the oldest write if needed (backpressure)
            buffers = self._snapshot_buffers(staged) if self.rank == 0 and meta["buffers"] else []
            ticket = self._stage(slot, buffers)
        except Exception as e:  # noqa: BLE001 - exchanged below
            err = e
        self.stall_seconds.append(time.perf_counter() - t0)
        raise_if_any(err, f"staging snapshot {snap}", self.group, StoreError)
        # on a GPU the copy may still run: the writer gets the job once it finished (see submit_staged)
        self.pending.append(_Pending(snap, None, meta, float(meta["t"]), ticket))
        self.submit_staged()
        return snap

    def submit_staged(self, block: bool = False) -> None:
        """Hand staged snapshots whose device-to-host copy finished to the writer (local, never raises)."""
        for p in self.pending:
            if p.jid is not None or p.ticket is None:
                continue
            if not self.stager.ready(p.ticket):
                if not block:
                    continue
                self.stager.wait(p.ticket)
            bufs = p.ticket.payload.get("buffers", [])
            # reshape(-1) first: a 0-dim buffer (BatchNorm's num_batches_tracked) has no byte view of its own
            packed = (b"".join(b.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for b in bufs)
                      if bufs else None)
            try:
                p.jid = self.writer.submit({"kind": "data", "snap": p.snap, "prefix": data_prefix(p.snap, self.job),
                                            "buffers": packed}, p.ticket.slot)
            except StoreError as e:  # the writer died since the exchange: reported to every rank at the next one
                self._local_errors[p.snap] = str(e)
                p.jid = -1
            p.ticket = None

    def before_update(self) -> None:
        """Called by update() before it changes the EMA: order it after queued copies; submit finished ones.

        (The owner's heartbeat is not beaten here but by the writer, on its own clock.)
        """
        if self.pending:
            self.stager.order_update()
            self.submit_staged()

    def _buffer_table(self) -> list[tuple[str, list[int], str, int]]:
        """The buffers a snapshot stores: (name, shape, dtype, bytes). Under pipeline parallelism, the
        union of every stage's buffers (exchanged once; the first rank holding a buffer provides it)."""
        table = self.__dict__.get("_buffers_of_all")
        if table is None:
            def entry(n: str, b: torch.Tensor) -> tuple:
                return (n, list(b.shape), str(b.dtype).replace("torch.", ""), b.numel() * b.element_size())

            mine = [entry(n, b) for n, b in self.ema.layout.buffers.items()]
            if self.ema.layout.all_params is None:  # every rank holds every buffer
                table, self._buffer_from = mine, {}
            else:
                table, self._buffer_from = [], {}
                for r, part in enumerate(all_gather_object(mine, self.group)):
                    for e in part:
                        if e[0] not in self._buffer_from:
                            self._buffer_from[e[0]] = r
                            table.append(tuple(e))
            self._buffers_of_all = table
        return table

    def _stage_buffers_of_stages(self) -> dict[str, torch.Tensor]:
        """Pipeline stages: rank 0 receives the buffers other stages hold (collective; {} elsewhere)."""
        self._buffer_table()
        if not any(r != 0 for r in self._buffer_from.values()):
            return {}
        mine = {n: self.ema.layout.buffers[n].detach().cpu().clone()
                for n, r in self._buffer_from.items() if r == self.rank and r != 0}
        parts = gather_to_rank0(mine, self.group)
        return {} if parts is None else {n: t for part in parts for n, t in part.items()}

    def _snapshot_buffers(self, staged: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        local = self.ema.layout.buffers
        return [local[n] if n in local else staged[n] for n, *_ in self._buffer_table()]

    def _stage(self, slot: int, buffers: list[torch.Tensor]) -> Ticket:
        # a rank that owns nothing (a small model on many ranks) stages no data; it still commits with the rest
        if self.stager is None or self.stager.slots_of is not self.writer:
            self.stager = Stager(self.ema.device, self.writer.stage_view, self.config.slots, self._stage_dtype)
            self.stager.slots_of = self.writer
        return self.stager.start(slot, [prof.flat for prof in self.ema.profiles], self.ema.owned_numel,
                                 buffers=buffers)

    def exchange(self, block: bool = False) -> bool:
        """Collect writer results, agree across ranks, commit what every rank finished. Collective.

        A writer process that died is found here on its rank and reported to every rank: with
        ``on_error="raise"`` as one StoreError everywhere, with "warn" logged, its snapshots in
        flight listed as skipped, and a new writer started. Returns True when every rank has a
        free staging slot.
        """
        mine_done, mine_failed, commit_ok, commit_failed, dead = self._collect(block)
        free = bool(self.writer.free) or dead is not None
        everyone = all_gather_object((mine_done, mine_failed, commit_ok, commit_failed, free, dead), self.group)
        failed: dict[str, list[str]] = {}
        for r, (_, f, _, cf, _, _) in enumerate(everyone):
            for snap, e in {**f, **cf}.items():
                failed.setdefault(snap, []).append(f"rank {r}: {e}")
        deaths = [(r, e[5]) for r, e in enumerate(everyone) if e[5] is not None]
        confirmed_ok, confirmed_failed = set(everyone[0][2]), set(everyone[0][3])
        self.unconfirmed = [x for x in self.unconfirmed if x not in confirmed_ok | confirmed_failed]
        self.committed_ids |= confirmed_ok
        if self.rank == 0 and confirmed_failed:  # a commit that failed is not committed: forget it for retention
            self.committed = [(s, t) for s, t in self.committed if s not in confirmed_failed]
        done_everywhere = set.intersection(*(set(d) for d, *_ in everyone))
        keep: list[_Pending] = []
        for p in self.pending:
            if p.snap in failed:
                self.writer.pop_result(p.jid)
                continue
            if p.snap in done_everywhere:
                self.writer.pop_result(p.jid)
                self.unconfirmed.append(p.snap)
                if self.rank == 0:
                    self._commit(p)
                continue
            keep.append(p)
        self.pending = keep
        if failed:
            self.skipped.extend(sorted(failed))
        if deaths:
            detail = "; ".join(f"rank {r}: {e}" for r, e in deaths)
            if self.config.on_error == "raise":
                raise StoreError(f"{detail}. To keep training through writer failures, pass on_error='warn'")
            if self.rank == 0:
                log.error("dist-ema: %s; starting a new writer (on_error='warn', training continues)", detail)
            if dead is not None:
                if self.stager is not None:
                    self.stager.close()
                    self.stager = None
                self.writer.close(timeout=5)
            self.writer = run_and_check(
                lambda: self._new_writer() if dead is not None else self.writer,
                "starting a new snapshot writer", self.group, StoreError,
            )
        if failed:
            detail = "; ".join(f"{s}: {', '.join(es[:3])}" for s, es in sorted(failed.items()))
            if self.config.on_error == "raise":
                raise StoreError(
                    f"snapshot write failed, snapshot(s) not committed: {detail}. To keep training without "
                    f"these snapshots, pass on_error='warn'"
                )
            if self.rank == 0:
                log.error("dist-ema: snapshot(s) NOT committed (on_error='warn', training continues): %s", detail)
        return all(e[4] for e in everyone)

    def _new_writer(self) -> SnapshotWriter:
        cfg = self.config
        spec = WriterSpec(self.rank, self.ema.owned_numel, len(self.ema.profiles), cfg.dtype, cfg.compression,
                          cfg.max_object_bytes)
        # the owner's heartbeat: the writer beats it, however long training goes without update()
        # (the interval is read now, from the module, so that a test can shorten it)
        heartbeat = (Heartbeat(job_key(self.job), json.loads(job_doc(self.job)), float(store_io.HEARTBEAT_SECONDS))
                     if self._owner else None)
        return SnapshotWriter(self.io, spec, mode=cfg.writer, slots=cfg.slots, heartbeat=heartbeat)

    def _collect(self, block: bool):
        """This rank's writer results (local, never raises): done, failed, commits done/failed, death."""
        if self.writer.dead() is None:
            self.submit_staged(block)  # copies finished on the device (all of them when blocking)
        mine_done, mine_failed, commit_ok, commit_failed = [], dict(self._local_errors), [], {}
        self._local_errors = {}
        dead = self.writer.dead()
        if dead is None:
            try:
                self.writer.poll()
                for p in self.pending:
                    if p.snap in mine_failed or p.jid is None:
                        continue
                    res = self.writer.wait(p.jid) if block else self.writer.done(p.jid)
                    if res is None:
                        continue
                    if res["ok"]:
                        mine_done.append(p.snap)
                        self.bytes_written += res["bytes"]
                    else:
                        mine_failed[p.snap] = res["error"]
                for jid, snap in list(self.commit_jobs.items()):
                    res = self.writer.wait(jid) if block else self.writer.done(jid)
                    if res is not None:
                        self.writer.pop_result(jid)
                        del self.commit_jobs[jid]
                        if res["ok"]:
                            commit_ok.append(snap)
                        else:
                            commit_failed[snap] = res["error"]
            except StoreError as e:  # the writer died while we waited
                dead = self.writer.dead() or str(e)
        if dead is not None:  # nothing in flight on this rank will finish
            for p in self.pending:
                if p.snap not in mine_done:
                    mine_failed.setdefault(p.snap, dead)
            for jid, snap in list(self.commit_jobs.items()):
                commit_failed[snap] = dead
                del self.commit_jobs[jid]
        return mine_done, mine_failed, commit_ok, commit_failed, dead

    def _commit(self, p: _Pending) -> None:
        times = [t for _, t in self.committed] + [p.t]
        snaps = [s for s, _ in self.committed] + [p.snap]
        remove = []
        if self.config.keep is not None:
            drop = set(thin_evenly(times, self.config.keep))
            remove = [snaps[i] for i in sorted(drop)]
            self.committed = [(s, t) for i, (s, t) in enumerate(zip(snaps, times)) if i not in drop]
        else:
            self.committed.append((p.snap, p.t))
        jid = self.writer.submit({"kind": "commit", "snap": p.snap, "meta": p.meta, "remove": remove,
                                  "owner": self.job})
        self.commit_jobs[jid] = p.snap

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
        if self.pending or self.unconfirmed:  # the same on every rank
            self.exchange()

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
                    and self.last_step != clock.step and self.last_t != clock.t_updated):
                before = self.last_step
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
            self._release_owner()

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
        self._release_owner()

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
        lost = [p.snap for p in self.pending] + list(self.unconfirmed)
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

    # ------------------------------------------------------------------ resume

    @torch.no_grad()
    def _resume_from_store(self) -> dict | None:
        """Load the newest committed snapshot into the EMA (any world size). Collective. Returns its meta."""
        ema = self.ema

        def load() -> dict | None:
            reader = SnapshotStore(self.io.url, io=self.io)
            snaps = reader.snapshots()
            if not snaps:
                return None
            snap = snaps[-1]
            src = reader.layout(snap)
            diff = param_mismatch({f: s for f, s, _ in self.layout.params}, {f: s for f, s, _ in src.params})
            if diff is not None:
                raise StoreError(f"store {self.io.url} holds snapshots of a different model (snapshot {snap.id}): "
                                 f"{diff}; use a new store URL for a new model")
            if snap.unit != ema.config.unit:
                raise StoreError(f"snapshot {snap.id} counts time in {snap.unit}, this EMA in {ema.config.unit}; "
                                 f"pass the same batch_size as the run that wrote it")
            order = []
            for prof in ema.profiles:
                try:
                    order.append(reader.profile_index(snap, gamma=prof.gamma))
                except ValueError:
                    raise StoreError(
                        f"snapshot {snap.id} tracks sigma_rels {list(snap.sigma_rels)}, this EMA "
                        f"{list(ema.sigma_rels)}; resume with the same profiles"
                    ) from None
            for prof, k in zip(ema.profiles, order):
                prof.flat.copy_(torch.from_numpy(read_pieces(reader, snap, k, ema.pieces, ema.offsets)))
            return snap.meta

        meta = run_and_check(load, f"resuming from {self.io.url}", self.group, StoreError)
        if meta is None:
            log.info("dist-ema: no committed snapshot in %s; starting fresh", self.io.url)
            return None
        # the tracker owns the clock: it restores it from this metadata (PostHocEMA.__init__)
        self.last_step, self.last_t = int(meta["step"]), float(meta["t"])
        if self.rank == 0:
            log.info("dist-ema: resumed EMA from snapshot step %d (t=%g %s) of %s", self.last_step, self.last_t,
                     meta["unit"], self.io.url)
        return meta

    # ------------------------------------------------------------------ restarts from a checkpoint

    def restored(self, step: int, t: float) -> list[int]:
        """The EMA was restored to ``step`` from a training checkpoint (collective). Returns retired steps.

        Committed snapshots after ``step`` belong to the abandoned trajectory: they are moved
        to ``retired/<job>/`` (kept, listed by ``dist-ema ls``, never used by synthesis), so the
        new trajectory never writes into them and synthesis never mixes the two.
        """
        self.flush()  # what this job already took is committed first (it may be among the retired)
        newer = None
        if self.rank == 0:
            newer = sorted((snap for snap, _ in self.committed if step_of(snap) > step),
                           key=step_of)
        newer = all_gather_object(newer, self.group)[0]
        if newer:
            reason = f"the EMA was restored to step {step} from a training checkpoint"
            where = run_and_check(
                lambda: retire_snapshots(self.io, newer, self.job, step, reason) if self.rank == 0 else None,
                f"retiring snapshots {newer} of {self.io.url}", self.group, StoreError,
            )
            self.committed_ids -= set(newer)
            if self.rank == 0:
                self.committed = [(snap, t0) for snap, t0 in self.committed if snap not in set(newer)]
                log.warning("dist-ema: restored to step %d from a training checkpoint: the %d snapshot(s) after it "
                            "(steps %s) belong to the abandoned run; moved to %s/%s (kept, never used by "
                            "synthesis)", step, len(newer), [step_of(x) for x in newer], self.io.url, where)
        self.last_step, self.last_t = step, t
        return [step_of(x) for x in newer or []]

    # ------------------------------------------------------------------ synthesis in training

    def committed_snapshots(self):
        """Committed snapshots, listed on rank 0 and broadcast so every rank uses the same set. Collective."""

        reader = SnapshotStore(self.io.url, io=self.io)
        listed = None
        if self.rank == 0:
            listed = run_and_check(reader.snapshots, "listing snapshots", self.group, StoreError)
        else:
            run_and_check(lambda: None, "listing snapshots", self.group, StoreError)
        # rank 0 owns retention: snapshots it has dropped (maybe not deleted yet) are never planned for
        kept = {snap for snap, _ in self.committed}
        ids = [s.id for s in listed if s.id in kept] if listed is not None else None
        ids = broadcast_object(ids, 0, self.group)

        def mine() -> list:
            snaps = {s.id: s for s in (listed if listed is not None else reader.snapshots())}
            missing = [i for i in ids if i not in snaps]
            if missing:
                raise StoreError(f"snapshots {missing[:3]} disappeared from {self.io.url} while reading")
            return [snaps[i] for i in ids]

        # every rank learns if any rank could not see the list (no rank left alone in a later collective)
        return reader, run_and_check(mine, "reading the snapshot list", self.group, StoreError)


# Managers not closed yet: at interpreter exit each commits (one process) or names what is lost.
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    for m in list(_LIVE):
        m._at_exit()
