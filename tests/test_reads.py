"""Reads sized for the storage: synthesis fetches a row's adjacent chunks in large ranged reads,
several in flight, ahead of the compute; ``ls --verify`` and piece reads stay within bounded reads.

Every result is checked against a plain read of the stored bytes or against the same call with
other read settings (read settings never change a bit of the output)."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
import torch

from dist_ema import PostHocEMA
from dist_ema.errors import ConfigError
from dist_ema.store import open_store
from dist_ema.store.format import shard_key
from dist_ema.store.io import Ranges
from dist_ema.store.layout import Unit, assign_units
from dist_ema.synthesis import BLOCK_BYTES, synthesize

INNER = 64 * 1024  # bytes per inner chunk of the test stores


def _store(url: str, features: int = 1024, snapshots: int = 3) -> str:
    """A store of one Linear(features, features) (4 MiB per profile at 1024), a snapshot every 2 updates."""
    torch.manual_seed(0)
    m = torch.nn.Linear(features, features, bias=False)
    with PostHocEMA(m, store=url, snapshot_every=2, writer="sync", inner_chunk_bytes=INNER) as ema:
        for i in range(2 * snapshots):
            with torch.no_grad():
                m.weight.add_(torch.randn_like(m.weight) * (0.1 + i))
            ema.update()
    return url


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    return _store(str(tmp_path_factory.mktemp("reads") / "store"), snapshots=5)  # 10 rows: 2 groups of rows


class _Recorder:
    """Ranges.read_into wrapped: every read's (key, start, bytes) and the most reads seen at once."""

    def __init__(self, monkeypatch, delay: float = 0.0) -> None:
        self.reads: list[tuple[str, int, int]] = []
        self.now = self.most = 0
        self.lock = threading.Lock()
        real = Ranges.read_into

        def read_into(ranges, key, start, buf):
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
                self.reads.append((key, start, len(buf)))
            try:
                if delay:
                    time.sleep(delay)  # reads that overlap in time show up as concurrent
                return real(ranges, key, start, buf)
            finally:
                with self.lock:
                    self.now -= 1

        monkeypatch.setattr(Ranges, "read_into", read_into)


def _outputs(out: str) -> dict[str, torch.Tensor]:
    st = open_store(out)
    return {n: st.read(None, 0.08, n) for n in st.params()}


def _plain(url: str, snap, rank: int, k: int) -> np.ndarray:
    """A rank array read plainly: the shard's bytes, chunk by chunk, checksums cut off."""
    st = open_store(url)
    g = st.geometry(snap, rank)
    raw = open(st.io.path(shard_key(snap.prefix, rank, k)), "rb").read()
    rows = np.frombuffer(raw[:g.count * g.chunk_bytes], dtype=np.uint8).reshape(g.count, g.chunk_bytes)
    return np.ascontiguousarray(rows[:, :g.inner * g.itemsize]).view(np.float32).reshape(-1)[:g.numel]


def test_assign_units_gives_each_rank_one_balanced_run():
    sizes = [5, 1, 7, 3, 3, 9, 2, 2, 8, 4, 6, 1]
    units = [Unit(r, 100 * i, n) for r in range(2) for i, n in enumerate(sizes)]
    order = sorted(units, key=lambda u: u.key)
    total = sum(u.numel for u in units)
    for world in range(1, 7):
        parts = assign_units(units, world)
        assert sorted((u for p in parts for u in p), key=lambda u: u.key) == order  # each unit exactly once
        flat = [u for p in parts for u in p]
        assert flat == order  # rank 0 takes the first run, rank 1 the next, ...: runs of adjacent units
        for p in parts:
            assert abs(sum(u.numel for u in p) - total / world) <= max(sizes)


