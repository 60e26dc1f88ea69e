"""One job's hold on a store: the job id, the ownership claim, its heartbeat record, the layout files.

:meth:`StoreSession.open` (collective) makes the store if needed, claims it on rank 0 (create-only
``owner.json``: a second job is refused, a dead owner taken over only when asked), removes the
crash leftovers of dead jobs, learns the committed snapshots and writes every rank's layout file;
:meth:`StoreSession.release` gives the claim up (rank 0, never raises). The heartbeat itself is
beaten by the writer (store/writer.py) on its own clock; the session only says what to beat.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass

from dist_ema.collective import all_gather_object, broadcast_object, run_and_check
from dist_ema.sharding.select import refuse_other_choice
from dist_ema.store import io as store_io
from dist_ema.store.format import job_key
from dist_ema.store.fs import StoreError, StoreIO, redact
from dist_ema.store.io import (
    claim_store,
    ensure_store,
    job_doc,
    read_commits,
    release_store,
    remove_leftovers,
    write_layout,
)
from dist_ema.store.layout import Layout, param_mismatch
from dist_ema.store.reader import Snapshot, SnapshotStore
from dist_ema.store.writer import Heartbeat

__all__ = ["ResumePoint", "StoreSession"]

log = logging.getLogger("dist_ema")


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed EMA continues from: the snapshot, and each of the EMA's profiles' array in it."""

    reader: SnapshotStore
    snap: Snapshot
    profiles: tuple[int, ...]


class StoreSession:
    """This job's claim on the store at ``io`` (every rank has one; rank 0 holds the claim).

    Attributes:
        job: the job id (``j<UTC time>-<random>``), the name of its attempt folders and record;
            known from the start, so a refused start still releases its own claim.
        owner: True on rank 0 while it holds the store's ownership record.
        took_over: the owner record this job replaced (``resume`` of a dead owner), or None.
        committed: the store's committed snapshots at the start, as (id, t), on every rank.
    """

    def __init__(self, io: StoreIO, group, rank: int, storage_options: dict | None = None) -> None:
        self.io, self.group, self.rank = io, group, rank
        self.where = f"store {io.url} (storage_options={redact(storage_options)})"
        self.job = f"j{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"
        self.owner = False
        self.took_over = None
        self.committed: list[tuple[str, float]] = []

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def open(self, layout: Layout, resume: bool | str) -> None:
        """Claim the store and write this rank's layout file (collective). Releases the claim on failure."""
        try:
            run_and_check(lambda: self._claim(resume) if self.rank == 0 else None, f"opening {self.where}",
                          self.group, StoreError)
            # the job id and the committed snapshots, the same on every rank (so every rank refuses a
            # committed step the same way)
            self.job, self.committed = all_gather_object((self.job, self.committed) if self.rank == 0 else None,
                                                         self.group)[0]
            # every rank writes its own layout file: permanent storage problems show up at start-up
            run_and_check(lambda: write_layout(self.io, layout, self.rank), f"writing the layout to {self.where}",
                          self.group, StoreError)
        except BaseException:
            self.release()
            raise

    def _claim(self, resume: bool | str) -> None:
        ensure_store(self.io, create=True)
        self.took_over = claim_store(self.io, self.job, resume)  # before anything else is written
        self.owner = True
        done, torn = read_commits(self.io)
        # crash leftovers are removed; the uncommitted attempts of a job that may still run are kept
        removed, kept = remove_leftovers(self.io, done, torn, self.took_over)
        for key in removed:
            log.warning("dist-ema: removing uncommitted data %s from %s", key, self.io.url)
        for key, why in kept.items():
            log.warning("dist-ema: keeping uncommitted attempt %s in %s: %s; a later start removes it once "
                        "that job has stopped", key, self.io.url, why)
        self.committed = [(c.snap, float(c.meta["t"])) for c in done]
        if done and not resume:
            raise StoreError(
                f"{self.io.url} already holds {len(done)} committed snapshot(s) (newest: step "
                f"{done[-1].meta['step']}); pass resume=True to continue that run, or use a new store URL"
            )

    def heartbeat(self) -> Heartbeat | None:
        """What the writer beats while this job owns the store (rank 0), on its own clock; None elsewhere.

        The interval is read now, from store.io, so that a test can shorten it.
        """
        if not self.owner:
            return None
        return Heartbeat(job_key(self.job), json.loads(job_doc(self.job)), float(store_io.HEARTBEAT_SECONDS))

    def release(self) -> None:
        """Rank 0: give up the store (close, or a job that stops with an error). Never raises."""
        if not self.owner:
            return
        self.owner = False
        try:
            release_store(self.io, self.job)
        except Exception as e:  # noqa: BLE001 - reported; the next job can still take a stale owner over
            log.warning("dist-ema: could not release the ownership of %s: %s", self.io.url, e)

    # ------------------------------------------------------------------ reading the store

    def reader(self) -> SnapshotStore:
        return SnapshotStore(self.io.url, io=self.io)

    def resume_point(self, layout: Layout, unit: str, profiles, sigma_rels,
                     choice: dict | None = None) -> ResumePoint | None:
        """The newest committed snapshot, checked against the EMA (model, time unit, profiles, the params=
        ``choice`` it records) on every rank (collective); None when the store has none."""

        def find() -> ResumePoint | None:
            reader = self.reader()
            snaps = reader.snapshots()
            if not snaps:
                return None
            snap = snaps[-1]
            src = reader.layout(snap)
            refuse_other_choice(self.io.url, snap.id, snap.meta, choice, {f: s for f, s, _ in layout.params},
                                {f: s for f, s, _ in src.params})
            diff = param_mismatch({f: s for f, s, _ in layout.params}, {f: s for f, s, _ in src.params})
            if diff is not None:
                raise StoreError(f"store {self.io.url} holds snapshots of a different model (snapshot {snap.id}): "
                                 f"{diff}; use a new store URL for a new model")
            if snap.unit != unit:
                raise StoreError(f"snapshot {snap.id} counts time in {snap.unit}, this EMA in {unit}; "
                                 f"pass the same batch_size as the run that wrote it")
            order = []
            for prof in profiles:
                try:
                    order.append(reader.profile_index(snap, gamma=prof.gamma))
                except ValueError:
                    raise StoreError(
                        f"snapshot {snap.id} tracks sigma_rels {list(snap.sigma_rels)}, this EMA "
                        f"{list(sigma_rels)}; resume with the same profiles"
                    ) from None
            return ResumePoint(reader, snap, tuple(order))

        point = run_and_check(find, f"resuming from {self.io.url}", self.group, StoreError)
        if point is None:
            log.info("dist-ema: no committed snapshot in %s; starting fresh", self.io.url)
        return point

    def committed_snapshots(self, kept: set[str]):
        """(reader, the committed snapshots in ``kept``), listed on rank 0 and broadcast so every rank uses
        the same set. Collective. ``kept``: what retention keeps (dropped ones may not be deleted yet)."""
        reader = self.reader()
        listed = None
        if self.rank == 0:
            listed = run_and_check(reader.snapshots, "listing snapshots", self.group, StoreError)
        else:
            run_and_check(lambda: None, "listing snapshots", self.group, StoreError)
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
