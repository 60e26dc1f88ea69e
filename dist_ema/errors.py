"""The errors dist-ema raises: one base class, so one ``except DistEMAError`` catches them on every rank.

    DistEMAError
    ├── StoreError (also a RuntimeError)         a store operation failed or its content is unusable
    │   └── ChecksumError, StoreUnreachableError, TruncatedObjectError
    ├── ConfigError (also a ValueError)          a bad argument, option or config file
    ├── TargetError (also a ValueError)          a synthesis target the snapshots cannot give
    ├── LayoutError (also a ValueError)          a parameter table or shard pieces that cannot be stored
    ├── OutputExistsError (a FileExistsError)    a synthesis output that may not be written
    ├── CheckpointError (a FileNotFoundError)    a training checkpoint without the EMA state saved with it
    ├── UsageError (also a TypeError)            an object used in a way it does not support
    ├── StateDictError (also a ValueError)       an EMA state dict that does not fit this EMA
    ├── UnknownParameterError (also a KeyError)  a parameter name a snapshot does not hold
    ├── UnsupportedEngineError (a RuntimeError)  a model/engine no adapter understands
    │   └── ShardCoverageError
    ├── ModelChangedError (a RuntimeError)       the tracked parameters changed after the EMA was made
    └── CollectiveError                          a step that failed on some ranks, raised on all

Each is also the builtin error the same failure raised before it had its own class, so an
``except ValueError`` (``FileExistsError``, ``KeyError``, ...) written for one keeps working.
Checks of dist-ema's own invariants (a failure there is a bug of dist-ema) raise builtins;
tests/test_error_policy.py lists them.

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


class ConfigError(DistEMAError, ValueError):
    """A setting (keyword argument, config file entry or flag) or another argument that cannot be used;
    the message names the field and the fix."""


class TargetError(DistEMAError, ValueError):
    """A synthesis target the snapshots cannot give: a time before the first or after the last
    snapshot, a step or profile the store does not hold, or a singular solve."""


class LayoutError(DistEMAError, ValueError):
    """A parameter table or shard pieces that cannot be stored or read: an invalid parameter name,
    pieces that do not cover every parameter exactly once, a region outside the layout."""


class OutputExistsError(DistEMAError, FileExistsError):
    """A synthesis output that may not be written: a file, a folder holding what no synthesis wrote,
    a complete synthesis without ``overwrite``, or another job writing it."""


class CheckpointError(DistEMAError, FileNotFoundError):
    """A training checkpoint without the EMA state dist-ema saves with it."""


class UsageError(DistEMAError, TypeError):
    """An object of dist-ema used in a way it does not support (e.g. running a ``ModelParts``)."""


class StateDictError(DistEMAError, ValueError):
    """An EMA state dict (DCP or ``torch.save``) that does not fit this EMA: other profiles, another
    sharding without DCP, a newer clock than the EMA's, or an entry that is not a dist-ema EMA shard."""
