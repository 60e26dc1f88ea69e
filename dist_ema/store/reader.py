"""Reading a snapshot store: committed snapshots only, any region of any parameter."""

from __future__ import annotations

import contextlib
import logging
import numbers
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from dist_ema.errors import ConfigError, DistEMAError, TargetError
from dist_ema.store.format import (
    EMPTY,
    READABLE_VERSIONS,
    STORAGE_DTYPES,
    ChecksumError,
    Geometry,
    SnapshotMeta,
    check_chunk,
    compressor,
    data_prefix,
    decode_index,
    geometry,
    np_dtype,
    shard_key,
    snapshot_id,
    unpack_buffers,
    v1_array_key,
    v1_buffer_key,
    v1_geometry,
)
from dist_ema.store.fs import StoreError, StoreIO
from dist_ema.store.io import (
    Ranges,
    TruncatedObjectError,
    ensure_store,
    newest_commit,
    read_commit,
    read_commits,
    read_layout,
    read_retired,
    unfinished_retirements,
)
from dist_ema.store.layout import Layout, Read, merge_reads, plan_region

__all__ = ["Snapshot", "SnapshotStore", "open_store"]

log = logging.getLogger("dist_ema")

# reads of object stores are large and several at once: a GET's first byte costs ~20 ms and one
# connection carries ~90 MB/s on S3; local reads gain nothing from either beyond a few MiB
READ_BYTES = {"file": 4 * 2**20, "remote": 16 * 2**20}  # the largest ranged read, by default
PREFETCH = {"file": 1, "remote": 8}  # ranged reads in flight per reader, by default


@dataclass(frozen=True)
class Snapshot:
    """One committed snapshot: the EMA of every tracked profile at time ``t``.

    Attributes:
        id: the snapshot's name in the store (``step-000000001000``).
        step: optimizer steps at the snapshot; ``t``: the EMA's time (steps or samples, see ``unit``).
        sigma_rels, gammas: the profiles stored, in array order (p0, p1, ...).
        meta: the full metadata document.
    """

    id: str
    step: int
    t: float
    unit: str
    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]
    world_size: int
    layout_id: str
    dtype: str
    meta: dict = field(repr=False, compare=False)
    version: int = 1
    attempt: str | None = None  # version 2: the job whose data the marker commits

    @property
    def prefix(self) -> str:
        """Where this snapshot's data lies (its committed attempt's folder)."""
        return data_prefix(self.id, self.attempt)

    @property
    def format(self) -> SnapshotMeta:
        return SnapshotMeta.from_doc(self.meta)


def _snapshot_from_meta(snap: str, meta: dict) -> Snapshot:
    v = meta.get("version")
    if meta.get("format") != "dist-ema-snapshot" or not isinstance(v, int):
        raise StoreError(f"snapshot {snap}: not a dist-ema snapshot marker (format={meta.get('format')!r})")
    if v not in READABLE_VERSIONS:
        raise StoreError(
            f"snapshot {snap} has format version {v}; this dist-ema reads versions {list(READABLE_VERSIONS)}: "
            f"upgrade dist-ema"
        )
    profs = meta["profiles"]
    return Snapshot(
        id=snap, step=int(meta["step"]), t=float(meta["t"]), unit=meta["unit"],
        sigma_rels=tuple(float(p["sigma_rel"]) for p in profs), gammas=tuple(float(p["gamma"]) for p in profs),
        world_size=int(meta["world_size"]), layout_id=meta["layout"], dtype=meta["dtype"], meta=meta,
        version=v, attempt=meta.get("attempt") if v >= 2 else None,
    )


