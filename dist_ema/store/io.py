"""Store I/O: write a rank's snapshot data, commit a snapshot, clean up, delete (NumPy, no torch, no zarr).

These functions run in the background writer process (or inline in ``sync`` mode) and
in synthesis. Each writes only objects that belong to its caller (see format.py for the
keys and who writes what), so no two ranks ever write the same object, and no job ever
writes into another job's attempt folder: committed bytes are never written again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dist_ema.store.format import (
    COMMIT,
    COMPRESSIONS,
    FORMAT_VERSION,
    NAN_FILL,
    OWNER,
    READABLE_VERSIONS,
    STORE_MARKER,
    Geometry,
    array_doc,
    buffers_key,
    bytes_array_doc,
    commit_key,
    compressor,
    crc_bytes,
    data_prefix,
    encode_index,
    group_doc,
    job_key,
    np_dtype,
    rank_key,
    shard_key,
    step_of,
)
from dist_ema.store.fs import StoreError, StoreIO, retry
from dist_ema.store.layout import Layout
from dist_ema.store.multipart import UploadConfig, abort_uploads, upload_pieces

__all__ = [
    "COMPRESSIONS",
    "Ranges",
    "commit_snapshot",
    "ensure_store",
    "list_snapshot_dirs",
    "remove_leftovers",
    "remove_snapshot",
    "remove_torn_snapshot",
    "write_buffers",
    "write_layout",
    "write_rank_data",
    "write_shard",
]

log = logging.getLogger("dist_ema")


def write_shard(io: StoreIO, key: str, values: np.ndarray, g: Geometry, *, durable: bool = False,
                upload: UploadConfig | None = None) -> int:
    """Write one version-2 shard (inner chunks, each with its crc32c, then the index) as ONE object.

    ``values``: the ``g.numel`` stored values (1-d, on-disk dtype), read in place (no copy but
    the padded last chunk). On S3 a shard above one part goes up as a multipart upload with
    ``upload.concurrency`` parts in flight (store/multipart.py; the same bytes either way).
    ``durable``: a local file is fsynced before this returns (snapshots: the marker must never
    outlive its data). Returns bytes.
    """
    if values.ndim != 1 or values.size != g.numel or values.dtype != np_dtype(g.dtype):
        raise ValueError(f"write_shard: need {g.numel} values of {np_dtype(g.dtype)}, got {values.dtype} "
                         f"{values.shape}")
    comp = compressor(g.compression, g.dtype)
    fill = np.array(NAN_FILL[g.dtype], dtype=np_dtype(g.dtype))
    upload = upload or UploadConfig()

    def pieces():
        """The shard's bytes in order: each inner chunk, its crc32c; then the index."""
        entries, off = [], 0
        for i in range(g.count):
            a, b = g.chunk_span(i)
            part = values[a:b]
            if b - a < g.inner:
                part = np.concatenate([part, np.full(g.inner - (b - a), fill, dtype=part.dtype)])
            raw = memoryview(np.ascontiguousarray(part)).cast("B")
            if comp is not None:
                raw = memoryview(comp.encode(raw))
            yield raw
            yield crc_bytes(raw)
            entries.append((off, len(raw) + 4))
            off += len(raw) + 4
        yield encode_index(entries)

    path = io.path(key)
    if io.protocol == "s3":
        return upload_pieces(io, key, pieces(), _shard_bytes_bound(g), upload)
    if io.protocol == "file":
        def do() -> int:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                n = sum(f.write(p) for p in pieces())
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
                return n
    else:
        def do() -> int:
            n = 0
            with io.fs.open(path, "wb", block_size=upload.part_bytes) as f:
                for p in pieces():
                    f.write(p)
                    n += len(p)
            return n

    return retry(do, f"write {io.url}/{key}", io.attempts)


