"""How the ranks agree on their snapshots: one frozen report per rank, one pure decision.

Between snapshots (and at each one) every rank reports what its writer finished; the reports
are gathered on every rank and :func:`agree` turns them into the same :class:`Decision`
everywhere, in the manner of torch.distributed.checkpoint's local and global plans. Pure: no
I/O, no torch, no process group, so every cross-rank case (a write fails on one rank, a
writer dies on one rank, a commit is confirmed a round late) is a unit test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Decision", "LocalReport", "agree"]


@dataclass(frozen=True)
class LocalReport:
    """One rank's writer results since the last exchange.

    Attributes:
        written: snapshots whose data this rank finished writing.
        write_failed: snapshot -> error, for data this rank could not write (or staged and lost).
        commits_done / commits_failed: rank 0 only: commits confirmed, or failed with their error.
        slot_free: this rank has a free staging slot (or a dead writer: nothing to wait for).
        writer_dead: why this rank's writer process died, or None.
    """

    written: tuple[str, ...] = ()
    write_failed: dict[str, str] = field(default_factory=dict)
    commits_done: tuple[str, ...] = ()
    commits_failed: dict[str, str] = field(default_factory=dict)
    slot_free: bool = True
    writer_dead: str | None = None


@dataclass(frozen=True)
class Decision:
    """What every rank does after an exchange (the same on every rank).

    Attributes:
        commit: snapshots written on every rank and failed on none: rank 0 commits them.
        failed: snapshot -> ["rank r: error", ...]: not committed, given up on every rank.
        deaths: (rank, why) of every writer that died.
        confirmed: commits rank 0 confirmed; confirm_failed: commits that failed (not committed).
        all_slots_free: every rank can stage a snapshot now without waiting.
    """

    commit: frozenset[str] = frozenset()
    failed: dict[str, list[str]] = field(default_factory=dict)
    deaths: tuple[tuple[int, str], ...] = ()
    confirmed: frozenset[str] = frozenset()
    confirm_failed: frozenset[str] = frozenset()
    all_slots_free: bool = True

    def failure_text(self) -> str:
        """The failed snapshots and their ranks' errors, one clause each."""
        return "; ".join(f"{s}: {', '.join(es[:3])}" for s, es in sorted(self.failed.items()))

    def death_text(self) -> str:
        return "; ".join(f"rank {r}: {e}" for r, e in self.deaths)


def agree(reports: Sequence[LocalReport]) -> Decision:
    """The decision of all ranks from their reports (indexed by rank; rank 0 commits)."""
    if not reports:
        return Decision()
    failed: dict[str, list[str]] = {}
    for r, rep in enumerate(reports):
        for snap, err in {**rep.write_failed, **rep.commits_failed}.items():
            failed.setdefault(snap, []).append(f"rank {r}: {err}")
    written = set.intersection(*(set(rep.written) for rep in reports))
    return Decision(
        commit=frozenset(written - set(failed)),
        failed=failed,
        deaths=tuple((r, rep.writer_dead) for r, rep in enumerate(reports) if rep.writer_dead is not None),
        confirmed=frozenset(reports[0].commits_done),
        confirm_failed=frozenset(reports[0].commits_failed),
        all_slots_free=all(rep.slot_free for rep in reports),
    )