class SnapshotStore:
    """Read-only view of a dist-ema store.

    Example:
        >>> store = open_store("s3://bucket/run1/snapshots")
        >>> [s.step for s in store.snapshots()]
        >>> w = store.read(step=1000, sigma_rel=0.10, name="fc1.weight")   # full torch tensor
    """

    def __init__(self, url: str, storage_options: dict | None = None, *, io: StoreIO | None = None) -> None:
        self.io = io or StoreIO(url, storage_options)
        self.url = self.io.url
        ensure_store(self.io, create=False)
        self._layouts: dict[str, Layout] = {}
        self._index_cache: dict[str, list] = {}
        where = "file" if self.io.protocol == "file" else "remote"
        self.read_bytes = READ_BYTES[where]  # the largest ranged read (bounds a reader's buffers)
        self.prefetch = PREFETCH[where]  # ranged reads in flight

    def __repr__(self) -> str:
        return f"SnapshotStore({self.url!r})"

    # ------------------------------------------------------------------ listing

    def snapshots(self) -> list[Snapshot]:
        """Committed snapshots, oldest first. Torn ones (no commit marker) are not listed."""
        snaps, torn = self.listing()
        if torn:
            log.debug("dist-ema: %d uncommitted snapshot(s) in %s ignored: %s", len(torn), self.url, torn[:5])
        return snaps

    def listing(self) -> tuple[list[Snapshot], list[str]]:
        """Committed snapshots, oldest first, and the names of the torn ones, from one listing of the store."""
        done, torn = read_commits(self.io)
        return [_snapshot_from_meta(c.snap, c.meta) for c in done], torn

    def retired(self) -> list[Snapshot]:
        """Snapshots of abandoned trajectories (a restart from an older training checkpoint), oldest first.

        They are kept under ``retired/<job>-r<k>/`` (one folder per retirement) and never used by
        synthesis; see docs/commit-protocol.md. The same step can appear once per retirement.
        """
        return [s for _, _, snaps in self.retirements() for s in snaps]

    def retirements(self) -> list[tuple[str, dict, list[Snapshot]]]:
        """One entry per retirement, oldest first: (its folder's key, its record, its snapshots).

        The record says which steps were retired, the step the EMA was restored to, the job and
        the time. Retirements interrupted before their record are in :meth:`unfinished_retirements`.
        """
        return [(base, record, [_snapshot_from_meta(c.snap, c.meta) for c in snaps])
                for base, record, snaps in read_retired(self.io)]

    def unfinished_retirements(self) -> list[str]:
        """Keys of retirement folders without their record (a job stopped while retiring); kept as they are."""
        return unfinished_retirements(self.io)

    def torn(self) -> list[str]:
        return read_commits(self.io)[1]

    def snapshot(self, step: int | None = None) -> Snapshot:
        """The committed snapshot at ``step`` (default: the newest), found by its marker alone.

        A step reads one marker; the newest, one listing and the markers from the newest folder
        down to the first committed one. Only a step that is not there lists every snapshot (to name them).
        """
        if step is None:
            c = newest_commit(self.io)
        else:
            c = read_commit(self.io, snapshot_id(step)) if isinstance(step, numbers.Integral) else None
        if c is not None and (step is None or c.meta.get("step") == step):
            return _snapshot_from_meta(c.snap, c.meta)
        snaps = self.snapshots()
        if not snaps:
            raise StoreError(f"no committed snapshot in {self.url}; train with store=... and snapshot_every=...")
        if step is None:
            return snaps[-1]
        for s in snaps:
            if s.step == step:
                return s
        raise TargetError(f"no committed snapshot at step {step} in {self.url}; steps: {[s.step for s in snaps][-10:]}")

    def layout(self, snap: Snapshot) -> Layout:
        if snap.layout_id not in self._layouts:
            lay = read_layout(self.io, snap.layout_id, snap.world_size)
            if lay.layout_id() != snap.layout_id:
                raise StoreError(f"layout {snap.layout_id} in {self.url} does not match its id: the store is damaged")
            self._layouts[snap.layout_id] = lay
            self._index_cache[snap.layout_id] = lay.piece_index()
        return self._layouts[snap.layout_id]

    def params(self, snap: Snapshot | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
        """{fqn: (shape, dtype)} of the model in a snapshot (default: the newest)."""
        lay = self.layout(snap or self.snapshot())
        return {f: (s, d) for f, s, d in lay.params}

    def profile_index(self, snap: Snapshot, sigma_rel: float | None = None, gamma: float | None = None) -> int:
        """Array index of a profile of ``snap`` (the one rule for the same profile: ``phema.same_gamma``)."""
        from dist_ema import phema

        if gamma is None and sigma_rel is not None:
            try:
                gamma = phema.sigma_rel_to_gamma(float(sigma_rel))
            except ValueError:
                gamma = None
        k = phema.find_gamma(snap.gammas, gamma) if gamma is not None else None
        if k is not None:
            return k
        raise TargetError(f"snapshot {snap.id} has no profile sigma_rel={sigma_rel} gamma={gamma}; "
                          f"it has sigma_rels {list(snap.sigma_rels)}")

    # ------------------------------------------------------------------ reading

    def geometry(self, snap: Snapshot, rank: int) -> Geometry:
        """How rank ``rank``'s data of each profile of ``snap`` is stored."""
        n = self.layout(snap).rank_numel(rank)
        comp = snap.meta.get("compression")
        if snap.version >= 2:
            return geometry(n, snap.dtype, int(snap.meta["inner_bytes"]), comp)
        return v1_geometry(n, snap.dtype, int(snap.meta["max_object_bytes"]), comp)

    @property
    def ranges(self) -> Ranges:
        r = self.__dict__.get("_ranges")
        if r is None:
            r = self.__dict__["_ranges"] = Ranges(self.io)
        return r

    def _read_index(self, key: str, g: Geometry) -> tuple[np.ndarray, int]:
        """A version-2 shard's index (its crc32c checked) and the shard's size in bytes."""
        size = self.ranges.size(key)
        # a short shard is named as such before its index is looked for (at a negative offset, or in data bytes)
        least = g.shard_bytes if g.compression is None else g.index_bytes
        if size < least:
            raise TruncatedObjectError(f"{self.url}/{key}", size, g.shard_bytes if g.compression is None
                                       else f"at least {least}")
        raw = bytearray(g.index_bytes)
        self.ranges.read_into(key, size - g.index_bytes, memoryview(raw))
        return decode_index(raw, g.count, f"{self.url}/{key}"), size

    def _index(self, key: str, g: Geometry) -> np.ndarray:
        """The shard index of a compressed version-2 shard (cached)."""
        cache = self.__dict__.setdefault("_indexes", {})
        if key not in cache:
            cache[key] = self._read_index(key, g)[0]
        return cache[key]

    def read_stored(self, snap: Snapshot, rank: int, profile: int, lo: int, hi: int, out: np.ndarray,
                    scratch: bytearray | None = None) -> int:
        """Elements [lo, hi) of one rank array into ``out`` (any float dtype; converted on the copy).

        Fetches only the inner chunks (version 2) or objects (version 1) that hold them, and checks
        every fetched chunk's crc32c. ``scratch``: a reused byte buffer (grown when too small).
        Returns the bytes fetched. Raises StoreError naming the object when one is missing, short
        or damaged.
        """
        g = self.geometry(snap, rank)
        if not 0 <= lo <= hi <= g.numel:
            raise ConfigError(f"bad range [{lo}, {hi}) of rank {rank} ({g.numel} elements)")
        if hi == lo:
            return 0
        if snap.version >= 2 and g.compression is None:  # one ranged read of the chunks, back to back
            run, nbytes = self._raw_run(snap, g, rank, profile, lo, hi, scratch)
            run.copy_to(0, hi - lo, out)
            return nbytes
        dt = np_dtype(g.dtype)
        codec = compressor(g.compression, g.dtype)
        key = shard_key(snap.prefix, rank, profile) if snap.version >= 2 else v1_array_key(snap.prefix, rank, profile)
        where = self._where(snap, rank, profile, key)
        fetched = 0
        with self._named(where, key, g, codec):
            idx = self._index(key, g) if snap.version >= 2 else None
            for c in g.chunks_of(lo, hi):
                if idx is None:  # version 1: one object per chunk
                    obj = f"{key}/c/{c}"
                    raw = self.ranges.get(obj)
                else:
                    off, n = int(idx[c, 0]), int(idx[c, 1])
                    if off == EMPTY:
                        raise StoreError(f"{where}: inner chunk {c} is not stored; the snapshot is damaged")
                    raw = bytearray(n)
                    self.ranges.read_into(key, off, memoryview(raw))
                fetched += len(raw)
                body, crc = memoryview(raw)[:-4], memoryview(raw)[-4:]
                check_chunk(body, crc, where, c)
                data = np.frombuffer(codec.decode(body) if codec is not None else body, dtype=dt)
                a, b = g.chunk_span(c)
                s0, s1 = max(a, lo), min(b, hi)
                _put(out, s0 - lo, data[s0 - a:s1 - a], g.dtype)
        return fetched

    def fetch_raw(self, snap: Snapshot, rank: int, profile: int, lo: int, hi: int,
                  scratch: bytearray | None = None) -> tuple[RawRun, int] | None:
        """Elements [lo, hi) of one rank array as stored: one ranged read of their whole inner chunks,
        every chunk's crc32c checked; decoded later by ``RawRun.copy_to``. Returns (the run, bytes fetched).

        None where the stored bytes are not plain values (compressed chunks, format version 1): read
        those with :meth:`read_stored`. ``scratch``: the byte buffer the run lives in (grown when too
        small); the run is valid until the buffer is reused.
        """
        g = self.geometry(snap, rank)
        if snap.version < 2 or g.compression is not None:
            return None
        if not 0 <= lo < hi <= g.numel:
            raise ConfigError(f"bad range [{lo}, {hi}) of rank {rank} ({g.numel} elements)")
        return self._raw_run(snap, g, rank, profile, lo, hi, scratch)

    def _raw_run(self, snap: Snapshot, g: Geometry, rank: int, profile: int, lo: int, hi: int,
                 scratch: bytearray | None) -> tuple[RawRun, int]:
        key = shard_key(snap.prefix, rank, profile)
        where = self._where(snap, rank, profile, key)
        with self._named(where, key, g, None):
            chunks = g.chunks_of(lo, hi)
            nbytes = len(chunks) * g.chunk_bytes
            buf = _grow(scratch, nbytes)
            self.ranges.read_into(key, g.dense_offset(chunks[0]), memoryview(buf)[:nbytes])
            rows = np.frombuffer(buf, dtype=np.uint8, count=nbytes).reshape(len(chunks), g.chunk_bytes)
            body = g.inner * g.itemsize
            for j, c in enumerate(chunks):
                check_chunk(rows[j, :body], rows[j, body:], where, c)
            vals = rows[:, :body].view(np_dtype(g.dtype))  # [chunks, inner], strided over the checksums
            return RawRun(vals, lo - chunks[0] * g.inner, hi - lo, g.inner, g.dtype), nbytes

    def _where(self, snap: Snapshot, rank: int, profile: int, key: str) -> str:
        return f"snapshot {snap.id}: rank {rank} profile p{profile} ({self.url}/{key})"

    @contextlib.contextmanager
    def _named(self, where: str, key: str, g: Geometry, codec):
        """Read errors as StoreErrors named by the snapshot, rank and profile (and the object's own size)."""
        try:
            yield
        except FileNotFoundError as e:
            raise StoreError(f"{where}: an object is missing ({e}); the snapshot is damaged "
                             f"(run dist-ema ls --verify)") from e
        except TruncatedObjectError as e:  # named by its snapshot, rank and profile, like the other problems
            size, expected = e.size, e.expected
            if g.version >= 2 and e.where.endswith(key):
                with contextlib.suppress(Exception):  # the object's own size, not where the read stopped
                    size = self.ranges.size(key)
                if codec is None:
                    expected = g.shard_bytes
            raise TruncatedObjectError(where, size, expected) from e
        except (ChecksumError, StoreError):
            raise
        except Exception as e:  # noqa: BLE001 - decode errors, truncated objects
            raise StoreError(f"{where}: unreadable or corrupt ({type(e).__name__}: {e})") from e

    def read_reads(self, snap: Snapshot, profile: int, reads: Sequence[Read], out: np.ndarray,
                   scratch: bytearray | None = None) -> int:
        """Execute reads (rank array -> out) for one profile. Returns bytes fetched.

        A read larger than ``read_bytes`` goes out in pieces of that size; on object stores up to
        ``prefetch`` of them at once (each with its own buffer). A strided read (``rows`` > 1, an
        N-d block) fetches its source span once and copies its rows.
        """
        cap = max(1, self.read_bytes // STORAGE_DTYPES[snap.dtype])
        jobs: list[Callable[[bytearray | None], int]] = []
        for rd in sorted(reads, key=lambda x: (x.rank, x.src)):
            if rd.rows == 1:
                for a in range(0, rd.numel, cap):
                    b = min(rd.numel, a + cap)
                    jobs.append(lambda buf, rd=rd, a=a, b=b: self.read_stored(
                        snap, rd.rank, profile, rd.src + a, rd.src + b, out[rd.dst + a:rd.dst + b], buf))
            else:
                jobs.append(lambda buf, rd=rd: self._read_strided(snap, profile, rd, out, buf))
        return self._run(jobs, scratch)

    def _run(self, jobs: list[Callable[[bytearray | None], int]], scratch: bytearray | None = None) -> int:
        """Run reads (each given a byte buffer), ``prefetch`` at once; the sum of their bytes."""
        if self.prefetch < 2 or len(jobs) < 2:
            if scratch is None and len(jobs) > 1:
                scratch = bytearray()
            return sum(job(scratch) for job in jobs)
        local = threading.local()

        def run(job: Callable[[bytearray | None], int]) -> int:
            if not hasattr(local, "buf"):
                local.buf = bytearray()
            return job(local.buf)

        with ThreadPoolExecutor(max_workers=min(self.prefetch, len(jobs)), thread_name_prefix="dist-ema-get") as pool:
            return sum(pool.map(run, jobs))

    def _read_strided(self, snap: Snapshot, profile: int, rd: Read, out: np.ndarray, scratch: bytearray | None) -> int:
        tmp = np.empty(rd.span, dtype=out.dtype)
        nbytes = self.read_stored(snap, rd.rank, profile, rd.src, rd.src + rd.span, tmp, scratch)
        isz = out.itemsize
        dst = np.lib.stride_tricks.as_strided(out[rd.dst:], shape=(rd.rows, rd.numel),
                                              strides=(rd.dst_stride * out.strides[0], out.strides[0]))
        dst[...] = np.lib.stride_tricks.as_strided(tmp, shape=(rd.rows, rd.numel), strides=(rd.src_stride * isz, isz))
        return nbytes

    def read_pieces(self, snap: Snapshot, profile: int, pieces: Sequence, offsets: Sequence[int],
                    out: np.ndarray | None = None, scratch: bytearray | None = None) -> tuple[np.ndarray, int]:
        """Regions of parameters (any layout) of one profile, back to back: (values, bytes fetched).

        ``pieces``: records with ``fqn``, ``flat_start``, ``flat_end`` and optionally ``box`` (e.g. a
        rank's shard pieces: a range of the parameter, or of the row-major order of a box of it);
        piece i lands at ``out[offsets[i]:offsets[i + 1]]`` (``out``: float32 by default, any float
        dtype, converted on the copy).
        """
        src = self.layout(snap)
        index, fidx = self._index_of(snap), src.fqn_index()
        reads = []
        for i, p in enumerate(pieces):
            for rd in plan_region(index[fidx[p.fqn]], p.flat_start, p.flat_end, getattr(p, "box", None)):
                reads.append(replace(rd, dst=int(offsets[i]) + rd.dst))
        if out is None:
            out = np.empty(int(offsets[-1]), dtype=np.float32)
        return out, self.read_reads(snap, profile, merge_reads(reads), out, scratch)

    def read_region(self, snap: Snapshot, profile: int, name: str, start: int, end: int) -> np.ndarray:
        """Elements [start, end) of the flattened parameter ``name`` as float32."""
        lay = self.layout(snap)
        idx = lay.fqn_index()
        if name not in idx:
            raise UnknownParameterError(name, snap.id, list(idx))
        reads = plan_region(self._index_of(snap)[idx[name]], start, end)
        out = np.empty(end - start, dtype=np.float32)
        self.read_reads(snap, profile, reads, out)
        return out

    def _index_of(self, snap: Snapshot):
        self.layout(snap)
        return self._index_cache[snap.layout_id]

    def read(self, step: int | None, sigma_rel: float | None = None, name: str = "", *, gamma: float | None = None):
        """Full tensor (torch, float32, the parameter's shape) of one parameter of one snapshot."""
        import torch

        snap = self.snapshot(step)
        k = self.profile_index(snap, sigma_rel, gamma)
        params = self.params(snap)
        if name not in params:
            raise UnknownParameterError(name, snap.id, list(params))
        shape = params[name][0]
        n = int(np.prod(shape))
        return torch.from_numpy(self.read_region(snap, k, name, 0, n).reshape(shape))

    def read_buffers(self, snap: Snapshot) -> dict[str, np.ndarray]:
        """Buffers stored with a snapshot (``buffers="copy"``)."""
        records = snap.meta.get("buffers") or []
        if not records:
            return {}
        if snap.version >= 2:
            key = f"{snap.prefix}/buffers/c/0"
            try:
                raw = self.ranges.get(key)
            except FileNotFoundError as e:
                raise StoreError(f"snapshot {snap.id}: its buffers object {key} is missing") from e
            check_chunk(memoryview(raw)[:-4], memoryview(raw)[-4:], f"snapshot {snap.id} buffers", 0)
            return unpack_buffers(raw[:-4], records)
        import zarr  # version 1 wrote each buffer as a zarr array with zarr's default codecs: zarr reads it

        out = {}
        for i, (name, shape, _dtype) in enumerate(records):
            arr = zarr.open_array(self.io.zarr_store, path=v1_buffer_key(snap.prefix, i), mode="r", zarr_format=3)
            out[name] = np.asarray(arr[...]).reshape(shape)
        return out

    def buffer_tensors(self, snap: Snapshot) -> dict:
        """Buffers stored with a snapshot as torch tensors (name -> tensor) of their recorded dtype, bfloat16 too."""
        import torch

        dtypes = {r[0]: r[2] for r in snap.meta.get("buffers") or []}
        out = {}
        for name, a in self.read_buffers(snap).items():
            t = torch.from_numpy(np.require(a, requirements="C"))  # keeps 0-dim shapes
            out[name] = t.view(torch.bfloat16) if dtypes.get(name) == "bfloat16" else t
        return out

    def verify(self, snap: Snapshot) -> list[str]:
        """Read every object of a snapshot and check its checksums (and a shard's index); empty = healthy."""
        problems = []
        lay = self.layout(snap)
        for r in range(lay.world_size):
            n = lay.rank_numel(r)
            if n == 0:
                continue
            g = self.geometry(snap, r)
            for k in range(len(snap.gammas)):
                try:
                    if snap.version >= 2:
                        problems.extend(self._verify_shard(snap, r, k, g))
                    self._read_all(snap, r, k, n, g)
                except Exception as e:  # noqa: BLE001 - reported, not raised
                    problems.append(f"{snap.id}: rank {r} profile p{k}: {type(e).__name__}: {e}")
        try:
            self.read_buffers(snap)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{snap.id}: buffers: {type(e).__name__}: {e}")
        return problems

    def _read_all(self, snap: Snapshot, r: int, k: int, n: int, g: Geometry) -> None:
        """Every chunk of one rank array read once (checksums checked), in reads of at most read_bytes."""
        step = max(1, self.read_bytes // g.itemsize // g.inner) * g.inner

        def piece(a: int) -> Callable[[bytearray | None], int]:
            b = min(n, a + step)
            return lambda buf: self.read_stored(snap, r, k, a, b, np.empty(b - a, dtype=np.float32), buf)

        self._run([piece(a) for a in range(0, n, step)])

    def _verify_shard(self, snap: Snapshot, r: int, k: int, g: Geometry) -> list[str]:
        key = shard_key(snap.prefix, r, k)
        idx, size = self._read_index(key, g)
        if g.compression is None:
            want = np.array([[g.dense_offset(i), g.chunk_bytes] for i in range(g.count)], dtype="<u8")
            if size != g.shard_bytes or not np.array_equal(idx, want):
                return [f"{snap.id}: rank {r} profile p{k}: shard of {size} bytes, index {idx[:2].tolist()}...; "
                        f"expected {g.shard_bytes} bytes with chunks back to back"]
        return []


def _grow(buf: bytearray | None, n: int) -> bytearray:
    """``buf`` when it holds ``n`` bytes, grown when it can be; a new buffer while views of it live."""
    if buf is None:
        return bytearray(n)
    if len(buf) < n:
        try:
            buf.extend(bytes(n - len(buf)))
        except BufferError:  # a run read into it earlier is still in use
            return bytearray(n)
    return buf


def _put(out: np.ndarray, at: int, stored: np.ndarray, dtype: str) -> None:
    """Stored values -> out[at:at+len] (float32/float64), decoded on the copy."""
    n = stored.shape[0]
    if dtype == "bfloat16":
        out[at:at + n] = (stored.astype(np.uint32) << 16).view(np.float32)
    else:
        out[at:at + n] = stored


@dataclass(frozen=True)
class RawRun:
    """A run of stored elements as fetched: whole inner chunks back to back (checksums already checked).

    ``vals``: [chunks, inner] in the stored dtype (a view of the fetched bytes, strided over each
    chunk's checksum); element i of the run is ``vals.flat``-order element ``skip + i``.
    """

    vals: np.ndarray
    skip: int  # elements of the first chunk before the run
    numel: int
    inner: int
    dtype: str

    def copy_to(self, a: int, b: int, out: np.ndarray) -> None:
        """Elements [a, b) of the run into ``out[:b - a]`` (any float dtype), decoded on the copy."""
        done = 0
        while a + done < b:
            j, i = divmod(self.skip + a + done, self.inner)
            n = min(b - a - done, self.inner - i)
            _put(out, done, self.vals[j, i:i + n], self.dtype)
            done += n


class UnknownParameterError(DistEMAError, KeyError):
    """A parameter name that a snapshot does not hold; the message names the closest ones.

    A ``KeyError`` (what a dict lookup raises), printed as a sentence rather than a quoted key.
    """

    def __init__(self, name: str, snap_id: str, names: list[str]) -> None:
        import difflib

        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        super().__init__(f"no parameter {name!r} in snapshot {snap_id}; {hint}it has {len(names)} parameters "
                         f"(store.params(snap) lists them, or dist-ema inspect STORE)")

    def __str__(self) -> str:
        return str(self.args[0])


def open_store(url: str, storage_options: dict | None = None) -> SnapshotStore:
    """Open a dist-ema snapshot store for reading (local path, file://, s3://, any fsspec URL)."""
    return SnapshotStore(url, storage_options)