def _shard_bytes_bound(g: Geometry) -> int:
    """At least the bytes of a shard: exact uncompressed; compressed, a chunk's worst case is its raw size plus
    1/128 and 1 KiB (zstd's bound is 1/256 and a few hundred bytes, blosc's 16 bytes)."""
    if g.compression is None:
        return g.shard_bytes
    raw = g.inner * g.itemsize
    return g.count * (raw + raw // 128 + 1024 + 4) + g.index_bytes


def write_rank_data(io: StoreIO, prefix: str, rank: int, data: np.ndarray, g: Geometry,
                    upload: UploadConfig | None = None) -> int:
    """A rank's data of every profile (``data``: [profiles, numel]): one shard per profile, then zarr.json."""
    n = 0
    for k in range(data.shape[0]):
        n += write_shard(io, shard_key(prefix, rank, k), data[k], g, durable=True, upload=upload)
    io.put(f"{rank_key(prefix, rank)}/zarr.json", array_doc(data.shape[0], g, {"rank": rank}))
    return n


def write_buffers(io: StoreIO, prefix: str, raw: bytes) -> None:
    """The packed buffers of a snapshot: one uint8 array in one chunk with its crc32c."""
    io.put(f"{buffers_key(prefix)}/c/0", raw + crc_bytes(raw), durable=True)
    io.put(f"{buffers_key(prefix)}/zarr.json", bytes_array_doc(len(raw)))


class Ranges:
    """Byte ranges of objects read into caller buffers (local files: ``preadv`` on cached descriptors).

    Thread-safe: reader threads share one instance.
    """

    def __init__(self, io: StoreIO, max_open: int = 256) -> None:
        self.io = io
        self._fds: dict[str, int] = {}
        self._max_open = max_open
        self._lock = threading.Lock()

    def _fd(self, key: str) -> int:
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                if len(self._fds) >= self._max_open:
                    for old in list(self._fds)[: self._max_open // 2]:
                        os.close(self._fds.pop(old))
                fd = os.open(self.io.path(key), os.O_RDONLY)  # FileNotFoundError: missing object
                self._fds[key] = fd
            return fd

    def read_into(self, key: str, start: int, buf: memoryview) -> None:
        """Fill ``buf`` with the object's bytes [start, start + len(buf)); a short object is an error."""
        want = len(buf)
        if self.io.protocol == "file":
            fd = self._fd(key)
            got = 0
            while got < want:
                n = os.preadv(fd, [buf[got:]], start + got)
                if n == 0:
                    raise TruncatedObjectError(f"{self.io.url}/{key}", start + got, f"at least {start + want}")
                got += n
            return
        path = self.io.path(key)
        try:
            data = retry(lambda: self.io.fs.cat_file(path, start=start, end=start + want),
                         f"read {self.io.url}/{key}", self.io.attempts)
        except OSError as e:  # a range that starts past the end is refused (416 InvalidRange), not answered short
            if isinstance(e, (FileNotFoundError, StoreError)):
                raise
            size = self.size(key)
            if start + want <= size:
                raise
            raise TruncatedObjectError(f"{self.io.url}/{key}", size, f"at least {start + want}") from e
        if len(data) != want:
            raise TruncatedObjectError(f"{self.io.url}/{key}", start + len(data), f"at least {start + want}")
        buf[:] = data

    def size(self, key: str) -> int:
        if self.io.protocol == "file":
            return os.fstat(self._fd(key)).st_size
        path = self.io.path(key)
        return int(retry(lambda: self.io.fs.size(path), f"stat {self.io.url}/{key}", self.io.attempts))

    def get(self, key: str) -> bytes:
        if self.io.protocol == "file":
            n = self.size(key)
            buf = bytearray(n)
            self.read_into(key, 0, memoryview(buf))
            return bytes(buf)
        return self.io.get(key)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:  # descriptors of a reader dropped without close()
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class TruncatedObjectError(StoreError):
    """An object shorter than its format says.

    ``detail`` is the part without the object's name ("truncated: N bytes, expected M"), so
    that a reader can name the snapshot, rank and profile the object belongs to instead.
    """

    def __init__(self, where: str, size: int, expected: int | str) -> None:
        self.where, self.size, self.expected = where, size, expected
        self.detail = f"truncated: {size} bytes, expected {expected}"
        super().__init__(f"{where}: {self.detail}")

    def __reduce__(self):  # picklable with its arguments (errors cross process boundaries)
        return type(self), (self.where, self.size, self.expected)


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
        if int(doc.get("version", -1)) not in READABLE_VERSIONS:
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
    """Make a snapshot visible: its group metadata (in its attempt's folder), then the marker, last, create-only.

    The marker names the attempt (``meta["attempt"]``) whose data it commits. A marker that
    exists already (another job committed this step) is never replaced: this attempt's data
    stays uncommitted, and the committed snapshot is untouched.
    """
    attempt = meta.get("attempt")
    io.put(f"{data_prefix(snap, attempt)}/zarr.json", group_doc({"dist_ema": meta}))
    try:
        io.put(commit_key(snap), json.dumps(meta, indent=1).encode(), exclusive=True)
    except FileExistsError as e:
        raise StoreError(
            f"snapshot {snap} is already committed in {io.url} by another job: two jobs write the same store, or "
            f"a resumed job repeats steps. The committed snapshot is unchanged (this job's data went to its own "
            f"attempt folder {data_prefix(snap, attempt)}/, removed at the next start); use a new store URL, or "
            f"restore the EMA from the training checkpoint you restarted from"
        ) from e


def remove_torn_attempts(io: StoreIO, snap: str, committed_attempt: str | None,
                         may_run: Callable[[str], str | None] = lambda job: None) -> tuple[list[str], dict[str, str]]:
    """Owner only: remove attempt folders of ``snap`` that its marker does not name.

    An attempt of a job that may still be running (``may_run(job)`` says why) is kept: that
    job may commit it yet. Returns (removed keys, {kept key: why}).
    """
    removed, kept = [], {}
    for name in io.list_dir(f"snapshots/{snap}"):
        # attempts are job ids ("j..."): version 1's data next to the marker (r<rank>/, buffers/) never is
        if name in (COMMIT, "zarr.json") or name == committed_attempt or not name.startswith("j"):
            continue
        key = f"snapshots/{snap}/{name}"
        why = may_run(name)
        if why is not None:
            kept[key] = why
            continue
        io.remove(key)
        abort_uploads(io, key)  # a writer stopped mid-upload: its parts are stored, though never visible
        removed.append(key)
    return removed, kept


def remove_torn_snapshot(io: StoreIO, snap: str, may_run: Callable[[str], str | None]) -> tuple[list[str],
                                                                                              dict[str, str]]:
    """Owner only: remove what a snapshot without a marker holds, but the attempts of jobs that may still run.

    Child by child, never the folder as a whole: a job that may run can be writing into it
    (or commit it: a marker that appears after the listing is left alone). Returns (removed
    keys, {kept key: why}).
    """
    removed, kept = [], {}
    for name in io.list_dir(f"snapshots/{snap}"):
        key = f"snapshots/{snap}/{name}"
        if name == COMMIT:  # committed since it was listed as torn: no longer a leftover
            continue
        why = may_run(name) if name.startswith("j") else None  # version 1's torn data belongs to no job id
        if why is not None:
            kept[key] = why
            continue
        io.remove(key)
        abort_uploads(io, key)  # a writer stopped mid-upload: its parts are stored, though never visible
        removed.append(key)
    if io.protocol == "file" and not kept:
        with contextlib.suppress(OSError):  # only when empty: a job may have started a new attempt in it
            os.rmdir(io.path(f"snapshots/{snap}"))
    return removed, kept


def remove_leftovers(io: StoreIO, done: list[Committed], torn: list[str],
                     took_over: dict | None) -> tuple[list[str], dict[str, str]]:
    """Owner only, at start-up: remove uncommitted data, but that of jobs that may still run.

    Crash leftovers (snapshots without a marker, attempts no marker names) of a job that has
    stopped are never visible and are removed. A job that may still run (an owner taken over
    by force, or any job whose heartbeat is fresh; see :func:`job_may_run`) may yet commit its
    attempt: removing it would leave that marker without its data. Its attempts stay until a
    later start finds the job stopped. ``took_over``: what :func:`claim_store` returned.
    Returns (removed keys, {kept key: why}).
    """
    verdicts: dict[str, str | None] = {}

    def may_run(job: str) -> str | None:
        if job not in verdicts:
            verdicts[job] = job_may_run(io, job, took_over)
        return verdicts[job]

    removed, kept = [], {}
    for snap in torn:
        r, k = remove_torn_snapshot(io, snap, may_run)
        removed += r
        kept.update(k)
    for c in done:
        r, k = remove_torn_attempts(io, c.snap, c.meta.get("attempt"), may_run)
        removed += r
        kept.update(k)
    return removed, kept


def list_snapshot_dirs(io: StoreIO) -> list[str]:
    """Snapshot folders, committed or not, oldest step first: one listing (the backend pages through it)."""
    return sorted((n for n in io.list_dir("snapshots") if n.startswith("step-")), key=_step_key)


def _step_key(snap: str) -> tuple[int, str]:
    try:
        return step_of(snap), snap
    except ValueError:  # a folder named like no snapshot: its marker (if any) decides
        return -1, snap


def remove_snapshot(io: StoreIO, snap: str) -> None:
    """Delete a snapshot: the marker first (so readers stop seeing it at once), then the data."""
    io.remove(f"snapshots/{snap}/{COMMIT}")
    io.remove(f"snapshots/{snap}")


@dataclass
class Committed:
    snap: str
    meta: dict


def read_commits(io: StoreIO, snaps: list[str] | None = None) -> tuple[list[Committed], list[str]]:
    """Committed snapshots (sorted by step) and the names of torn ones (no marker).

    One listing of ``snapshots/`` (none when ``snaps`` names the folders) and one concurrent read
    of every marker.
    """
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


def read_commit(io: StoreIO, snap: str) -> Committed | None:
    """The marker of one snapshot folder (None: not committed): one read, no listing."""
    done, _ = read_commits(io, [snap])
    return done[0] if done else None


def newest_commit(io: StoreIO) -> Committed | None:
    """The newest committed snapshot (None: none): one listing, then the markers from the newest folder down.

    Markers are read in growing batches (1, 4, 16, ...) until a batch holds a committed one, so
    the torn folders of snapshots still being written cost a few reads, not one per snapshot.
    """
    names = list_snapshot_dirs(io)
    batch = 1
    while names:
        names, part = names[:-batch], names[-batch:]
        done, _ = read_commits(io, part)
        if done:
            return done[-1]
        batch = min(4 * batch, 256)
    return None


RETIRING = "retiring.json"  # a retirement's intent record: written create-only first, claims its folder
RETIRED = "retired.json"  # a retirement's record: written create-only once every snapshot is in its folder


def _claim_retirement(io: StoreIO, job: str, intent: dict) -> str:
    """A retirement folder of its own, ``retired/<job>-r<k>``: claimed by a create-only intent record.

    Never reused: every rollback of a job gets the next free k, and the claim is create-only,
    so no retirement ever writes into another's folder (their bytes are kept as they were).
    """
    taken = {n for n in io.list_dir("retired") if n.startswith(f"{job}-r")}
    k = len(taken) + 1
    for _ in range(1000):
        base = f"retired/{job}-r{k}"
        if base.rsplit("/", 1)[1] not in taken:
            try:
                io.put(f"{base}/{RETIRING}", json.dumps(intent, indent=1).encode(), exclusive=True)
                return base
            except FileExistsError:
                pass
        k += 1
    raise StoreError(f"{io.url}: no free retirement folder for job {job} (retired/{job}-r1 .. -r{k}); the store's "
                     f"retired/ folder is damaged")


def _copy_snapshot(io: StoreIO, snap: str, base: str) -> None:
    """Object stores: copy a snapshot's objects server-side into ``base``, its marker last.

    The marker last: a copy that holds a marker holds all of its data.
    """
    src, dst = io.path(f"snapshots/{snap}"), io.path(f"{base}/{snap}")
    files = retry(lambda: io.fs.find(src), f"list {io.url}/snapshots/{snap}", io.attempts)
    files.sort(key=lambda f: f.endswith(f"/{COMMIT}"))
    for f in files:
        rel = f[len(src):].lstrip("/")
        retry(lambda f=f, to=f"{dst}/{rel}": io.fs.copy(f, to), f"copy {f}", io.attempts)


def retire_snapshots(io: StoreIO, snaps: list[str], job: str, restored_step: int, reason: str) -> str:
    """Move committed snapshots of an abandoned trajectory to a folder of this retirement (owner only).

    Every retirement (every rollback, also several in one job) gets a folder of its own,
    ``retired/<job>-r<k>/``, claimed create-only by its intent record ``retiring.json`` before
    a byte is moved; nothing is ever written into another retirement's folder. Crash-safe in
    this order: the data is moved (a rename on local disks; on object stores a copy, each
    snapshot's marker last), then the record ``retired.json`` is written (create-only), then
    the originals are removed, marker first. A crash before the removal leaves the committed
    original (retired again, into a new folder, at the next restore); after it, at worst an
    uncommitted original, which start-up cleans up. Returns the key of the folder.
    """
    record = {"steps": sorted(step_of(s) for s in snaps), "snapshots": sorted(snaps),
              "restored_step": restored_step, "job": job, "reason": reason, "time": time.time()}
    base = _claim_retirement(io, job, record)
    for snap in snaps:
        if io.protocol == "file":
            os.rename(io.path(f"snapshots/{snap}"), io.path(f"{base}/{snap}"))  # atomic: the marker moves with its data
            io.fs.invalidate_cache()
        else:
            _copy_snapshot(io, snap, base)
    io.put(f"{base}/{RETIRED}", json.dumps(dict(record, time=time.time()), indent=1).encode(), exclusive=True)
    if io.protocol != "file":
        for snap in snaps:
            remove_snapshot(io, snap)
    return base


def read_retired(io: StoreIO) -> list[tuple[str, dict, list[Committed]]]:
    """Retired trajectories: (folder key, record, their snapshots' markers), oldest first.

    Every folder under ``retired/`` with a record: one per retirement (``<job>-r<k>``), and
    the one-per-job folders (``<job>``) of stores written before retirements had their own.
    """
    out = []
    for name in io.list_dir("retired"):
        base = f"retired/{name}"
        try:
            record = json.loads(io.get(f"{base}/{RETIRED}"))
        except FileNotFoundError:
            continue  # a retirement still being moved (or interrupted): see unfinished_retirements
        got = io.get_many([f"{base}/{s}/{COMMIT}" for s in record.get("snapshots", [])])
        snaps = [Committed(k.split("/")[-2], json.loads(v)) for k, v in got.items() if not isinstance(v, Exception)]
        out.append((base, record, sorted(snaps, key=lambda c: c.meta["step"])))
    return sorted(out, key=lambda x: x[1].get("time", 0))


def unfinished_retirements(io: StoreIO) -> list[str]:
    """Folders of retirements that were interrupted before their record (kept, never removed, not listed)."""
    names = io.list_dir("retired")
    got = io.get_many([f"retired/{n}/{RETIRED}" for n in names])
    return [f"retired/{n}" for n in names if isinstance(got[f"retired/{n}/{RETIRED}"], Exception)]


# ----------------------------------------------------------------------------- ownership
#
# One job owns a store at a time (docs/commit-protocol.md): ``owner.json`` is written
# create-only by the first job and removed by it at close(); ``jobs/<job>.json`` is that
# job's own record, rewritten by it (a heartbeat). Another job is refused at start-up; a dead
# owner is taken over only when asked (resume=True and the owner is provably gone: the same
# elastic/SLURM run restarted, its process gone on this host, or not seen for
# ``stale_after`` seconds; or resume="takeover"). The old owner, should it still run, is
# fenced: its writer checks the record before every commit.

STALE_AFTER = 600.0  # seconds without a heartbeat after which an owner counts as dead
HEARTBEAT_SECONDS = 60.0


def run_id() -> str | None:
    """The launcher's id of this run, the same across its restarts (torchrun elastic, SLURM)."""
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        v = os.environ.get(var)
        if v and v != "none":
            return f"{var}={v}"
    return None


def job_doc(job: str) -> bytes:
    import socket

    return json.dumps({"job": job, "host": socket.gethostname(), "pid": os.getpid(), "run": run_id(),
                       "last_seen": time.time()}).encode()


def read_owner(io: StoreIO) -> dict | None:
    try:
        return json.loads(io.get(OWNER))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise StoreError(f"the ownership record {io.url}/{OWNER} is corrupt ({e}); if no job writes this store, "
                         f"remove it") from e


def _why_dead(io: StoreIO, owner: dict) -> str | None:
    """Why the owner can be taken over under resume=True, or None while it may be alive."""
    import socket

    me = run_id()
    if me is not None and owner.get("run") == me:
        return f"it is an earlier start of this run ({me})"
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner.get("pid", -1)), 0)
        except ProcessLookupError:
            return f"its process {owner.get('pid')} on this host is gone"
        except (PermissionError, ValueError, OverflowError):
            pass
    seen = owner.get("started", 0.0)
    try:
        seen = max(seen, float(json.loads(io.get(job_key(owner["job"])))["last_seen"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        pass
    idle = time.time() - seen
    if idle > float(owner.get("stale_after", STALE_AFTER)):
        return f"it has not been seen for {idle:.0f} s"
    return None


def claim_store(io: StoreIO, job: str, resume: bool | str) -> dict | None:
    """Rank 0 at start-up: make ``job`` the store's owner. Returns the owner taken over (or None)."""
    import socket

    rec = {"job": job, "host": socket.gethostname(), "pid": os.getpid(), "run": run_id(), "started": time.time(),
           "stale_after": STALE_AFTER}
    doc = json.dumps(rec, indent=1).encode()
    try:
        io.put(OWNER, doc, exclusive=True)
        io.put(job_key(job), job_doc(job))
        return None
    except FileExistsError:
        pass
    cur = read_owner(io)
    if cur is None:  # released between our write and our read: try once more
        return claim_store(io, job, resume)
    if cur.get("job") == job:
        return None
    dead = _why_dead(io, cur) if resume else None
    why = dead if dead is not None or resume != "takeover" else "resume='takeover'"
    if why is None:
        seen = time.time() - float(cur.get("started", 0.0))
        raise StoreError(
            f"{io.url} is owned by another job ({cur.get('job')} on host {cur.get('host')}, pid {cur.get('pid')}, "
            f"started {seen:.0f} s ago; record {OWNER}): two jobs must never write one store. Use a new store "
            f"URL; if that job is dead, pass resume=True (it is taken over once it has not been seen for "
            f"{float(cur.get('stale_after', STALE_AFTER)):.0f} s, or at once when it was this run or this host) "
            f"or resume='takeover' to take the store over now"
        )
    io.remove(OWNER)
    try:
        io.put(OWNER, json.dumps(dict(rec, took_over=cur), indent=1).encode(), exclusive=True)
    except FileExistsError:
        raise StoreError(f"another job took over {io.url} at the same time as this one; two jobs must never "
                         f"write one store") from None
    io.put(job_key(job), job_doc(job))
    log.warning("dist-ema: took over %s from job %s (host %s, pid %s): %s", io.url, cur.get("job"),
                cur.get("host"), cur.get("pid"), why)
    # forced: nothing showed that the old owner stopped; its attempts stay (see job_may_run)
    return dict(cur, forced=dead is None, reason=why)


def _process_gone(doc: dict) -> bool:
    """True when the record's process ran on this host and is gone."""
    import socket

    if doc.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(doc.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError, TypeError):
        pass
    return False


def job_may_run(io: StoreIO, job: str, took_over: dict | None) -> str | None:
    """Why job ``job`` may still be running (so its uncommitted attempts must stay), or None once it cannot.

    A job may run while its heartbeat ``jobs/<job>.json`` is younger than ``STALE_AFTER`` and its
    process is not seen gone on this host, and the owner this start took over by force
    (``resume='takeover'`` without proof that it stopped) may run whatever its heartbeat says.
    A job without a heartbeat record released the store at its close (or its record was
    removed): it cannot commit any more. An unreadable record keeps the attempts (never remove
    what a live job may commit).
    """
    if took_over is not None and took_over.get("job") == job:
        if took_over.get("forced"):
            return "its store was taken over by force (resume='takeover') and it may still be running"
        return None  # taken over because it was shown to have stopped (see _why_dead)
    try:
        doc = json.loads(io.get(job_key(job)))
        seen = float(doc["last_seen"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        return f"its heartbeat record {job_key(job)} is unreadable ({type(e).__name__})"
    if _process_gone(doc):
        return None
    idle = time.time() - seen
    if idle > STALE_AFTER:
        return None
    return f"its heartbeat {job_key(job)} is {idle:.0f} s old (a job counts as stopped after {STALE_AFTER:.0f} s)"


def check_owner(io: StoreIO, job: str) -> None:
    """Fencing, before every commit: this job still owns the store."""
    cur = read_owner(io)
    if cur is None or cur.get("job") != job:
        by = "no job (the record was removed)" if cur is None else f"job {cur.get('job')} on {cur.get('host')}"
        raise StoreError(f"this job ({job}) no longer owns {io.url}: it is owned by {by}; nothing more is "
                         f"committed by this job. Stop it, or give it a store of its own")


def release_store(io: StoreIO, job: str) -> None:
    """At close(): give the store up (only if this job still owns it)."""
    cur = read_owner(io)
    if cur is not None and cur.get("job") == job:
        io.remove(OWNER)
    io.remove(job_key(job))
