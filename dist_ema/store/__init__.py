"""The Zarr snapshot store: layout, commit protocol, background writer, reader. NumPy + zarr, no torch.

See ``layout.py`` for the object layout and who writes what.
"""

from dist_ema.store.fs import StoreError, StoreIO
from dist_ema.store.layout import FORMAT_VERSION, STORAGE_DTYPES, Layout
from dist_ema.store.reader import Snapshot, SnapshotStore, open_store
from dist_ema.store.retention import thin_evenly

__all__ = [
    "FORMAT_VERSION",
    "STORAGE_DTYPES",
    "Layout",
    "Snapshot",
    "SnapshotStore",
    "StoreError",
    "StoreIO",
    "open_store",
    "thin_evenly",
]
