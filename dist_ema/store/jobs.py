"""What the snapshot writer is asked to do and what it answers: typed, frozen, picklable.

The training side hands the writer (store/writer.py, a process, a thread or inline) jobs;
each comes back as one :class:`JobResult`, in the manner of torch.distributed.checkpoint's
``WriteResult``. Pure data: no I/O, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CommitJob", "DataJob", "Envelope", "Job", "JobResult"]


@dataclass(frozen=True)
class DataJob:
    """Write this rank's staged data of one snapshot (and, on rank 0, its packed buffers).

    ``prefix`` is the job's own attempt folder of the snapshot: a data job writes nothing else.
    The data itself is in the staging slot the job was submitted with.
    """

    snap: str
    prefix: str
    buffers: bytes | None = None


@dataclass(frozen=True)
class CommitJob:
    """Rank 0: commit a snapshot every rank has written (metadata, then the marker, written last).

    ``remove``: committed snapshots that retention drops once this one is committed. ``owner``:
    the job id the store must still be owned by (fencing: a job that lost the store commits nothing).
    """

    snap: str
    meta: dict
    remove: tuple[str, ...] = ()
    owner: str | None = None


Job = DataJob | CommitJob


@dataclass(frozen=True)
class Envelope:
    """A job as sent to the writer: its id and the staging slot it reads (data jobs)."""

    id: int
    job: Job
    slot: int | None = None


@dataclass(frozen=True)
class JobResult:
    """The outcome of one job: ``ok`` with the bytes written, or the error (and a short traceback)."""

    id: int
    ok: bool
    error: str | None = None
    bytes: int = 0
    seconds: float = 0.0
    trace: str | None = None
