"""The snapshot format, in one place: keys, the snapshot metadata, and the bytes of a stored array.

Pure (no I/O, no torch): the writer, the reader, synthesis and the CLI take every key,
every metadata field and every byte offset from here.

Format version 2 (new stores)::

    dist_ema.json                                   store marker (format, version)
    owner.json                                      ownership record, create-only (see docs/commit-protocol.md)
    jobs/<job>.json                                 a job's own record: host, pid, run, last seen
    layouts/<layout>/params.json, rank-<r>.json     the layout (unchanged from version 1; boxes: version 3)
    snapshots/step-<N>/commit.json                  commit marker, create-only, written last: the metadata,
                                                    and "attempt": the job whose data it commits
    snapshots/step-<N>/<job>/zarr.json              zarr group; attributes.dist_ema = the metadata
    snapshots/step-<N>/<job>/r<r>/zarr.json         zarr array [profiles, numel] of rank r, sharded:
    snapshots/step-<N>/<job>/r<r>/c/<k>/0           ONE object per profile k (the shard), inner chunks
                                                    each followed by its crc32c, the shard index at the end
    snapshots/step-<N>/<job>/buffers/zarr.json      buffers, packed into one uint8 array (rank 0)
    snapshots/step-<N>/<job>/buffers/c/0

So a snapshot is at most ranks x (profiles + 1) + 4 objects, whatever the shard sizes, and
stores its data plus 20 bytes per inner chunk (its crc32c and index entry), 4 per shard,
and at most ``count`` elements of padding in the last inner chunk. Every job writes under its own attempt folder: a
committed snapshot's bytes are never written again, whoever else writes the store.

Shards are plain Zarr v3 (``sharding_indexed`` with crc32c on the inner chunks and on the
index): zarr-python and tensorstore read them. Uncompressed inner chunks lie back to back
in chunk order, so a reader finds chunk ``i`` at ``i * (inner * itemsize + 4)`` without the
index (checked against the index by ``verify``).

Format version 3: version 2, with layouts whose pieces may be ranges of N-d boxes of a parameter
(tensor parallel, ``Shard(d > 0)``): a rank file's piece is ``[param, start, numel, offset]`` (a flat
range, as in version 2) or ``[param, start, numel, offset, starts, sizes]`` (elements [start, start +
numel) of the row-major order of the box ``starts``/``sizes``). Only a snapshot whose layout has a box
says version 3 in its commit marker; everything else, the store marker included, stays version 2, so
stores of 1-d layouts stay readable by earlier releases.

Format version 1 (still read): data next to the marker, ``snapshots/step-<N>/r<r>/p<k>``
one zarr array per rank and profile, chunked into objects of ``max_object_bytes``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np

from dist_ema.store.fs import StoreError

__all__ = [
    "COMMIT",
    "BOX_VERSION",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "STORAGE_DTYPES",
    "STORE_MARKER",
    "Geometry",
    "SnapshotMeta",
    "snapshot_id",
    "step_of",
]

FORMAT_VERSION = 2  # written by this dist-ema (the store marker, and snapshots of flat-range layouts)
BOX_VERSION = 3  # a snapshot whose layout has N-d box pieces (format 2 otherwise unchanged)
READABLE_VERSIONS = (1, 2, 3)
STORE_MARKER = "dist_ema.json"
COMMIT = "commit.json"
OWNER = "owner.json"
STORAGE_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
COMPRESSIONS = (None, "blosc-lz4", "zstd")
DEFAULT_INNER_BYTES = 1 << 20  # inner chunk: the unit of a partial read and of a checksum
NAN_FILL = {"float32": float("nan"), "float16": float("nan"), "bfloat16": 0x7FC0}
EMPTY = 2**64 - 1  # shard index entry of a chunk that is not stored
_INDEX_ENTRY = 16


def snapshot_id(step: int) -> str:
    return f"step-{int(step):012d}"


def step_of(snap: str) -> int:
    return int(snap.split("-", 1)[1])


def np_dtype(dtype: str) -> np.dtype:
    """On-disk numpy dtype: bfloat16 is stored as uint16 bit patterns (zarr has no bfloat16)."""
    return {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}[dtype]


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values -> float32."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- keys


def commit_key(snap: str) -> str:
    return f"snapshots/{snap}/{COMMIT}"


def data_prefix(snap: str, attempt: str | None) -> str:
    """Where a snapshot's data lies: its attempt's folder (version 2) or next to the marker (version 1)."""
    return f"snapshots/{snap}/{attempt}" if attempt else f"snapshots/{snap}"


def rank_key(prefix: str, rank: int) -> str:
    """Version 2: the zarr array [profiles, numel] of one rank."""
    return f"{prefix}/r{rank:05d}"


def shard_key(prefix: str, rank: int, profile: int) -> str:
    """Version 2: the one object holding one rank's data of one profile."""
    return f"{prefix}/r{rank:05d}/c/{profile}/0"


