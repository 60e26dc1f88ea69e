"""One object on S3 from a stream of pieces: a single PUT, or a multipart upload with parts in flight.

A version-2 shard is produced in order (inner chunks, each followed by its crc32c, then the
index; store/io.py ``write_shard``) and sent as ONE object. Up to one part of bytes it is one
PUT. Larger, it is a multipart upload: a part is gathered as views of the pieces and joined
into one ``bytes`` when it is sent (S3 takes a part's body as one buffer, and a shard
interleaves data and 4-byte checksums; a 32 MiB ``bytes`` body went up ~20% faster than a
``bytearray`` on moto), up to ``concurrency`` parts are sent at a time, each retried by its own
error kind (:func:`dist_ema.store.fs.retry`), and the upload is completed with the parts' ETags
in order. Any failure aborts the upload: S3 shows an object only once it is completed, so a
failed write leaves nothing visible under its key. Memory: at most ``concurrency`` parts, and
aiohttp's copy of each one being sent (tracemalloc peak for a 256 MiB shard: 142 MiB with 16 MiB
parts x 4, 466 MiB with 52 MiB parts x 4; 201 MiB through an s3fs file object of 64 MiB blocks).

The part size is planned apart from the I/O (:func:`part_bytes_for`, pure): about equal parts
of at most the configured size, larger for objects that would need more than S3's 10,000 parts.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dist_ema.store.fs import StoreError, StoreIO, StoreUnreachableError, retry

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_PART_BYTES",
    "MAX_PART_BYTES",
    "MAX_PARTS",
    "MIN_PART_BYTES",
    "UploadConfig",
    "abort_uploads",
    "part_bytes_for",
    "upload_pieces",
]

log = logging.getLogger("dist_ema")

MiB = 2**20
MIN_PART_BYTES = 5 * MiB  # S3: every part but the last is at least this
MAX_PART_BYTES = 5 * 2**30  # S3: at most this per part
MAX_PARTS = 10_000  # S3: parts per upload
# Measured here (2 cores, loopback): one PUT of a 32 MiB shard ran at pipe_file's speed on moto, any multipart
# upload of it at 0.57-0.72x (moto assembles parts in Python); on SeaweedFS all were alike. So shards up to 64 MiB
# stay one PUT (as s3fs's 64 MiB write blocks had them); larger ones go up in parts of at most 64 MiB, 4 at a time.
DEFAULT_PART_BYTES = 64 * MiB
DEFAULT_CONCURRENCY = 4  # parts in flight per rank


@dataclass(frozen=True)
class UploadConfig:
    """How a rank sends a large object to an object store (checked by config.py's field checks)."""

    part_bytes: int = DEFAULT_PART_BYTES  # the largest part (see part_bytes_for); one PUT up to this
    concurrency: int = DEFAULT_CONCURRENCY  # parts in flight at a time


def part_bytes_for(size_bound: int, part_bytes: int, max_parts: int = MAX_PARTS) -> int:
    """The part size for an object of at most ``size_bound`` bytes: equal parts, none above ``part_bytes``.

    As many parts as ``part_bytes`` needs (at most ``max_parts``), each the object's share rounded up
    to whole MiB (at least S3's 5 MiB), so that an object just above a part does not end in a tiny
    part that goes up alone. An object that would need more than ``max_parts`` parts gets larger
    ones: the smallest whole number of MiB that needs at most ``max_parts``.

    Example:
        >>> part_bytes_for(33 * 2**20, 16 * 2**20) // 2**20  # 3 parts of 11 MiB, not 16 + 16 + 1
        11
        >>> part_bytes_for(300 * 2**30, 16 * 2**20) // 2**20  # 300 GiB: 16 MiB parts would be 19,200 parts
        31
    """
    if size_bound <= part_bytes:
        return part_bytes
    count = min(-(-size_bound // part_bytes), max_parts)
    share = -(-size_bound // (count * MiB)) * MiB
    return max(share, min(MIN_PART_BYTES, part_bytes))


class _Upload:
    """One multipart upload of ``path``: parts sent by a thread pool, ETags collected, completed or aborted."""

    def __init__(self, io: StoreIO, key: str, concurrency: int) -> None:
        self.io, self.key = io, key
        self.path = io.path(key)
        self.bucket, self.object_key, _ = io.fs.split_path(self.path)
        self.what = f"write {io.url}/{key}"
        out = retry(lambda: io.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.object_key),
                    self.what, io.attempts)
        self.upload_id = out["UploadId"]
        self.pool = cf.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="dist-ema-upload")
        self.pending: dict[cf.Future, int] = {}
        self.etags: dict[int, str] = {}
        self.parts = 0
        self.bytes = 0
        self.failed: int | None = None  # the number of a part that failed

    def _send(self, number: int, body: bytes) -> str:
        def do() -> Any:
            return self.io.fs.call_s3("upload_part", Bucket=self.bucket, Key=self.object_key, UploadId=self.upload_id,
                                      PartNumber=number, Body=body)

        return retry(do, f"{self.what} (part {number})", self.io.attempts)["ETag"]

    def submit(self, body: bytes) -> None:
        self.parts += 1
        self.bytes += len(body)
        self.pending[self.pool.submit(self._send, self.parts, body)] = self.parts

    def wait_one(self) -> None:
        """Wait for a part in flight to finish (a failed part raises)."""
        done, _ = cf.wait(self.pending, return_when=cf.FIRST_COMPLETED)
        for f in done:
            number = self.pending.pop(f)
            if f.exception() is not None:
                self.failed = number
            self.etags[number] = f.result()

    def complete(self) -> None:
        while self.pending:
            self.wait_one()
        parts = [{"PartNumber": k, "ETag": self.etags[k]} for k in range(1, self.parts + 1)]
        tries = 0

        def do() -> None:
            nonlocal tries
            tries += 1
            try:
                self.io.fs.call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.object_key,
                                   UploadId=self.upload_id, MultipartUpload={"Parts": parts})
            except Exception:
                if tries > 1 and self._completed_before():
                    return  # an earlier try completed it; its answer was lost
                raise

        retry(do, f"{self.what} (complete {self.parts} parts)", self.io.attempts)
        self.io.fs.invalidate_cache(self.path)
        self.pool.shutdown()

    def _completed_before(self) -> bool:
        try:
            info = self.io.fs.info(self.path, refresh=True)
        except Exception:  # noqa: BLE001 - not there (or not answerable): not completed
            return False
        return int(info.get("size", -1)) == self.bytes and str(info.get("ETag", "")).endswith(f'-{self.parts}"')

    def abort(self) -> None:
        """Stop sending, wait for the parts in flight, then abort the upload (its parts are dropped)."""
        for f in self.pending:
            f.cancel()
        cf.wait(self.pending)
        self.pool.shutdown()
        try:
            retry(lambda: self.io.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.object_key,
                                             UploadId=self.upload_id), f"abort the upload of {self.io.url}/{self.key}",
                  self.io.attempts)
        except Exception as e:  # noqa: BLE001 - the object is not visible either way; only its parts' storage stays
            log.warning("dist-ema: aborting the multipart upload %s of %s/%s failed (%s: %s): nothing is visible "
                        "under that key, but the uploaded parts are stored until the upload is aborted (an S3 "
                        "lifecycle rule for incomplete multipart uploads removes them)", self.upload_id,
                        self.io.url, self.key, type(e).__name__, e)


