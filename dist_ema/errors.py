"""The errors dist-ema raises: one base class, so one ``except DistEMAError`` catches them on every rank.

    DistEMAError
    ├── StoreError (also a RuntimeError)         a store operation failed or its content is unusable
    │   └── ChecksumError, StoreUnreachableError, TruncatedObjectError
    ├── ConfigError (also a ValueError)          a bad option or config file
    ├── UnsupportedEngineError (a RuntimeError)  a model/engine no adapter understands
    ├── ModelChangedError (a RuntimeError)       the tracked parameters changed after the EMA was made
    └── CollectiveError                          a step that failed on some ranks, raised on all

An error raised by a collective step (start-up, a snapshot exchange, synthesis) is the same
type on every rank and keeps each rank's own failure in ``failures`` ({rank: "Type: message"}).
"""

from __future__ import annotations


class DistEMAError(Exception):
    """Base class of every error dist-ema raises on purpose.

    ``failures``: for an error of a collective step, each failed rank's error ({rank: text});
    empty for a local error.
    """

    failures: dict[int, str]

    def __init__(self, *args: object, failures: dict[int, str] | None = None) -> None:
        super().__init__(*args)
        self.failures = dict(failures or {})


class CollectiveError(DistEMAError, RuntimeError):
    """A collective step failed on some ranks; raised on every rank (``failures`` says where and why)."""