def v1_array_key(prefix: str, rank: int, profile: int) -> str:
    return f"{prefix}/r{rank:05d}/p{profile}"


def buffers_key(prefix: str) -> str:
    return f"{prefix}/buffers"


def v1_buffer_key(prefix: str, i: int) -> str:
    return f"{prefix}/buffers/b{i}"


def job_key(job: str) -> str:
    return f"jobs/{job}.json"


# ----------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class SnapshotMeta:
    """The metadata of one snapshot (the commit marker's document)."""

    step: int
    t: float
    t_now: float
    updates: int
    unit: str
    profiles: tuple[tuple[float, float], ...]  # (sigma_rel, gamma) in array order
    dtype: str
    world_size: int
    layout: str
    model: str
    engine: str = "unknown"
    compression: str | None = None
    inner_bytes: int = DEFAULT_INNER_BYTES  # version 2: target size of an inner chunk
    max_object_bytes: int | None = None  # version 1: size of one object
    attempt: str | None = None  # version 2: the job whose data this marker commits
    batch_size: int | None = None
    update_every: int = 1
    ties: dict = field(default_factory=dict)
    buffers: tuple = ()  # ((name, shape, dtype, offset, nbytes), ...); version 1 without offsets
    kind: str = "snapshot"  # or "synthesized"
    version: int = FORMAT_VERSION
    created: float = 0.0
    extra: dict = field(default_factory=dict)  # synthesized: coefficients, rows, source, errors...

    def to_doc(self) -> dict:
        doc = {
            "format": "dist-ema-snapshot", "version": self.version, "kind": self.kind, "step": self.step,
            "t": self.t, "t_now": self.t_now, "updates": self.updates, "unit": self.unit,
            "batch_size": self.batch_size, "update_every": self.update_every,
            "t_delta_rule": "beta = (1 - t_delta / t) ** (gamma + 1); t_delta = time since the previous update",
            "profiles": [{"sigma_rel": s, "gamma": g, "array": f"p{k}"} for k, (s, g) in enumerate(self.profiles)],
            "dtype": self.dtype, "compression": self.compression, "world_size": self.world_size,
            "engine": self.engine, "layout": self.layout, "model": self.model, "ties": dict(self.ties),
            "buffers": [list(b) for b in self.buffers], "created": self.created,
        }
        if self.version >= 2:
            doc["attempt"] = self.attempt
            doc["inner_bytes"] = self.inner_bytes
        else:
            doc["max_object_bytes"] = self.max_object_bytes
        doc.update(self.extra)
        return doc

    @staticmethod
    def from_doc(doc: dict) -> SnapshotMeta:
        known = {"format", "version", "kind", "step", "t", "t_now", "updates", "unit", "batch_size", "update_every",
                 "t_delta_rule", "profiles", "dtype", "compression", "world_size", "engine", "layout", "model",
                 "ties", "buffers", "created", "attempt", "inner_bytes", "max_object_bytes"}
        v = int(doc["version"])
        return SnapshotMeta(
            step=int(doc["step"]), t=float(doc["t"]), t_now=float(doc.get("t_now", doc["t"])),
            updates=int(doc.get("updates", 0)), unit=doc["unit"],
            profiles=tuple((float(p["sigma_rel"]), float(p["gamma"])) for p in doc["profiles"]),
            dtype=doc["dtype"], world_size=int(doc["world_size"]), layout=doc["layout"], model=doc.get("model", ""),
            engine=doc.get("engine", "unknown"), compression=doc.get("compression"),
            inner_bytes=int(doc.get("inner_bytes") or DEFAULT_INNER_BYTES),
            max_object_bytes=None if doc.get("max_object_bytes") is None else int(doc["max_object_bytes"]),
            attempt=doc.get("attempt"), batch_size=doc.get("batch_size"), update_every=int(doc.get("update_every", 1)),
            ties=dict(doc.get("ties") or {}), buffers=tuple(tuple(b) for b in doc.get("buffers") or []),
            kind=doc.get("kind", "snapshot"), version=v, created=float(doc.get("created", 0.0)),
            extra={k: val for k, val in doc.items() if k not in known},
        )


