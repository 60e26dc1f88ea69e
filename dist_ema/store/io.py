"""Store I/O: write a rank's snapshot data, commit a snapshot, clean up, delete (NumPy + zarr, no torch).

These functions run in the background writer process (or inline in ``sync`` mode) and
in synthesis. Each writes only objects that belong to its caller (see layout.py for
who writes what), so no two ranks ever write the same object.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from dist_ema.store.fs import StoreError, StoreIO, retry
from dist_ema.store.layout import (
    FORMAT_VERSION,
    STORAGE_DTYPES,
    STORE_MARKER,
    Layout,
    chunk_elems,
    np_dtype,
)

__all__ = [
    "array_key",
    "commit_snapshot",
    "ensure_store",
    "list_snapshot_dirs",
    "open_rank_array",
    "remove_snapshot",
    "write_array",
    "write_layout",
]

log = logging.getLogger("dist_ema")

COMMIT = "commit.json"
COMPRESSIONS = (None, "blosc-lz4", "zstd")
_NAN_FILL = {"float32": float("nan"), "float16": float("nan"), "bfloat16": 0x7FC0}


def array_key(snap: str, rank: int, profile: int) -> str:
    return f"snapshots/{snap}/r{rank:05d}/p{profile}"


def buffer_key(snap: str, i: int) -> str:
    return f"snapshots/{snap}/buffers/b{i}"


@lru_cache(maxsize=256)
def _array_template(numel: int, dtype: str, chunk: int, compression: str | None):
    """zarr metadata (and its zarr.json bytes) of a 1-d array, made in memory without touching the store."""
    import zarr
    import zarr.storage as zs
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}; got {compression!r}")
    comp = {None: [], "blosc-lz4": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
            "zstd": [ZstdCodec(level=3)]}[compression]
    mem = zs.MemoryStore()
    arr = zarr.create_array(
        mem, name="a", shape=(numel,), chunks=(chunk,), dtype=np_dtype(dtype), serializer=BytesCodec(),
        compressors=[*comp, Crc32cCodec()],  # every object carries a checksum, verified on read
        # NaN fill: zarr returns the fill value for a MISSING object; readers see NaN and then check
        # which object is gone (a real NaN in the EMA is told apart by the object being there)
        filters=None, fill_value=_NAN_FILL[dtype], config={"write_empty_chunks": True},
        attributes={"dist_ema_dtype": dtype},
    )
    doc = mem._store_dict["a/zarr.json"].to_bytes()
    return arr.metadata, arr._async_array.config, doc


def _bind(io: StoreIO, key: str, numel: int, dtype: str, chunk: int, compression: str | None):
    import zarr
    from zarr.core.array import AsyncArray
    from zarr.storage._common import StorePath

    meta, config, doc = _array_template(numel, dtype, chunk, compression)
    return zarr.Array(AsyncArray(metadata=meta, store_path=StorePath(io.zarr_store, key), config=config)), doc


def write_array(io: StoreIO, key: str, data: np.ndarray, dtype: str, compression: str | None,
                max_object_bytes: int) -> int:
    """Write a 1-d array (chunks first, its zarr.json last); return bytes written."""
    if data.ndim != 1 or data.dtype != np_dtype(dtype):
        raise ValueError(f"write_array: need 1-d {np_dtype(dtype)} data, got {data.dtype} {data.shape}")
    numel = int(data.size)
    if numel == 0:
        return 0
    arr, doc = _bind(io, key, numel, dtype, chunk_elems(numel, dtype, max_object_bytes), compression)

    def put_chunks() -> None:
        arr[:] = data

    retry(put_chunks, f"write {io.url}/{key}", io.attempts)
    io.put(f"{key}/zarr.json", doc)
    return numel * STORAGE_DTYPES[dtype]


def open_rank_array(io: StoreIO, key: str, numel: int, dtype: str, compression: str | None, max_object_bytes: int):
    """The zarr array of a committed snapshot, bound from the metadata we know (no metadata GET)."""
    arr, _ = _bind(io, key, numel, dtype, chunk_elems(numel, dtype, max_object_bytes), compression)
    return arr


def missing_chunks(io: StoreIO, key: str, numel: int, dtype: str, max_object_bytes: int, lo: int, hi: int) -> list[str]:
    """Object keys of array ``key`` overlapping [lo, hi) that do not exist."""
    c = chunk_elems(numel, dtype, max_object_bytes)
    keys = [f"{key}/c/{i}" for i in range(lo // c, (max(hi, lo + 1) - 1) // c + 1)]
    return [k for k in keys if not io.exists(k)]


def group_doc(attributes: dict) -> bytes:
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}, indent=1).encode()


def ensure_store(io: StoreIO, *, create: bool) -> dict:
    """Check the store marker (create it and the root groups when ``create``); return it."""
    try:
        raw = io.get(STORE_MARKER)
    except FileNotFoundError:
        raw = None
    if raw is not None:
        doc = json.loads(raw)
        if doc.get("format") != "dist-ema-store":
            raise StoreError(f"{io.url} is not a dist-ema store ({STORE_MARKER} has format {doc.get('format')!r})")
        if int(doc.get("version", -1)) > FORMAT_VERSION:
            raise StoreError(
                f"{io.url} was written by a newer dist-ema (store format version {doc.get('version')}, this "
                f"dist-ema reads <= {FORMAT_VERSION}); upgrade dist-ema"
            )
        return doc
    if not create:
        if io.list_dir(""):
            raise StoreError(f"{io.url} exists but is not a dist-ema store (no {STORE_MARKER}); check the URL")
        raise StoreError(f"no dist-ema store at {io.url} (no {STORE_MARKER}); check the URL")
    doc = {"format": "dist-ema-store", "version": FORMAT_VERSION, "created": time.time()}
    io.put("zarr.json", group_doc({"dist_ema": doc}))
    io.put("snapshots/zarr.json", group_doc({}))
    try:
        io.put(STORE_MARKER, json.dumps(doc).encode(), exclusive=True)
    except FileExistsError:
        pass
    return doc


def write_layout(io: StoreIO, layout: Layout, rank: int) -> str:
    """Each rank writes its own piece list; rank 0 also the parameter table. Idempotent."""
    lid = layout.layout_id()
    base = f"layouts/{lid}"
    if rank == 0:
        io.put(f"{base}/params.json", layout.params_json().encode())
    io.put(f"{base}/rank-{rank:05d}.json", layout.rank_json(rank).encode())
    return lid


def read_layout(io: StoreIO, lid: str, world_size: int) -> Layout:
    base = f"layouts/{lid}"
    keys = [f"{base}/params.json"] + [f"{base}/rank-{r:05d}.json" for r in range(world_size)]
    got = io.get_many(keys)
    missing = [k for k, v in got.items() if isinstance(v, Exception)]
    if missing:
        raise StoreError(f"{io.url}: layout {lid} is incomplete: missing {missing[:3]}; the store is damaged")
    return Layout.from_json(got[keys[0]], [got[k] for k in keys[1:]])  # type: ignore[arg-type]


def commit_snapshot(io: StoreIO, snap: str, meta: dict) -> None:
    """Make a snapshot visible: its group metadata, then the marker, written last (create-only)."""
    io.put(f"snapshots/{snap}/zarr.json", group_doc({"dist_ema": meta}))
    try:
        io.put(f"snapshots/{snap}/{COMMIT}", json.dumps(meta, indent=1).encode(), exclusive=True)
    except FileExistsError as e:
        raise StoreError(
            f"snapshot {snap} is already committed in {io.url}: two jobs write the same store, or a resumed job "
            f"repeats steps; use a new store URL or resume=True"
        ) from e


def list_snapshot_dirs(io: StoreIO) -> list[str]:
    return [n for n in io.list_dir("snapshots") if n.startswith("step-")]


def remove_snapshot(io: StoreIO, snap: str) -> None:
    """Delete a snapshot: the marker first (so readers stop seeing it at once), then the data."""
    io.remove(f"snapshots/{snap}/{COMMIT}")
    io.remove(f"snapshots/{snap}")


@dataclass
class Committed:
    snap: str
    meta: dict


def read_commits(io: StoreIO, snaps: list[str] | None = None) -> tuple[list[Committed], list[str]]:
    """Committed snapshots (sorted by step) and the names of torn ones (no marker)."""
    names = list_snapshot_dirs(io) if snaps is None else snaps
    got = io.get_many([f"snapshots/{n}/{COMMIT}" for n in names])
    done, torn = [], []
    for n in names:
        v = got[f"snapshots/{n}/{COMMIT}"]
        if isinstance(v, FileNotFoundError) or (isinstance(v, Exception) and "NoSuchKey" in repr(v)):
            torn.append(n)
        elif isinstance(v, Exception):
            raise StoreError(f"cannot read the commit marker of {n} in {io.url}: {v}")
        else:
            try:
                done.append(Committed(n, json.loads(v)))
            except ValueError as e:
                raise StoreError(f"commit marker of {n} in {io.url} is corrupt ({e}); remove snapshots/{n}") from e
    done.sort(key=lambda c: (c.meta["step"], c.snap))
    return done, torn


def retire_snapshots(io: StoreIO, snaps: list[str], job: str, restored_step: int, reason: str) -> str:
    """Move committed snapshots of an abandoned trajectory to ``retired/<job>/`` (owner only).

    Crash-safe in this order: the data is copied (a rename on local disks), then the record
    ``retired/<job>/retired.json`` is written, then the originals are removed, marker first.
    A crash before the removal leaves the committed original (retired again at the next
    restore); after it, at worst an uncommitted original, which start-up cleans up.
    Returns the key of the folder that keeps them.
    """
    base = f"retired/{job}"
    for snap in snaps:
        src, dst = io.path(f"snapshots/{snap}"), io.path(f"{base}/{snap}")
        if io.protocol == "file":
            import os

            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(src, dst)  # atomic: the marker moves with its data
            io.fs.invalidate_cache()
            continue
        files = retry(lambda src=src: io.fs.find(src), f"list {io.url}/snapshots/{snap}", io.attempts)
        for f in files:
            rel = f[len(src):].lstrip("/")
            retry(lambda f=f, to=f"{dst}/{rel}": io.fs.copy(f, to), f"copy {f}", io.attempts)
    record = {"steps": sorted(int(s.split("-")[1]) for s in snaps), "snapshots": sorted(snaps),
              "restored_step": restored_step, "job": job, "reason": reason, "time": time.time()}
    io.put(f"{base}/retired.json", json.dumps(record, indent=1).encode())
    if io.protocol != "file":
        for snap in snaps:
            remove_snapshot(io, snap)
    return base


def read_retired(io: StoreIO) -> list[tuple[str, dict, list[Committed]]]:
    """Retired trajectories: (folder key, record, their snapshots' markers), oldest first."""
    out = []
    for job in io.list_dir("retired"):
        base = f"retired/{job}"
        try:
            record = json.loads(io.get(f"{base}/retired.json"))
        except FileNotFoundError:
            continue  # a retirement still being copied (or interrupted): not complete
        got = io.get_many([f"{base}/{s}/{COMMIT}" for s in record.get("snapshots", [])])
        snaps = [Committed(k.split("/")[-2], json.loads(v)) for k, v in got.items() if not isinstance(v, Exception)]
        out.append((base, record, sorted(snaps, key=lambda c: c.meta["step"])))
    return sorted(out, key=lambda x: x[1].get("time", 0))
