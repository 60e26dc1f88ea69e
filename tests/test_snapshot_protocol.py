"""The snapshot protocol without processes: agree() over rank reports, and the ledger it drives.

Each case is a table of what every rank's writer reported; the expected decision is written out
by hand (what every rank must then do), so a change in the rules shows here first.
"""

from __future__ import annotations

import pytest

from dist_ema.snapshot.ledger import SnapshotLedger, State
from dist_ema.snapshot.protocol import Decision, LocalReport, agree


def R(written=(), failed=None, done=(), commit_failed=None, free=True, dead=None) -> LocalReport:
    return LocalReport(tuple(written), dict(failed or {}), tuple(done), dict(commit_failed or {}), free, dead)


CASES = {
    "all written": ([R(["s1"]), R(["s1"]), R(["s1"])], dict(commit={"s1"}, failed={})),
    "one rank still writing": ([R(["s1", "s2"]), R(["s1"])], dict(commit={"s1"}, failed={})),
    "a write fails on one rank": ([R(["s1"]), R(failed={"s1": "OSError: disk full"})],
                                  dict(commit=set(), failed={"s1": ["rank 1: OSError: disk full"]})),
    "a writer dies on one rank": ([R(["s1"]), R(failed={"s2": "died"}, free=True, dead="died")],
                                  dict(commit=set(), failed={"s2": ["rank 1: died"]}, deaths=((1, "died"),))),
    "rank 0 confirms late": ([R(done=["s0"]), R()], dict(commit=set(), failed={}, confirmed={"s0"})),
    "a commit fails": ([R(commit_failed={"s0": "StoreError: fenced"}), R()],
                       dict(commit=set(), failed={"s0": ["rank 0: StoreError: fenced"]}, confirm_failed={"s0"})),
    "a busy slot anywhere": ([R(free=True), R(free=False)], dict(commit=set(), failed={}, all_slots_free=False)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_agree(name):
    reports, want = CASES[name]
    got = agree(reports)
    assert got.commit == frozenset(want["commit"])
    assert got.failed == want["failed"]
    assert got.deaths == want.get("deaths", ())
    assert got.confirmed == frozenset(want.get("confirmed", ()))
    assert got.confirm_failed == frozenset(want.get("confirm_failed", ()))
    assert got.all_slots_free == want.get("all_slots_free", True)


def test_decisions_are_the_same_whatever_order_the_snapshots_were_reported_in():
    a = agree([R(["s2", "s1"]), R(["s1", "s2"], failed={"s3": "x"})])
    b = agree([R(["s1", "s2"]), R(["s2", "s1"], failed={"s3": "x"})])
    assert a == b and a.commit == {"s1", "s2"}


def _take(ledger: SnapshotLedger, snap: str, t: float) -> None:
    ledger.taken(int(snap[1:]), t)
    rec = ledger.staged(snap, t, {"step": int(snap[1:])}, ticket=object())
    ledger.writing(rec, jid=int(snap[1:]))


def test_ledger_lifecycle_commit_confirm_and_retention():
    ledger = SnapshotLedger([("s1", 1.0)], keep=2)
    assert ledger.committed_ids == {"s1"}
    _take(ledger, "s2", 2.0)
    _take(ledger, "s3", 3.0)
    assert [r.state for r in ledger.in_flight] == [State.WRITING, State.WRITING] and ledger.busy()
    to_commit, settled = ledger.apply(Decision(commit=frozenset({"s2"})))
    assert [r.snap for r in to_commit] == ["s2"] and [r.snap for r in settled] == ["s2"]
    assert ledger.retain(to_commit[0]) == []  # 2 kept: s1, s2
    assert [r.snap for r in ledger.unconfirmed] == ["s2"] and "s2" not in ledger.committed_ids
    to_commit, _ = ledger.apply(Decision(commit=frozenset({"s3"}), confirmed=frozenset({"s2"})))
    assert "s2" in ledger.committed_ids and [r.snap for r in ledger.unconfirmed] == ["s3"]
    # keep=2 over s1 (t=1), s2 (t=2), s3 (t=3): retention drops one of the older ones, never the newest
    dropped = ledger.retain(to_commit[0])
    assert len(dropped) == 1 and dropped[0] in ("s1", "s2")
    assert len(ledger.committed) == 2 and ledger.committed[-1] == ("s3", 3.0)


def test_ledger_failed_write_and_failed_commit_are_forgotten():
    ledger = SnapshotLedger([], keep=None)
    _take(ledger, "s1", 1.0)
    _take(ledger, "s2", 2.0)
    to_commit, settled = ledger.apply(Decision(commit=frozenset({"s2"}), failed={"s1": ["rank 1: x"]}))
    assert [r.snap for r in settled] == ["s1", "s2"] and [r.snap for r in to_commit] == ["s2"]
    assert ledger.skipped == ["s1"] and not ledger.in_flight
    ledger.retain(to_commit[0])
    ledger.apply(Decision(failed={"s2": ["rank 0: fenced"]}, confirm_failed=frozenset({"s2"})))
    assert ledger.committed == [] and "s2" not in ledger.committed_ids and not ledger.busy()


def test_ledger_retire_and_taken():
    ledger = SnapshotLedger([("s1", 1.0), ("s5", 5.0), ("s9", 9.0)], keep=None)
    assert ledger.is_taken(5, 0.0) is False
    ledger.taken(9, 9.0)
    assert ledger.is_taken(9, 3.0) and ledger.is_taken(3, 9.0)
    ledger.retire(["s5", "s9"])
    assert ledger.committed == [("s1", 1.0)] and ledger.committed_ids == {"s1"}