def group_doc(attributes: dict) -> bytes:
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}, indent=1).encode()


# ----------------------------------------------------------------------------- the bytes of an array


@dataclass(frozen=True)
class Geometry:
    """How ``numel`` elements of one rank and profile are stored.

    Version 2: one shard of ``count`` inner chunks of ``inner`` elements (the last one
    padded with at most ``count - 1`` elements), each followed by a crc32c, then the index.
    Version 1: ``count`` objects of ``inner`` elements, each with a crc32c.
    """

    numel: int
    dtype: str
    inner: int
    count: int
    compression: str | None = None
    version: int = FORMAT_VERSION

    @property
    def itemsize(self) -> int:
        return STORAGE_DTYPES[self.dtype]

    @property
    def chunk_bytes(self) -> int:
        """Stored bytes of one uncompressed inner chunk with its checksum."""
        return self.inner * self.itemsize + 4

    @property
    def index_bytes(self) -> int:
        return self.count * _INDEX_ENTRY + 4

    def chunks_of(self, lo: int, hi: int) -> range:
        """Inner chunks holding elements [lo, hi)."""
        if hi <= lo:
            return range(0)
        return range(lo // self.inner, (hi - 1) // self.inner + 1)

    def chunk_span(self, i: int) -> tuple[int, int]:
        """Elements [a, b) of chunk i that are real data (the rest is padding)."""
        a = i * self.inner
        return a, min(self.numel, a + self.inner)

    def dense_offset(self, i: int) -> int:
        """Byte offset of chunk i in an uncompressed shard (chunks back to back, in order)."""
        return i * self.chunk_bytes

    @property
    def shard_bytes(self) -> int:
        """Size of an uncompressed shard."""
        return self.count * self.chunk_bytes + self.index_bytes


def geometry(numel: int, dtype: str, inner_bytes: int = DEFAULT_INNER_BYTES,
             compression: str | None = None) -> Geometry:
    """Version 2: ``ceil(numel / target)`` inner chunks of equal size (so padding < chunk count)."""
    target = max(1, int(inner_bytes) // STORAGE_DTYPES[dtype])
    count = max(1, math.ceil(numel / target))
    return Geometry(int(numel), dtype, max(1, math.ceil(numel / count)), count, compression, 2)


def v1_geometry(numel: int, dtype: str, max_object_bytes: int, compression: str | None = None) -> Geometry:
    per = max(1, max_object_bytes // STORAGE_DTYPES[dtype])
    inner = max(1, min(numel, per))
    return Geometry(int(numel), dtype, inner, max(1, math.ceil(numel / inner)), compression, 1)


def _codecs_json(compression: str | None, dtype: str) -> list[dict]:
    comp = {
        None: [],
        "blosc-lz4": [{"name": "blosc", "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle",
                                                             "typesize": STORAGE_DTYPES[dtype], "blocksize": 0}}],
        "zstd": [{"name": "zstd", "configuration": {"level": 3, "checksum": False}}],
    }[compression]
    return [{"name": "bytes", "configuration": {"endian": "little"}}, *comp, {"name": "crc32c"}]


def _fill_json(dtype: str) -> object:
    return "NaN" if dtype != "bfloat16" else NAN_FILL[dtype]


def array_doc(profiles: int, g: Geometry, attributes: dict | None = None) -> bytes:
    """zarr.json of a version-2 rank array: shape [profiles, numel], one shard per profile."""
    doc = {
        "zarr_format": 3, "node_type": "array", "shape": [profiles, g.numel],
        "data_type": str(np_dtype(g.dtype).name),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, g.inner * g.count]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": _fill_json(g.dtype),
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [1, g.inner],
            "codecs": _codecs_json(g.compression, g.dtype),
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end"}}],
        "attributes": {"dist_ema_dtype": g.dtype, **(attributes or {})},
        "dimension_names": ["profile", "element"],
        "storage_transformers": [],
    }
    return json.dumps(doc, indent=1).encode()


def bytes_array_doc(nbytes: int) -> bytes:
    """zarr.json of a 1-d uint8 array in one chunk with a crc32c (the packed buffers)."""
    doc = {
        "zarr_format": 3, "node_type": "array", "shape": [nbytes], "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, nbytes)]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0, "codecs": [{"name": "bytes"}, {"name": "crc32c"}],
        "attributes": {"dist_ema": "buffers packed back to back; names, shapes, dtypes and offsets are in the "
                                    "snapshot metadata"},
        "storage_transformers": [],
    }
    return json.dumps(doc, indent=1).encode()


def crc32c(data) -> int:
    import crc32c as _c

    return _c.crc32c(data)


def crc_bytes(data) -> bytes:
    return struct.pack("<I", crc32c(data))


def compressor(compression: str | None, dtype: str):
    """The numcodecs codec of an inner chunk (None: stored raw)."""
    if compression is None:
        return None
    import numcodecs

    if compression == "blosc-lz4":
        return numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE,
                               typesize=STORAGE_DTYPES[dtype])  # type: ignore[call-arg]
    return numcodecs.Zstd(level=3)


