"""Shards on S3 as multipart uploads with parts in flight (store/multipart.py), on moto and SeaweedFS.

The object's bytes are checked against a reference encoding made here from the format's
description (inner chunks padded with NaN, each followed by its crc32c from google-crc32c,
then the index and its crc32c) and against the local-file writer; a failed part must leave no
object and no open upload behind.
"""

from __future__ import annotations

import contextlib
import math
import struct
import threading

import google_crc32c
import numpy as np
import pytest
import torch

from dist_ema import PostHocEMA, open_store
from dist_ema.config import ConfigError, load_config
from dist_ema.store.format import geometry
from dist_ema.store.fs import StoreError, StoreIO
from dist_ema.store.io import write_shard
from dist_ema.store.multipart import MAX_PARTS, UploadConfig, part_bytes_for

MiB = 2**20


def _crc(data: bytes) -> bytes:
    return struct.pack("<I", google_crc32c.value(bytes(data)))


def reference_shard(values: np.ndarray, inner: int) -> bytes:
    """A version-2 shard of float32 values, encoded plainly: chunks of ``inner`` values (NaN-padded) + crc32c, index."""
    out, entries = [], []
    off = 0
    for a in range(0, len(values), inner):
        chunk = np.full(inner, np.nan, dtype="<f4")
        part = values[a:a + inner]
        chunk[: len(part)] = part
        raw = chunk.tobytes()
        out += [raw, _crc(raw)]
        entries.append((off, len(raw) + 4))
        off += len(raw) + 4
    index = np.asarray(entries, dtype="<u8").tobytes()
    return b"".join(out) + index + _crc(index)


def _uploads(fs, bucket: str) -> list:
    return fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])


def _etag(io: StoreIO, key: str) -> str:
    return str(io.fs.info(io.path(key), refresh=True)["ETag"]).strip('"')


# ----------------------------------------------------------------------------- planning (pure)


def test_part_size_grows_to_stay_within_10000_parts() -> None:
    part = 16 * MiB
    assert part_bytes_for(1, part) == part
    assert part_bytes_for(part * MAX_PARTS, part) == part  # exactly 10,000 parts
    grown = part_bytes_for(part * MAX_PARTS + 1, part)
    assert grown == 17 * MiB  # the next whole MiB
    for size in (part * MAX_PARTS + 1, 300 * 2**30, 5 * 2**40):
        p = part_bytes_for(size, part)
        assert math.ceil(size / p) <= MAX_PARTS, size
        assert p % MiB == 0 and math.ceil(size / (p - MiB)) > MAX_PARTS, size  # the smallest such size
    assert part_bytes_for(100, 5 * MiB, max_parts=3) == 5 * MiB
    assert part_bytes_for(20 * MiB, 5 * MiB, max_parts=3) == 7 * MiB


