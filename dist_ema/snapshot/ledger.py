"""The life of every snapshot of one job, in one place, the same on every rank.

A snapshot is taken (its step and time remembered, so none is taken twice), then

    STAGED (copied into a staging slot) -> WRITING (a data job in the writer)
        -> COMMITTING (written on every rank; rank 0's commit job queued) -> COMMITTED
    or FAILED (a write or a commit failed somewhere), SKIPPED (the writer was behind and
    when_behind="skip"), RETIRED (after a restore from an older training checkpoint).

The ledger changes only through local writer results and :meth:`SnapshotLedger.apply` of a
:class:`~dist_ema.snapshot.protocol.Decision` (the same on every rank), so every rank's ledger
agrees; retention (``keep``) is computed from it on every rank, and rank 0 executes it.
No I/O, no collectives.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from dist_ema.snapshot.protocol import Decision
from dist_ema.store.retention import thin_evenly

__all__ = ["Record", "SnapshotLedger", "State"]


class State(enum.Enum):
    STAGED = "staged"
    WRITING = "writing"
    COMMITTING = "committing"
    COMMITTED = "committed"
    FAILED = "failed"
    SKIPPED = "skipped"
    RETIRED = "retired"


@dataclass
class Record:
    """One snapshot of this job: its metadata, where it is, and the writer job or staging ticket it waits on."""

    snap: str
    t: float
    meta: dict = field(repr=False, default_factory=dict)
    state: State = State.STAGED
    ticket: object | None = field(default=None, repr=False)  # STAGED: the device copy in flight
    jid: int | None = None  # WRITING: the data job's id (-1: the writer refused it)
    error: str | None = None


class SnapshotLedger:
    """Every snapshot this job took, and the store's committed ones it keeps (retention).

    Attributes:
        committed: committed snapshots kept in the store, oldest first, as (id, t).
        last_step, last_t: the step and EMA time of the newest snapshot taken (never two at one t).
        skipped: snapshots given up: skipped as behind, or failed (with on_error="warn").
        errors: snapshot -> error raised on this rank outside an exchange, reported at the next one.
    """

    def __init__(self, committed: list[tuple[str, float]], keep: int | None) -> None:
        self.committed = list(committed)
        self.keep = keep
        self._ids = {s for s, _ in committed}  # every snapshot committed in the store (retained or not)
        self.records: dict[str, Record] = {}
        self.last_step: int | None = None
        self.last_t: float | None = None
        self.skipped: list[str] = []
        self.errors: dict[str, str] = {}
        self.commit_jobs: dict[int, str] = {}  # rank 0: commit job id -> snapshot

    # ------------------------------------------------------------------ queries

    @property
    def committed_ids(self) -> set[str]:
        """Snapshots committed in the store by any job (confirmed), also those retention removed since."""
        return set(self._ids)

    def in_state(self, *states: State) -> list[Record]:
        return [r for r in self.records.values() if r.state in states]

    @property
    def in_flight(self) -> list[Record]:
        """Snapshots staged or being written (not yet written everywhere)."""
        return self.in_state(State.STAGED, State.WRITING)

    @property
    def unconfirmed(self) -> list[Record]:
        """Snapshots whose commit was queued by rank 0 but not yet confirmed at an exchange."""
        return self.in_state(State.COMMITTING)

    def busy(self) -> bool:
        """Anything to exchange about (the same on every rank)."""
        return bool(self.in_flight or self.unconfirmed)

    def is_taken(self, step: int, t: float) -> bool:
        return self.last_step == step or self.last_t == t

    # ------------------------------------------------------------------ changes

    def taken(self, step: int, t: float) -> None:
        self.last_step, self.last_t = step, t

    def skip(self, snap: str) -> None:
        self.skipped.append(snap)

    def staged(self, snap: str, t: float, meta: dict, ticket: object) -> Record:
        rec = self.records[snap] = Record(snap, t, meta, State.STAGED, ticket)
        return rec

    def writing(self, rec: Record, jid: int) -> None:
        rec.state, rec.jid, rec.ticket = State.WRITING, jid, None

    def apply(self, decision: Decision) -> tuple[list[Record], list[Record]]:
        """Apply an agreed decision. Returns (the records to commit now: written on every rank, in the
        order taken; every record that stopped being in flight, whose writer results can be dropped)."""
        for rec in self.unconfirmed:
            if rec.snap in decision.confirmed:
                rec.state = State.COMMITTED
                self._ids.add(rec.snap)
            elif rec.snap in decision.confirm_failed:  # a commit that failed is not committed: forget it
                rec.state = State.FAILED
                self.committed = [(s, t) for s, t in self.committed if s != rec.snap]
        self._ids |= set(decision.confirmed)
        to_commit, settled = [], []
        for rec in self.in_flight:
            if rec.snap in decision.failed:
                rec.state = State.FAILED
                settled.append(rec)
            elif rec.snap in decision.commit:
                rec.state = State.COMMITTING
                to_commit.append(rec)
                settled.append(rec)
        self.skipped.extend(sorted(decision.failed))
        self._forget_settled()
        return to_commit, settled

    def retain(self, rec: Record) -> list[str]:
        """``rec`` is committed now: keep it, and return the committed snapshots retention drops (``keep``)."""
        times = [t for _, t in self.committed] + [rec.t]
        snaps = [s for s, _ in self.committed] + [rec.snap]
        if self.keep is None:
            self.committed.append((rec.snap, rec.t))
            return []
        drop = set(thin_evenly(times, self.keep))
        self.committed = [(s, t) for i, (s, t) in enumerate(zip(snaps, times)) if i not in drop]
        return [snaps[i] for i in sorted(drop)]

    def retire(self, snaps: list[str]) -> None:
        """Committed snapshots moved out of the store's trajectory (a restore from an older checkpoint)."""
        gone = set(snaps)
        self.committed = [(s, t) for s, t in self.committed if s not in gone]
        self._ids -= gone
        for rec in self.records.values():
            if rec.snap in gone:
                rec.state = State.RETIRED
        self._forget_settled()

    def _forget_settled(self) -> None:
        """Drop records that reached an end state (committed ones stay in ``committed``)."""
        for snap, rec in list(self.records.items()):
            if rec.state in (State.COMMITTED, State.FAILED, State.RETIRED):
                del self.records[snap]
