"""Former home of the snapshot manager: see :mod:`dist_ema.snapshot`."""

from dist_ema.config import SnapshotConfig
from dist_ema.snapshot.manager import SnapshotManager

__all__ = ["SnapshotConfig", "SnapshotManager"]


def read_pieces(reader, snap, profile: int, pieces, offsets):
    """This rank's pieces of one profile of a snapshot (any layout), as one flat float32 array."""
    return reader.read_pieces(snap, profile, pieces, offsets)[0]
