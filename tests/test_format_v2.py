"""Store format version 2: one shard object per rank and profile, a crc32c per inner chunk, plain Zarr v3.

Values are checked against plain reads of the stored bytes (the shard layout of the
zarr sharding codec, decoded here by hand), against zarr-python and against tensorstore.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch

from dist_ema import PostHocEMA, open_store, synthesize
from dist_ema.store.format import geometry
from dist_ema.store.fs import StoreError, StoreIO
from dist_ema.store.io import write_shard
from dist_ema.store.multipart import UploadConfig
from tests.dist_harness import run_workers


def _plain_shard(path: Path, numel: int) -> np.ndarray:
    """A float32 shard decoded by hand: index at the end (offset, nbytes) per chunk, crc32c everywhere."""
    raw = path.read_bytes()
    # the index: n entries of two little-endian uint64 and a crc32c; n from the object's own size
    for n in range(1, len(raw) // 16 + 1):
        body = raw[len(raw) - 4 - 16 * n: len(raw) - 4]
        if google_crc32c.value(body) == struct.unpack("<I", raw[-4:])[0]:
            break
    else:
        raise AssertionError(f"{path}: no valid shard index")
    entries = np.frombuffer(body, dtype="<u8").reshape(n, 2)
    parts = []
    for off, nb in entries:
        chunk = raw[off: off + nb]
        assert google_crc32c.value(chunk[:-4]) == struct.unpack("<I", chunk[-4:])[0]
        parts.append(np.frombuffer(chunk[:-4], dtype="<f4"))
    return np.concatenate(parts)[:numel]


def _train(url: str, model: torch.nn.Module, steps: int = 6, every: int = 3, **kw) -> dict:
    torch.manual_seed(1)
    with PostHocEMA(model, sigma_rels=(0.05, 0.2), store=url, snapshot_every=every, writer="sync", **kw) as ema:
        for _ in range(steps):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
            ema.update()
        return {k: v.clone() for k, v in ema.full_state_dict(sigma_rel=0.05).items()}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(40, 60), torch.nn.Linear(60, 3))
    m.register_buffer("count", torch.arange(4, dtype=torch.int64))
    return m


def test_objects_bytes_and_plain_layout(tmp_path):
    url = str(tmp_path / "s")
    want = _train(url, _model(), buffers="copy", max_object_bytes=256)
    store = open_store(url)
    snap = store.snapshots()[-1]
    assert snap.version == 2 and snap.attempt is not None
    folder = tmp_path / "s" / "snapshots" / snap.id
    objects = [p for p in folder.rglob("*") if p.is_file()]
    ranks, profiles = 1, 2
    assert len(objects) <= ranks * (profiles + 1) + 4, sorted(str(p.relative_to(folder)) for p in objects)
    # the data: one object per profile, everything else is small metadata
    shards = sorted(folder.glob(f"{snap.attempt}/r00000/c/*/0"))
    assert len(shards) == profiles
    numel = sum(p.numel() for p in _model().parameters())
    data = numel * 4
    for p in shards:
        assert p.stat().st_size <= 1.01 * data or p.stat().st_size - data <= 24 * math.ceil(data / 256) + 4
    # the values: the first profile's shard decoded by hand equals the EMA the tracker held
    lay = json.loads((tmp_path / "s" / "layouts" / snap.layout_id / "rank-00000.json").read_text())
    params = json.loads((tmp_path / "s" / "layouts" / snap.layout_id / "params.json").read_text())["params"]
    flat = _plain_shard(shards[0], numel)
    for p, start, n, off in lay["pieces"]:
        name = params[p][0]
        assert torch.equal(torch.from_numpy(flat[off:off + n].copy()), want[name].reshape(-1)[start:start + n])
    assert np.array_equal(store.read_buffers(snap)["count"], np.arange(4))
    assert store.verify(snap) == []


@pytest.mark.parametrize("numel", [1, 5, 600, 4097, 262_145, 1_000_003])
def test_stored_bytes_within_one_percent(tmp_path, numel):
    """Overhead of a shard: 20 bytes per inner chunk (crc32c + index entry) + 4, padding below one element per chunk."""
    io = StoreIO(str(tmp_path))
    vals = np.random.default_rng(numel).standard_normal(numel).astype(np.float32)
    g = geometry(numel, "float32")
    n = write_shard(io, "x", vals, g)
    size = (tmp_path / "x").stat().st_size
    assert n == size == g.shard_bytes
    assert g.inner * g.count - numel < g.count  # padding: less than one element per chunk
    assert size - 4 * numel == 20 * g.count + 4 + 4 * (g.inner * g.count - numel)  # exactly: checksums, index, padding
    if 4 * numel >= 2400:
        assert size <= 1.01 * 4 * numel
    assert np.array_equal(_plain_shard(tmp_path / "x", numel), vals)


def test_partial_reads_fetch_only_their_chunks_and_check_them(tmp_path):
    url = str(tmp_path / "s")
    m = torch.nn.Linear(1000, 100)  # 100,100 elements in ~400 inner chunks of 1 KiB
    _train(url, m, steps=3, every=3, max_object_bytes=1024)
    store = open_store(url)
    snap = store.snapshots()[-1]
    g = store.geometry(snap, 0)
    lo, hi = 30_000, 70_000
    out = np.empty(hi - lo, dtype=np.float32)
    fetched = store.read_stored(snap, 0, 0, lo, hi, out)
    assert fetched / ((hi - lo) * 4) <= 1.02  # whole chunks at both ends, 4-byte checksums
    shard = next((tmp_path / "s" / "snapshots" / snap.id).glob("j*/r00000/c/0/0"))
    plain = _plain_shard(shard, g.numel)
    assert np.array_equal(out, plain[lo:hi])
    # damage one byte of chunk 10: reads elsewhere still work, reads of it fail naming the check
    raw = bytearray(shard.read_bytes())
    raw[g.dense_offset(10) + 5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    fresh = open_store(url)
    assert fresh.read_stored(snap, 0, 0, lo, hi, out) > 0
    with pytest.raises(StoreError, match="crc32c"):
        fresh.read_stored(snap, 0, 0, 10 * g.inner, 10 * g.inner + 3, np.empty(3, np.float32))
    assert any("crc32c" in p for p in fresh.verify(snap))


def test_compressed_shards_read_through_their_index(tmp_path):
    url = str(tmp_path / "s")
    want = _train(url, _model(), compression="zstd", max_object_bytes=512)
    store = open_store(url)
    snap = store.snapshots()[-1]
    assert snap.meta["compression"] == "zstd"
    for name, v in want.items():
        if name != "count":  # a buffer
            assert torch.equal(store.read(snap.step, 0.05, name), v)
    assert store.verify(snap) == []
    import zarr

    arr = zarr.open_array(str(tmp_path / "s" / snap.prefix / "r00000"), mode="r", zarr_format=3)
    assert arr.shape[0] == 2


def _worker_fsdp2(rank: int, world_size: int, out_dir: str, url: str) -> None:
    from tests.engines import build

    setup = build("fsdp2", seed=2)
    with PostHocEMA(setup.target, sigma_rels=(0.05, 0.2), store=url, snapshot_every=3, writer="sync",
                    max_object_bytes=64, buffers="copy") as ema:
        for _ in range(6):
            setup.step()
            ema.update()


@pytest.mark.dist
def test_every_array_opens_in_zarr_and_tensorstore(tmp_path):
    """FSDP2 on 3 ranks: every array of the store (and of a synthesis output) read by tensorstore and zarr."""
    ts = pytest.importorskip("tensorstore")
    import zarr

    url = str(tmp_path / "s")
    run_workers("tests.test_format_v2:_worker_fsdp2", 3, tmp_path / "w", kwargs={"url": url})
    synthesize(url, sigma_rels=[0.1, 0.15], out=str(tmp_path / "o"), format="zarr", progress=False)
    for root in (tmp_path / "s", tmp_path / "o"):
        store = open_store(str(root))
        arrays = 0
        for snap in store.snapshots():
            folder = root / "snapshots" / snap.id
            n = [p for p in folder.rglob("*") if p.is_file()]
            assert len(n) <= snap.world_size * (len(snap.gammas) + 1) + 4
            lay = store.layout(snap)
            for r in range(lay.world_size):
                numel = lay.rank_numel(r)
                path = root / snap.prefix / f"r{r:05d}"
                if numel == 0:
                    assert not path.exists()
                    continue
                t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result()
                tv = t.read().result()
                zv = zarr.open_array(str(path), mode="r", zarr_format=3)[...]
                assert tv.shape == (len(snap.gammas), numel) and np.array_equal(tv, zv)
                for k in range(len(snap.gammas)):
                    mine = np.empty(numel, dtype=np.float32)
                    store.read_stored(snap, r, k, 0, numel, mine)
                    assert np.array_equal(tv[k], mine)
                arrays += 1
            if snap.meta.get("buffers"):
                path = root / snap.prefix / "buffers"
                tb = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result()
                raw = tb.read().result().tobytes()
                name, shape, dtype, off, nb = snap.meta["buffers"][0]
                assert np.array_equal(np.frombuffer(raw[off:off + nb], dtype=dtype).reshape(shape),
                                      store.read_buffers(snap)[name])
        assert arrays > 0


def test_large_shard_is_one_s3_object_by_multipart(s3_env):
    """A shard above the part size goes up as one multipart object; ranged reads check it."""
    import dist_ema.store.io as sio

    _, bucket = s3_env
    url = f"s3://{bucket}/mp"
    io = StoreIO(url)
    numel = 3 * 2**20 + 17  # 12 MiB
    vals = np.random.default_rng(0).standard_normal(numel).astype(np.float32)
    g = geometry(numel, "float32")
    write_shard(io, "a/c/0/0", vals, g, upload=UploadConfig(part_bytes=5 * 2**20, concurrency=2))
    assert io.fs.ls(io.path("a/c/0"), detail=False) == [io.path("a/c/0/0")]
    assert io.fs.size(io.path("a/c/0/0")) == g.shard_bytes
    r = sio.Ranges(io)
    lo, hi = 2**20 + 5, 2**20 + 5 + 300_000
    out = np.empty(hi - lo, dtype=np.float32)
    nb = len(g.chunks_of(lo, hi)) * g.chunk_bytes
    buf = bytearray(nb)
    r.read_into("a/c/0/0", g.dense_offset(g.chunks_of(lo, hi)[0]), memoryview(buf))
    rows = np.frombuffer(buf, dtype=np.uint8).reshape(-1, g.chunk_bytes)
    data = rows[:, :-4].copy().view("<f4").reshape(-1)
    first = g.chunks_of(lo, hi)[0] * g.inner
    out[:] = data[lo - first: hi - first]
    assert np.array_equal(out, vals[lo:hi])
