"""The snapshot path: a typed saver (plan, exchange, stage, submit; report, gather, agree, apply, commit).

    protocol.py  LocalReport, Decision, agree(): how the ranks agree (pure)
    ledger.py    SnapshotLedger: each snapshot's life and retention (the same on every rank)
    session.py   StoreSession: the job id, the store claim, its heartbeat record, the layout files
    staging.py   Stager: device -> staging slot copies (a side stream on GPUs)
    manager.py   SnapshotManager: the named phases over the pieces above

The writer's jobs and results are in store/jobs.py, its process in store/writer.py.
"""

from dist_ema.snapshot.manager import SnapshotManager

__all__ = ["SnapshotManager"]