def upload_pieces(io: StoreIO, key: str, pieces: Iterable, size_bound: int, config: UploadConfig) -> int:
    """Write the bytes of ``pieces`` (bytes-like objects, in order) as the one S3 object ``key``; returns bytes.

    ``size_bound``: about the object's size, at least (plans the part size, see
    :func:`part_bytes_for`). The pieces are read once; failures are retried per request by
    their kind. A failure after the upload started aborts it and raises a StoreError naming the
    key (an access-denied PermissionError or StoreUnreachableError is raised as it is; both name
    it too): no object becomes visible.
    """
    part = part_bytes_for(size_bound, config.part_bytes)
    views: list[memoryview] = []  # the part being gathered: views of the pieces, joined when it is sent
    n = 0
    up: _Upload | None = None
    try:
        for piece in pieces:
            mv = memoryview(piece).cast("B")
            while len(mv):
                if n == part:  # a full part, and more bytes follow: send it
                    if up is None:
                        up = _Upload(io, key, config.concurrency)
                    if len(up.pending) >= config.concurrency:
                        up.wait_one()  # at most `concurrency` parts in memory
                    up.submit(b"".join(views))
                    views, n = [], 0
                take = min(len(mv), part - n)
                views.append(mv[:take])
                n += take
                mv = mv[take:]
        if up is None:  # up to one part: one PUT
            body = b"".join(views)
            path = io.path(key)
            bucket, object_key, _ = io.fs.split_path(path)
            retry(lambda: io.fs.call_s3("put_object", Bucket=bucket, Key=object_key, Body=body),
                  f"write {io.url}/{key}", io.attempts)
            io.fs.invalidate_cache(path)
            return n
        if n:
            up.submit(b"".join(views))
        up.complete()
        return up.bytes
    except BaseException as e:
        if up is None:
            raise
        up.abort()
        if isinstance(e, (PermissionError, StoreUnreachableError)) or not isinstance(e, Exception):
            raise
        where = f"at part {up.failed}" if up.failed is not None else f"after {up.parts} parts"
        raise StoreError(f"write {io.url}/{key} failed {where} ({type(e).__name__}: {e}); its multipart "
                         f"upload was aborted, so no object was written under that key") from e


def abort_uploads(io: StoreIO, key: str) -> list[str]:
    """Abort the open multipart uploads of objects under the folder ``key`` (S3; elsewhere none); returns their keys.

    What a writer stopped mid-upload (killed, its machine gone) leaves behind: never visible as
    an object, but its parts are stored until the upload is aborted. Only for folders whose
    writer can no longer run (torn attempts at start-up): a live upload aborted fails its write.
    """
    if io.protocol != "s3":
        return []
    bucket, prefix, _ = io.fs.split_path(io.path(key))
    prefix = prefix.rstrip("/") + "/"
    aborted: list[str] = []
    marker: dict = {}
    while True:
        page = retry(lambda m=marker: io.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **m),
                     f"list the open uploads under {io.url}/{key}", io.attempts)
        for u in page.get("Uploads", []):
            retry(lambda u=u: io.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=u["Key"],
                                            UploadId=u["UploadId"]),
                  f"abort the upload of {io.url}/{u['Key']}", io.attempts)
            aborted.append(u["Key"])
        if not page.get("IsTruncated"):
            return aborted
        marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
