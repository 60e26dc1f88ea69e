"""Stores of format version 2 (what users already have) stay readable, verifiable and synthesizable.

tests/fixtures/store-v2 was written by dist-ema at format version 2 with two layouts in one
store: FSDP2 on 3 ranks (steps 5, 10), then the same store resumed by FSDP2 on 2 ranks
(steps 15, 20); see tests/fixtures/make_v2_store.py. tests/fixtures/synth-v2 is that
version's synthesis of it. Every value is checked against a plain read of the fixture's
bytes (the shard objects of version 2: inner chunks of raw little-endian float32, each
followed by a crc32c, then the shard index), never against the reader.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dist_ema import PostHocEMA, open_store, synthesize

FIX = Path(__file__).parent / "fixtures"
STORE = FIX / "store-v2"
SYNTH = FIX / "synth-v2"
STEPS = [5, 10, 15, 20]
WORLD = {5: 3, 10: 3, 15: 2, 20: 2}
SIGMAS = (0.05, 0.2)


def _crc_ok(data: bytes, stored: bytes) -> bool:
    return google_crc32c.value(data) == struct.unpack("<I", stored)[0]


def _plain_shard(array_dir: Path, profile: int) -> np.ndarray:
    """One rank's data of one profile read straight from its shard object (every checksum checked here)."""
    doc = json.loads((array_dir / "zarr.json").read_text())
    numel = doc["shape"][1]
    outer = doc["chunk_grid"]["configuration"]["chunk_shape"][1]
    inner = doc["codecs"][0]["configuration"]["chunk_shape"][1]
    count = outer // inner
    path = array_dir / "c" / str(profile) / "0"
    raw = path.read_bytes()
    index_bytes = 16 * count + 4
    assert len(raw) == count * (4 * inner + 4) + index_bytes, f"fixture shard {path} has an unexpected size"
    index = raw[-index_bytes:]
    assert _crc_ok(index[:-4], index[-4:]), f"fixture shard index of {path} is damaged"
    entries = np.frombuffer(index[:-4], dtype="<u8").reshape(count, 2)
    parts = []
    for i, (off, nb) in enumerate(entries):
        assert (off, nb) == (i * (4 * inner + 4), 4 * inner + 4), f"{path}: chunk {i} not where expected"
        chunk = raw[off:off + nb]
        assert _crc_ok(chunk[:-4], chunk[-4:]), f"fixture chunk {i} of {path} is damaged"
        parts.append(np.frombuffer(chunk[:-4], dtype="<f4"))
    return np.concatenate(parts)[:numel]


def _commit(step: int) -> dict:
    return json.loads((STORE / "snapshots" / f"step-{step:012d}" / "commit.json").read_text())


def _plain_params(step: int, profile: int) -> dict[str, np.ndarray]:
    meta = _commit(step)
    data = STORE / "snapshots" / f"step-{step:012d}" / meta["attempt"]
    lay = STORE / "layouts" / meta["layout"]
    table = json.loads((lay / "params.json").read_text())["params"]
    full = {f: np.full(int(np.prod(s)), np.nan, dtype=np.float32) for f, s, _ in table}
    for r in range(meta["world_size"]):
        pieces = json.loads((lay / f"rank-{r:05d}.json").read_text())["pieces"]
        if not pieces:
            continue
        arr = _plain_shard(data / f"r{r:05d}", profile)
        for p, start, numel, off in pieces:
            full[table[p][0]][start:start + numel] = arr[off:off + numel]
    return {f: full[f].reshape(s) for f, s, _ in table}


def _plain_buffers(step: int) -> dict[str, np.ndarray]:
    meta = _commit(step)
    raw = (STORE / "snapshots" / f"step-{step:012d}" / meta["attempt"] / "buffers" / "c" / "0").read_bytes()
    assert _crc_ok(raw[:-4], raw[-4:])
    return {name: np.frombuffer(raw[off:off + nb], dtype=dtype).reshape(shape)
            for name, shape, dtype, off, nb in meta["buffers"]}