def test_parts_are_about_equal_and_never_above_the_setting() -> None:
    """An object just above a part goes up as equal parts, not a full part and a tiny one."""
    assert part_bytes_for(33 * MiB, 16 * MiB) == 11 * MiB  # 11 + 11 + 11, not 16 + 16 + 1
    assert part_bytes_for(32 * MiB + 1028, 32 * MiB) == 17 * MiB  # 17 + 15, not 32 + 1028 bytes
    assert part_bytes_for(5 * MiB + 4, 5 * MiB) == 5 * MiB  # never below S3's 5 MiB
    rng = np.random.default_rng(0)
    for size in rng.integers(1, 2**34, 300).tolist() + [16 * MiB * k + d for k in (1, 2, 3) for d in (-1, 0, 1)]:
        for part in (5 * MiB, 16 * MiB, 64 * MiB):
            p = part_bytes_for(size, part)
            parts = math.ceil(size / p)
            assert p >= 5 * MiB and parts <= MAX_PARTS
            assert p <= part and parts == max(1, math.ceil(size / part)), (size, part, p)


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("key", "value", "words"), [
    ("upload_part_bytes", 4 * MiB, r"upload_part_bytes must be an integer >= 5242880 .*5 MiB is S3's smallest"),
    ("upload_part_bytes", 6 * 2**30, r"upload_part_bytes must be at most 5368709120 \(5 GiB"),
    ("upload_part_bytes", "16777216", r"upload_part_bytes must be an integer.*drop the quotes"),
    ("upload_concurrency", 0, r"upload_concurrency must be an integer >= 1 \(parts in flight per rank\)"),
    ("upload_concurrency", 65, r"upload_concurrency must be at most 64"),
    ("upload_concurrency", 2.0, r"upload_concurrency must be an integer"),
])
def test_bad_upload_settings_are_refused(tmp_path, key: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        PostHocEMA(torch.nn.Linear(3, 2), store=str(tmp_path / "s"), writer="sync", **{key: value})
    path = tmp_path / "c.toml"
    path.write_text(f"[dist_ema]\n{key} = {value!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match=f"dist_ema.{words}"):
        load_config(path)


# ----------------------------------------------------------------------------- bytes on both servers


def test_a_shard_of_several_parts_is_the_reference_encoding(s3_backend, tmp_path) -> None:
    """18 MiB in 5 MiB parts, 3 in flight: one object, the same bytes as the plain encoding and the local writer."""
    _, _, bucket = s3_backend
    io = StoreIO(f"s3://{bucket}/mp")
    numel = 4_500_001
    vals = np.random.default_rng(1).standard_normal(numel).astype(np.float32)
    g = geometry(numel, "float32", 2**20)
    # part 1 is held until parts 2 and 3 are in flight too: the parts really overlap, and never more than 3
    real, lock = io.fs.call_s3, threading.Lock()
    both, flying, most = threading.Event(), set(), [0]

    def call(method, *args, **kwargs):
        k = kwargs.get("PartNumber")
        if method != "upload_part":
            return real(method, *args, **kwargs)
        with lock:
            flying.add(k)
            most[0] = max(most[0], len(flying))
            if {2, 3} <= flying:
                both.set()
        try:
            if k == 1:
                assert both.wait(60), "parts 2 and 3 never went up while part 1 was in flight"
            return real(method, *args, **kwargs)
        finally:
            with lock:
                flying.discard(k)

    with _wrapped(io.fs, call):
        n = write_shard(io, "r0/c/0", vals, g, upload=UploadConfig(part_bytes=5 * MiB, concurrency=3))
    assert both.is_set() and most[0] == 3
    got = io.fs.cat_file(io.path("r0/c/0"))
    ref = reference_shard(vals, g.inner)
    assert n == len(got) == len(ref) == g.shard_bytes
    assert got == ref
    local = StoreIO(str(tmp_path / "local"))
    write_shard(local, "r0/c/0", vals, g)
    assert (tmp_path / "local" / "r0" / "c" / "0").read_bytes() == got
    # the way shards went to S3 before: through an s3fs file object (write_shard's path for other fsspec backends)
    before = StoreIO(f"s3://{bucket}/mp")
    before.protocol = "any-fsspec-backend"
    write_shard(before, "r0/c/old", vals, g, upload=UploadConfig(part_bytes=5 * MiB, concurrency=3))
    assert io.fs.cat_file(io.path("r0/c/old")) == got
    assert _etag(io, "r0/c/0").endswith(f"-{math.ceil(len(ref) / (5 * MiB))}")  # a multipart object of 4 parts
    assert _uploads(io.fs, bucket) == []


@pytest.mark.parametrize("compression", ["zstd", "blosc-lz4"])
def test_a_compressed_shard_of_several_parts_is_what_the_local_writer_writes(s3_backend, tmp_path,
                                                                              compression: str) -> None:
    _, _, bucket = s3_backend
    io = StoreIO(f"s3://{bucket}/mpz")
    numel = 3_000_000
    rng = np.random.default_rng(2)
    vals = (rng.standard_normal(numel) * 1e-3).astype(np.float32)  # compresses a little, not much
    g = geometry(numel, "float32", 2**20, compression)
    write_shard(io, "k", vals, g, upload=UploadConfig(part_bytes=5 * MiB, concurrency=2))
    local = StoreIO(str(tmp_path / "local"))
    n_local = write_shard(local, "k", vals, g)
    got = io.fs.cat_file(io.path("k"))
    assert got == (tmp_path / "local" / "k").read_bytes() and len(got) == n_local
    assert n_local > 5 * MiB and "-" in _etag(io, "k")  # more than one part: multipart


def test_a_shard_up_to_one_part_is_one_put(s3_backend) -> None:
    """Up to one part: a plain PUT. One element more than exactly one part: two parts, the last of 4 bytes."""
    _, _, bucket = s3_backend
    io = StoreIO(f"s3://{bucket}/one")
    exact = (5 * MiB - 4 - 16 - 4) // 4  # one chunk: values, its crc32c, one index entry and the index's crc32c
    for numel, parts in ((1, None), (1000, None), (exact, None), (exact + 1, 2)):
        vals = np.arange(numel, dtype=np.float32)
        g = geometry(numel, "float32", 8 * MiB)
        key = f"n{numel}"
        write_shard(io, key, vals, g, upload=UploadConfig(part_bytes=5 * MiB, concurrency=2))
        got = io.fs.cat_file(io.path(key))
        assert got == reference_shard(vals, g.inner), numel
        etag = _etag(io, key)
        assert etag.endswith(f"-{parts}") if parts else "-" not in etag, (numel, etag)
        assert len(got) == 5 * MiB + (4 if parts else 0) if numel >= exact else True
    assert _uploads(io.fs, bucket) == []


# ----------------------------------------------------------------------------- failures


@contextlib.contextmanager
def _wrapped(fs, call):
    """``fs.call_s3`` is ``call`` inside the block (the filesystem instance is shared: s3fs caches it)."""
    fs.call_s3 = call
    try:
        yield
    finally:
        del fs.call_s3  # the class's method again


@contextlib.contextmanager
def _failing(fs, fail):
    """Inside the block, ``fail(method, kwargs)`` runs before every ``fs.call_s3`` and may raise; yields the calls
    made (method, part number)."""
    real = fs.call_s3
    calls = []

    def call(method, *args, **kwargs):
        calls.append((method, kwargs.get("PartNumber")))
        fail(method, kwargs)
        return real(method, *args, **kwargs)

    with _wrapped(fs, call):
        yield calls


def test_a_part_that_fails_aborts_the_upload_and_names_the_key(s3_backend) -> None:
    _, _, bucket = s3_backend
    io = StoreIO(f"s3://{bucket}/fail")

    def fail(method, kw):
        if method == "upload_part" and kw["PartNumber"] == 2:
            raise OSError(22, "refused by the test")  # permanent: not retried

    vals = np.ones(4_500_001, dtype=np.float32)
    with _failing(io.fs, fail) as calls, pytest.raises(
            StoreError, match=r"write s3://.*/fail/snapshots/x/c/0 failed at part 2 .*refused by the test"
                              r".*upload was aborted, so no object was written"):
        write_shard(io, "snapshots/x/c/0", vals, geometry(vals.size, "float32"),
                    upload=UploadConfig(part_bytes=5 * MiB, concurrency=2))
    assert ("abort_multipart_upload", None) in calls and ("complete_multipart_upload", None) not in calls
    assert calls.count(("upload_part", 2)) == 1
    io.fs.invalidate_cache()
    assert not io.fs.exists(io.path("snapshots/x/c/0"))
    assert io.fs.find(io.path("")) == []
    assert _uploads(io.fs, bucket) == []


def test_a_failed_complete_aborts_the_upload(s3_backend) -> None:
    _, _, bucket = s3_backend
    io = StoreIO(f"s3://{bucket}/failc")

    def fail(method, kw):
        if method == "complete_multipart_upload":
            raise OSError(22, "complete refused by the test")

    vals = np.ones(2_000_000, dtype=np.float32)
    with _failing(io.fs, fail), pytest.raises(StoreError, match=r"failc/k failed after 2 parts .*complete refused"):
        write_shard(io, "k", vals, geometry(vals.size, "float32"), upload=UploadConfig(5 * MiB, 4))
    io.fs.invalidate_cache()
    assert not io.fs.exists(io.path("k"))
    assert _uploads(io.fs, bucket) == []


def test_a_transient_part_failure_is_retried_by_itself(s3_backend) -> None:
    _, _, bucket = s3_backend
    io = StoreIO(f"s3://{bucket}/retry")
    failed = []

    def fail(method, kw):
        if method == "upload_part" and kw["PartNumber"] == 3 and not failed:
            failed.append(3)
            raise ConnectionResetError(104, "connection reset by the test")  # transient: retried

    vals = np.random.default_rng(3).standard_normal(4_500_001).astype(np.float32)
    g = geometry(vals.size, "float32")
    with _failing(io.fs, fail) as calls:
        write_shard(io, "k", vals, g, upload=UploadConfig(5 * MiB, 2))
    assert [c for c in calls if c[0] == "create_multipart_upload"] == [("create_multipart_upload", None)]
    assert sorted(p for m, p in calls if m == "upload_part") == [1, 2, 3, 3, 4]  # only part 3 again
    assert io.fs.cat_file(io.path("k")) == reference_shard(vals, g.inner)


# ----------------------------------------------------------------------------- through the writer process


def test_the_settings_reach_the_writer_process(s3_env) -> None:
    """upload_part_bytes = 5 MiB: the writer process sends each 6.4 MiB shard in 2 parts; the defaults: one PUT."""
    _, bucket = s3_env
    torch.manual_seed(0)
    model = torch.nn.Linear(1600, 1000)  # 1.6M values: 6.4 MiB per profile
    for sub, settings, dash in (("a", {"upload_part_bytes": 5 * MiB, "upload_concurrency": 2}, "-2"), ("b", {}, None)):
        url = f"s3://{bucket}/{sub}"
        with PostHocEMA(model, sigma_rels=(0.05, 0.1), store=url, **settings) as ema:
            ema.update()
            ema.snapshot()
            want = ema.full_state_dict(sigma_rel=0.05)["weight"]
        store = open_store(url)
        snap = store.snapshots()[-1]
        assert torch.equal(store.read(snap.step, 0.05, "weight"), want)
        io = StoreIO(url)
        shards = [k for k in io.fs.find(io.path("snapshots")) if "/c/" in k]
        assert len(shards) == 2, shards
        for k in shards:
            etag = str(io.fs.info(k)["ETag"]).strip('"')
            assert etag.endswith(dash) if dash else "-" not in etag, (sub, k, etag)


# ----------------------------------------------------------------------------- a writer stopped mid-upload


def test_cleanup_of_a_torn_snapshot_aborts_the_uploads_a_stopped_writer_left(s3_backend) -> None:
    """Parts of a killed writer's upload are stored though never visible: removing its torn attempt aborts them.

    The attempt of a job that may still run keeps its upload (it may complete it yet).
    """
    from dist_ema.store.io import remove_torn_attempts, remove_torn_snapshot

    _, _, bucket = s3_backend
    io = StoreIO(f"s3://{bucket}/store")

    def started(key: str) -> str:  # an upload with one part, never completed: what a killed writer leaves
        _, k, _ = io.fs.split_path(io.path(key))
        up = io.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=k)["UploadId"]
        io.fs.call_s3("upload_part", Bucket=bucket, Key=k, UploadId=up, PartNumber=1, Body=bytes(5 * MiB))
        return k

    for attempt in ("000005/jdead", "000005/jlive", "000006/jdead2", "000007/jdone"):
        io.put(f"snapshots/step-000000{attempt}/r00001/zarr.json", b"{}")  # another rank's data, written
    dead = started("snapshots/step-000000000005/jdead/r00000/c/0")
    live = started("snapshots/step-000000000005/jlive/r00000/c/0")
    other = started("snapshots/step-000000000006/jdead2/r00000/c/0")
    committed = started("snapshots/step-000000000007/jdone/r00000/c/0")  # the marker's own attempt: untouched
    assert len(_uploads(io.fs, bucket)) == 4

    removed, kept = remove_torn_snapshot(io, "step-000000000005", lambda job: "running" if job == "jlive" else None)
    assert removed == ["snapshots/step-000000000005/jdead"] and list(kept) == ["snapshots/step-000000000005/jlive"]
    assert sorted(u["Key"] for u in _uploads(io.fs, bucket)) == sorted([live, other, committed])
    assert remove_torn_attempts(io, "step-000000000006", None)[0] == ["snapshots/step-000000000006/jdead2"]
    assert remove_torn_attempts(io, "step-000000000007", "jdone") == ([], {})
    assert sorted(u["Key"] for u in _uploads(io.fs, bucket)) == sorted([live, committed])
    assert dead not in str(io.fs.find(io.path("")))
