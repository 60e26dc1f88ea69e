"""Stores of format version 1 (what users already have) stay readable, verifiable and synthesizable.

tests/fixtures/store-v1 was written by dist-ema at format version 1 (FSDP2 on 3 ranks; see
tests/fixtures/make_v1_store.py) and tests/fixtures/synth-v1 is that version's synthesis of
it. Every value is checked against a plain read of the fixture's bytes (the zarr chunk files
of version 1: raw little-endian float32 followed by a crc32c), never against the reader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dist_ema import PostHocEMA, open_store, synthesize

FIX = Path(__file__).parent / "fixtures"
STORE = FIX / "store-v1"
SYNTH = FIX / "synth-v1"
STEPS = [5, 10, 15, 20]


def _plain_rank_array(snap_dir: Path, rank: int, profile: int) -> np.ndarray:
    """A rank array of version 1 read straight from its chunk files (checksums checked here)."""
    folder = snap_dir / f"r{rank:05d}" / f"p{profile}" / "c"
    parts = []
    for i in range(len(list(folder.iterdir()))):
        raw = (folder / str(i)).read_bytes()
        body, crc = raw[:-4], int.from_bytes(raw[-4:], "little")
        assert google_crc32c.value(body) == crc, f"fixture chunk {folder / str(i)} is damaged"
        parts.append(np.frombuffer(body, dtype="<f4"))
    return np.concatenate(parts)


def _plain_params(snap_dir: Path, profile: int) -> dict[str, np.ndarray]:
    meta = json.loads((snap_dir / "commit.json").read_text())
    lay = STORE / "layouts" / meta["layout"]
    table = json.loads((lay / "params.json").read_text())["params"]
    full = {f: np.full(int(np.prod(s)), np.nan, dtype=np.float32) for f, s, _ in table}
    for r in range(meta["world_size"]):
        pieces = json.loads((lay / f"rank-{r:05d}.json").read_text())["pieces"]
        if not pieces:
            continue
        arr = _plain_rank_array(snap_dir, r, profile)
        for p, start, numel, off in pieces:
            full[table[p][0]][start:start + numel] = arr[off:off + numel]
    return {f: full[f].reshape(s) for f, s, _ in table}


def test_v1_fixture_lists_and_verifies():
    store = open_store(str(STORE))
    snaps = store.snapshots()
    assert [s.step for s in snaps] == STEPS
    assert {s.meta["version"] for s in snaps} == {1}
    assert all(s.world_size == 3 and s.sigma_rels == (0.05, 0.2) for s in snaps)
    for s in snaps:
        assert store.verify(s) == []


@pytest.mark.parametrize("step", STEPS)
def test_v1_fixture_reads_the_stored_bytes(step):
    store = open_store(str(STORE))
    snap_dir = STORE / "snapshots" / f"step-{step:012d}"
    for k, sigma_rel in enumerate((0.05, 0.2)):
        plain = _plain_params(snap_dir, k)
        for name, want in plain.items():
            assert not np.isnan(want).any()
            got = store.read(step, sigma_rel, name)
            assert torch.equal(got, torch.from_numpy(want)), (step, sigma_rel, name)
    bufs = store.read_buffers(store.snapshot(step))
    assert set(bufs) == {"scale"} and np.array_equal(bufs["scale"], np.ones(1, np.float32))


def test_v1_fixture_synthesizes_the_same_values(tmp_path):
    """Today's synthesis of the v1 store equals version 1's own output and a brute-force weighted sum."""
    res = synthesize(str(STORE), sigma_rels=[0.10, 0.15], out=str(tmp_path / "out"), progress=False)
    meta = json.loads((SYNTH / "zarr" / "snapshots" / "step-000000000020" / "commit.json").read_text())
    X = np.asarray(meta["coefficients"], dtype=np.float64)
    rows = meta["rows"]
    assert res.snapshots == meta["snapshots"]
    plain = {(i, k): _plain_params(STORE / "snapshots" / f"step-{STEPS[i]:012d}", k)
             for i, k in {tuple(r) for r in rows}}
    for j, s in enumerate((0.10, 0.15)):
        folder = f"sigma_rel-{s:.4f}"
        old = load_file(str(SYNTH / folder / "model.safetensors"))
        new = load_file(str(tmp_path / "out" / folder / "model.safetensors"))
        assert set(old) == set(new)
        for name in old:
            torch.testing.assert_close(new[name], old[name], rtol=1e-6, atol=1e-7)
            if name == "scale":
                continue
            brute = sum(X[row, j] * plain[tuple(rows[row])][name].astype(np.float64) for row in range(len(rows)))
            np.testing.assert_allclose(new[name].numpy(), brute, rtol=1e-6, atol=1e-7)


def test_v1_store_resumes_and_mixes_with_new_snapshots(tmp_path):
    """A job resuming on a version-1 store continues it; synthesis reads the old and the new snapshots."""
    from tests.engines import TinyNet

    url = tmp_path / "store"
    shutil.copytree(STORE, url)
    torch.manual_seed(0)
    model = TinyNet()
    with PostHocEMA(model, sigma_rels=(0.05, 0.20), store=str(url), snapshot_every=5, resume=True,
                    buffers="copy", writer="sync") as ema:
        assert ema.step == 20
        ema20 = {k: v.clone() for k, v in ema.full_state_dict(sigma_rel=0.05).items()}
        for name, want in _plain_params(STORE / "snapshots" / "step-000000000020", 0).items():
            assert torch.equal(ema20[name], torch.from_numpy(want)), name
        for _ in range(5):
            ema.update()
    store = open_store(str(url))
    assert [s.step for s in store.snapshots()] == STEPS + [25]
    for s in store.snapshots():
        assert store.verify(s) == []
    res = synthesize(str(url), sigma_rels=[0.10], out=str(tmp_path / "out"), format="zarr", progress=False)
    assert len(res.snapshots) == 5