def encode_index(entries: list[tuple[int, int]]) -> bytes:
    raw = np.asarray(entries, dtype="<u8").tobytes()
    return raw + crc_bytes(raw)


def decode_index(raw: bytes | memoryview, count: int, where: str) -> np.ndarray:
    """The shard index [(offset, nbytes)] * count, its checksum checked."""
    body, crc = memoryview(raw)[: count * _INDEX_ENTRY], bytes(memoryview(raw)[count * _INDEX_ENTRY:])
    if len(crc) != 4 or crc32c(body) != struct.unpack("<I", crc)[0]:
        raise ChecksumError(f"{where}: the shard index is corrupt (it fails its crc32c check)")
    return np.frombuffer(body, dtype="<u8").reshape(count, 2)


class ChecksumError(StoreError):
    """Stored bytes that fail their checksum."""


def check_chunk(data, crc: bytes | memoryview, where: str, i: int) -> None:
    if crc32c(data) != struct.unpack("<I", bytes(crc))[0]:
        raise ChecksumError(f"{where}: inner chunk {i} is corrupt (it fails its crc32c check); "
                            f"run dist-ema ls --verify")


def buffer_np_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a stored buffer is read as: its torch dtype's name, bfloat16 (which numpy
    lacks) as its uint16 bit patterns; the record keeps the real name."""
    return np.dtype("<u2") if dtype == "bfloat16" else np.dtype(dtype)


def pack_buffers(buffers: list[tuple[str, np.ndarray]],
                 dtypes: dict[str, str] | None = None) -> tuple[bytes, list[list]]:
    """Buffers packed back to back, and their (name, shape, dtype, offset, nbytes) records.

    ``dtypes``: the recorded dtype names where the array's own would be wrong (bfloat16 read as uint16).
    """
    parts, records, off = [], [], 0
    for name, arr in buffers:
        a = np.require(arr, requirements="C")  # np.ascontiguousarray would turn a 0-dim buffer into 1-dim
        b = a.tobytes()
        records.append([name, list(a.shape), (dtypes or {}).get(name, str(a.dtype)), off, len(b)])
        parts.append(b)
        off += len(b)
    return b"".join(parts), records


def unpack_buffers(raw: bytes, records) -> dict[str, np.ndarray]:
    out = {}
    for name, shape, dtype, off, n in records:
        out[name] = np.frombuffer(raw[off:off + n], dtype=buffer_np_dtype(dtype)).reshape(shape).copy()
    return out
