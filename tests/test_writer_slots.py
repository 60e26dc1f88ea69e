"""The writer's staging slots: a job whose result is dropped while it still runs (its snapshot failed on
another rank) gives its slot back when it finishes; no slot is ever lost, so training never finds every
slot busy with nothing in flight."""

from __future__ import annotations

import pytest

from dist_ema.store.fs import StoreIO
from dist_ema.store.jobs import DataJob
from dist_ema.store.writer import SnapshotWriter, WriterSpec


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_a_result_dropped_while_its_job_runs_gives_the_slot_back(tmp_path, mode):
    numel = 8 << 20  # 32 MiB per profile: the write takes far longer than the two calls after submit
    w = SnapshotWriter(StoreIO(str(tmp_path / "s")), WriterSpec(0, numel, 2, "float32", None, 1 << 20),
                       mode=mode, slots=2)
    try:
        for round_ in range(3):  # each round would lose both slots if a dropped result kept its slot
            jobs = []
            for k in range(2):
                slot = w.acquire_slot()
                assert slot is not None, f"round {round_}: no free slot and nothing in flight"
                jobs.append(w.submit(DataJob(f"step-{round_}{k}", f"snapshots/step-{round_}{k}/j"), slot))
            for jid in jobs:  # the snapshot failed elsewhere: this rank forgets it, its write still runs
                w.pop_result(jid)
        # the next round's acquire_slot waited for those writes and got their slots back
    finally:
        w.close()