def test_v2_fixture_lists_and_verifies():
    store = open_store(str(STORE))
    snaps = store.snapshots()
    assert [s.step for s in snaps] == STEPS
    assert {s.meta["version"] for s in snaps} == {2}
    assert all(s.sigma_rels == SIGMAS for s in snaps)
    assert [s.world_size for s in snaps] == [WORLD[s] for s in STEPS]
    assert len({_commit(s)["layout"] for s in STEPS}) == 2
    for s in snaps:
        assert store.verify(s) == []


@pytest.mark.parametrize("step", STEPS)
def test_v2_fixture_reads_the_stored_bytes(step):
    store = open_store(str(STORE))
    for k, sigma_rel in enumerate(SIGMAS):
        plain = _plain_params(step, k)
        for name, want in plain.items():
            assert not np.isnan(want).any()
            got = store.read(step, sigma_rel, name)
            assert torch.equal(got, torch.from_numpy(want)), (step, sigma_rel, name)
    bufs = store.read_buffers(store.snapshot(step))
    plain = _plain_buffers(step)
    assert set(bufs) == set(plain) == {"scale"}
    assert np.array_equal(bufs["scale"], plain["scale"]) and np.array_equal(bufs["scale"], np.ones(1, np.float32))


def test_v2_fixture_synthesizes_the_same_values(tmp_path):
    """Today's synthesis of the v2 store equals version 2's own output and a brute-force weighted sum."""
    res = synthesize(str(STORE), sigma_rels=[0.10, 0.15], out=str(tmp_path / "out"), progress=False)
    meta = json.loads((SYNTH / "zarr" / "snapshots" / "step-000000000020" / "commit.json").read_text())
    X = np.asarray(meta["coefficients"], dtype=np.float64)
    rows = meta["rows"]
    assert res.snapshots == meta["snapshots"]
    plain = {(i, k): _plain_params(STEPS[i], k) for i, k in {tuple(r) for r in rows}}
    for j, s in enumerate((0.10, 0.15)):
        folder = f"sigma_rel-{s:.4f}"
        old = load_file(str(SYNTH / folder / "model.safetensors"))
        new = load_file(str(tmp_path / "out" / folder / "model.safetensors"))
        assert set(old) == set(new)
        for name in old:
            assert torch.equal(new[name], old[name]), (s, name)
            if name == "scale":
                continue
            brute = sum(X[row, j] * plain[tuple(rows[row])][name].astype(np.float64) for row in range(len(rows)))
            np.testing.assert_allclose(new[name].numpy(), brute, rtol=1e-6, atol=1e-7)


def test_v2_store_resumes_and_mixes_with_new_snapshots(tmp_path):
    """A job resuming on a version-2 store (a third world size) continues it and still reads the old snapshots."""
    from tests.engines import TinyNet

    url = tmp_path / "store"
    shutil.copytree(STORE, url)
    torch.manual_seed(0)
    model = TinyNet()
    with PostHocEMA(model, sigma_rels=SIGMAS, store=str(url), snapshot_every=5, resume=True,
                    buffers="copy", writer="sync") as ema:
        assert ema.step == 20
        for k, sigma_rel in enumerate(SIGMAS):
            state = ema.full_state_dict(sigma_rel=sigma_rel)
            for name, want in _plain_params(20, k).items():
                assert torch.equal(state[name], torch.from_numpy(want)), (sigma_rel, name)
        for _ in range(5):
            ema.update()
    store = open_store(str(url))
    assert [s.step for s in store.snapshots()] == STEPS + [25]
    for s in store.snapshots():
        assert store.verify(s) == []
    for step in STEPS:
        for k, sigma_rel in enumerate(SIGMAS):
            for name, want in _plain_params(step, k).items():
                assert torch.equal(store.read(step, sigma_rel, name), torch.from_numpy(want)), (step, name)
    res = synthesize(str(url), sigma_rels=[0.10], out=str(tmp_path / "out"), format="zarr", progress=False)
    assert len(res.snapshots) == 5