def test_synthesis_reads_spans_in_large_reads_with_several_in_flight(store_url, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    synthesize(store_url, sigma_rels=[0.08], out=str(ref), format="zarr", progress=False, prefetch=1,
               read_bytes=BLOCK_BYTES)
    rec = _Recorder(monkeypatch, delay=0.02)
    res = synthesize(store_url, sigma_rels=[0.08], out=str(tmp_path / "big"), format="zarr", progress=False,
                     prefetch=3, read_bytes=2 * BLOCK_BYTES)
    st = open_store(store_url)
    snaps = st.snapshots()
    data = [(key, n) for key, _, n in rec.reads if "/c/" in key]
    chunk = INNER + 4
    assert data and max(n for _, n in data) <= 2 * BLOCK_BYTES + chunk  # never above read_bytes (+ one chunk)
    assert max(n for _, n in data) > BLOCK_BYTES + chunk  # adjacent blocks of a row come in one read
    assert 2 <= rec.most <= 3  # several reads in flight, never more than prefetch
    rows = sum(len(s.gammas) for s in snaps)
    need = rows * st.layout(snaps[-1]).total_numel * 4
    assert res.bytes_read <= 1.01 * need
    # read settings never change the output: bitwise equal to one block per read, one at a time
    a, b = _outputs(str(ref)), _outputs(str(tmp_path / "big"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # and the output is the weighted sum of the plain stored values
    X = np.asarray(open_store(str(tmp_path / "big")).snapshot().meta["coefficients"])  # [rows, 1]
    want = sum(X[i * 2 + k, 0] * _plain(store_url, s, 0, k).astype(np.float64) for i, s in enumerate(snaps)
               for k in range(2))
    got = b["weight"].numpy().reshape(-1).astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_object_store_defaults_read_large_and_concurrently(tmp_path, s3_env, monkeypatch):
    env, bucket = s3_env
    url = _store(f"s3://{bucket}/reads/store", features=512, snapshots=2)
    st = open_store(url)
    assert (st.read_bytes, st.prefetch) == (16 * 2**20, 8)  # the object-store defaults
    rec = _Recorder(monkeypatch, delay=0.05)
    out = str(tmp_path / "out")
    synthesize(url, sigma_rels=[0.08], out=out, format="zarr", progress=False)
    data = [n for key, _, n in rec.reads if "/c/" in key]
    rows = sum(len(s.gammas) for s in st.snapshots())
    assert len(data) == rows  # 1 MiB per profile: one read per row
    assert rec.most >= 2  # the rows' reads went out together
    local = _store(str(tmp_path / "local"), features=512, snapshots=2)
    synthesize(local, sigma_rels=[0.08], out=str(tmp_path / "lout"), format="zarr", progress=False)
    a, b = _outputs(out), _outputs(str(tmp_path / "lout"))
    assert all(torch.equal(a[n], b[n]) for n in a)  # the same bits from S3 as from local disk


def test_verify_and_piece_reads_stay_within_read_bytes(store_url, tmp_path, monkeypatch):
    store_url = str(shutil.copytree(store_url, tmp_path / "copy"))  # this test damages its store
    st = open_store(store_url)
    snap = st.snapshots()[-1]
    want = _plain(store_url, snap, 0, 1)
    full = st.read(snap.step, snap.sigma_rels[1], "weight").numpy().reshape(-1)
    rec = _Recorder(monkeypatch, delay=0.005)
    small = open_store(store_url)
    small.read_bytes, small.prefetch = 3 * INNER, 3  # three chunks per read, three reads at once
    assert small.verify(snap) == []
    data = [n for key, _, n in rec.reads if "/c/" in key]
    assert data and max(data) <= 3 * (INNER + 4)
    assert 2 <= rec.most <= 3
    assert len(data) >= 2 * -(-want.size * 4 // (3 * INNER))  # both profiles, in pieces
    got = small.read(snap.step, snap.sigma_rels[1], "weight").numpy().reshape(-1)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(full, want)
    # a damaged chunk in the middle is still found by the bounded verify
    path = st.io.path(shard_key(snap.prefix, 0, 1))
    raw = bytearray(open(path, "rb").read())
    raw[5 * (INNER + 4) + 17] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    problems = small.verify(snap)
    assert len(problems) == 1 and "inner chunk 5" in problems[0], problems


@pytest.mark.parametrize("kwargs", [dict(read_bytes=0), dict(prefetch=0), dict(prefetch=True),
                                    dict(read_bytes=2.5)])
def test_read_settings_are_checked(store_url, tmp_path, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=f"{name} must be an integer"):
        synthesize(store_url, sigma_rels=[0.08], out=str(tmp_path / "o"), progress=False, **kwargs)
    assert not (tmp_path / "o").exists()


def test_progress_bar_counts_bytes_with_an_eta(store_url, tmp_path, capsys):
    synthesize(store_url, sigma_rels=[0.08], out=str(tmp_path / "o"), format="zarr", progress=True)
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    st = open_store(store_url)
    need = sum(len(s.gammas) for s in st.snapshots()) * st.layout(st.snapshot()).total_numel * 4
    assert last.startswith("synthesize: 100%") and "iB/s" in last and "<" in last, last  # bytes, rate, ETA
    assert f"{need / 2**20:.1f}M/{need / 2**20:.1f}M" in last, (need, last)
