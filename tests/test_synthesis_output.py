"""Synthesis output safety: it never removes or overwrites anything it did not write itself.

Every test builds a real store (PostHocEMA, sync writer) and real folders, and checks
the bytes of every file the user had before the call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_ema.store import open_store
from dist_ema.synthesis import synthesize
from dist_ema.tracker import PostHocEMA
from tests.dist_harness import ROOT
from tests.engines import TinyNet

MARKER = ".dist-ema-synthesis.json"  # the synthesis' own marker, written first


def _train(url: str, steps: int = 9, every: int = 3) -> None:
    torch.manual_seed(0)
    m = TinyNet()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with PostHocEMA(m, store=url, snapshot_every=every, writer="sync", max_object_bytes=64) as ema:
        for _ in range(steps):
            m(torch.arange(7)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            ema.update()


def _tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (the user's data, to compare before/after)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def run_dir(tmp_path):
    """A training run folder: run/snapshots (the store) and run/checkpoints/model.pt."""
    run = tmp_path / "run"
    _train(str(run / "snapshots"))
    (run / "checkpoints").mkdir()
    torch.save({"w": torch.arange(5)}, run / "checkpoints" / "model.pt")
    return run


# ----------------------------------------------------------------------------- out vs the store


@pytest.mark.parametrize("fmt", ["zarr", "safetensors"])
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where,needle", [
    (".", "contains the snapshot store"),                               # the run folder around the store
    ("snapshots", "is the snapshot store"),                              # the store itself
    ("snapshots/snapshots/step-000000000006", "inside the snapshot store"),  # a committed snapshot
    ("snapshots/layouts", "inside the snapshot store"),
    ("checkpoints/../snapshots/", "is the snapshot store"),              # the same folder, spelled differently
])
def test_out_in_or_around_the_store_is_refused(run_dir, fmt, overwrite, where, needle):
    before = _tree(run_dir)
    out = os.path.join(str(run_dir), where)
    with pytest.raises(ValueError, match=needle):
        synthesize(str(run_dir / "snapshots"), sigma_rels=[0.07], out=out, format=fmt, overwrite=overwrite,
                   progress=False)
    assert _tree(run_dir) == before
    assert [s.step for s in open_store(str(run_dir / "snapshots")).snapshots()] == [3, 6, 9]


def test_out_around_the_store_with_file_url_and_symlink(run_dir, tmp_path):
    before = _tree(run_dir)
    with pytest.raises(ValueError, match="contains the snapshot store"):
        synthesize(f"file://{run_dir / 'snapshots'}", sigma_rels=[0.07], out=str(run_dir), format="zarr",
                   progress=False)
    link = tmp_path / "link"
    link.symlink_to(run_dir)
    with pytest.raises(ValueError, match="contains the snapshot store"):
        synthesize(str(run_dir / "snapshots"), sigma_rels=[0.07], out=str(link), format="zarr", progress=False)
    assert _tree(run_dir) == before


@pytest.mark.parametrize("out,url,nested", [
    ("s3://b/run", "s3://b/run/snapshots", True),
    ("s3://b/run/snapshots/", "s3://b/run/snapshots", True),
    ("s3://b/run/snapshots/snapshots/step-1", "s3://b/run/snapshots", True),
    ("s3://b/run/synth", "s3://b/run/snapshots", False),
    ("s3://b/run/snapshots2", "s3://b/run/snapshots", False),   # a common string prefix is not nesting
    ("s3://other/run/snapshots", "s3://b/run/snapshots", False),  # another bucket
    ("gs://b/run/snapshots", "s3://b/run/snapshots", False),     # another scheme
    ("/tmp/x/run", "file:///tmp/x/run/snapshots", True),
])
def test_url_nesting(out, url, nested):
    from dist_ema.synthesis import _check_not_store

    if nested:
        with pytest.raises(ValueError, match="snapshot store"):
            _check_not_store(out, url)
    else:
        _check_not_store(out, url)


# ----------------------------------------------------------------------------- folders of the user


@pytest.mark.parametrize("fmt", ["zarr", "safetensors"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_folder_with_user_files_is_refused(run_dir, tmp_path, fmt, overwrite):
    results = tmp_path / "results"
    (results / "sub").mkdir(parents=True)
    (results / "notes.txt").write_text("my notes")
    (results / "sub" / "plot.png").write_bytes(b"\x89PNG")
    before = _tree(results)
    with pytest.raises(FileExistsError, match=r"results.*not written by a dist-ema synthesis.*notes\.txt"):
        synthesize(str(run_dir / "snapshots"), sigma_rels=[0.07], out=str(results), format=fmt,
                   overwrite=overwrite, progress=False)
    assert _tree(results) == before


def test_out_that_is_a_file_is_refused(run_dir, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"user bytes")
    with pytest.raises(FileExistsError, match="is a file"):
        synthesize(str(run_dir / "snapshots"), sigma_rels=[0.07], out=str(f), overwrite=True, progress=False)
    assert f.read_bytes() == b"user bytes"


def test_empty_existing_folder_is_used(run_dir, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    res = synthesize(str(run_dir / "snapshots"), sigma_rels=[0.07], out=str(out), progress=False)
    assert os.path.exists(res.files[0])


# ----------------------------------------------------------------------------- the marker


def test_marker_is_written_first_and_names_the_job(run_dir, tmp_path, monkeypatch):
    from dist_ema.store.fs import StoreIO

    out = tmp_path / "o"
    order: list[str] = []
    real_put = StoreIO.put

    def put(self, key, data, **kw):
        full = self.path(key)
        if full.startswith(str(out)):
            order.append(os.path.relpath(full, out))
        return real_put(self, key, data, **kw)

    monkeypatch.setattr(StoreIO, "put", put)
    res = synthesize(str(run_dir / "snapshots"), sigma_rels=[0.07, 0.12], out=str(out), progress=False)
    assert order[0] == MARKER and order[-1] == MARKER  # first: claims the folder; last: marks it complete
    doc = json.loads((out / MARKER).read_text())
    assert doc["format"] == "dist-ema-synthesis" and doc["state"] == "complete" and len(doc["job"]) >= 16
    assert doc["source"] == str(run_dir / "snapshots")
    assert sorted(doc["owned"]) == sorted(["zarr", "synthesis.json", "sigma_rel-0.0700/model.safetensors",
                                           "sigma_rel-0.1200/model.safetensors"])
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "zarr", "synthesis.json", "sigma_rel-0.0700",
                                                            "sigma_rel-0.1200"])
    assert len(res.files) == 2


def _killed_job(url: str, out: str, fmt: str = "safetensors") -> subprocess.CompletedProcess:
    """A synthesis process that dies (os._exit, no cleanup can run) right after writing its first unit."""
    code = (
        "import os, dist_ema.synthesis as s\n"
        "real = s._write_unit\n"
        "def die(*a, **k):\n"
        "    real(*a, **k); os._exit(9)\n"
        "s._write_unit = die\n"
        f"s.synthesize({url!r}, sigma_rels=[0.07], out={out!r}, format={fmt!r}, progress=False)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT),
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.dist
@pytest.mark.parametrize("fmt", ["zarr", "safetensors"])
def test_leftover_of_a_killed_job_is_replaced(run_dir, tmp_path, fmt, caplog):
    url, out = str(run_dir / "snapshots"), tmp_path / "o"
    r = _killed_job(url, str(out), fmt)
    assert r.returncode == 9, r.stderr[-2000:]
    assert json.loads((out / MARKER).read_text())["state"] == "writing"  # the leftover, marked as a synthesis'
    with caplog.at_level(logging.WARNING, logger="dist_ema"):
        synthesize(url, sigma_rels=[0.07], out=str(out), format=fmt, progress=False)
    assert "left by a synthesis that did not finish" in caplog.text
    zs = open_store(str(out if fmt == "zarr" else out / "zarr"))
    ref = synthesize(url, sigma_rels=[0.07], out=str(tmp_path / "ref"), format="zarr", progress=False)
    assert len(zs.snapshots()) == 1 and ref.targets[0]["error"] >= 0
    rs = open_store(str(tmp_path / "ref"))
    for n in rs.params():
        assert torch.equal(zs.read(None, 0.07, n), rs.read(None, 0.07, n)), n


@pytest.mark.dist
def test_leftover_with_user_files_next_to_it_is_refused(run_dir, tmp_path):
    url, out = str(run_dir / "snapshots"), tmp_path / "o"
    assert _killed_job(url, str(out)).returncode == 9
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"notes\.txt"):
            synthesize(url, sigma_rels=[0.07], out=str(out), overwrite=overwrite, progress=False)
        assert _tree(out) == before


def test_folder_without_marker_is_refused_even_if_it_looks_like_a_leftover(run_dir, tmp_path):
    """What older versions replaced as 'an uncommitted synthesis': a zarr store without a commit."""
    from dist_ema.store.fs import StoreIO
    from dist_ema.store.io import ensure_store

    out = tmp_path / "o"
    ensure_store(StoreIO(str(out / "zarr")), create=True)
    before = _tree(out)
    with pytest.raises(FileExistsError, match="not written by a dist-ema synthesis"):
        synthesize(str(run_dir / "snapshots"), sigma_rels=[0.07], out=str(out), progress=False)
    assert _tree(out) == before


def test_complete_output_needs_overwrite_and_overwrite_keeps_user_files(run_dir, tmp_path):
    url, out = str(run_dir / "snapshots"), tmp_path / "o"
    synthesize(url, sigma_rels=[0.07, 0.1], out=str(out), progress=False)
    keep = out / "sigma_rel-0.0700" / "eval.json"  # the user's file inside a target folder
    keep.write_text('{"loss": 1}')
    old = (out / "sigma_rel-0.0700" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists.*overwrite"):
        synthesize(url, sigma_rels=[0.07], t=6.0, out=str(out), progress=False)
    assert (out / "sigma_rel-0.0700" / "model.safetensors").read_bytes() == old
    res = synthesize(url, sigma_rels=[0.07], t=6.0, out=str(out), overwrite=True, progress=False)
    assert keep.read_text() == '{"loss": 1}'
    assert not (out / "sigma_rel-0.1000").exists()  # the previous synthesis' own output: replaced
    assert load_file(res.files[0])["fc1.weight"].shape == (10, 6)
    assert (out / "sigma_rel-0.0700" / "model.safetensors").read_bytes() != old
    assert json.loads((out / "synthesis.json").read_text())["targets"][0]["t"] == 6.0


def test_failed_job_removes_only_its_own_output(run_dir, tmp_path, monkeypatch):
    from dist_ema.store import StoreError

    out = tmp_path / "o"
    out.mkdir()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("dist_ema.synthesis.safetensors_parts", boom)  # the export fails after the zarr commit
    with pytest.raises(StoreError, match="safetensors export failed.*disk full"):
        synthesize(str(run_dir / "snapshots"), sigma_rels=[0.07], out=str(out), progress=False)
    assert out.is_dir() and list(out.iterdir()) == []  # the user's (empty) folder stays, nothing in it


# ----------------------------------------------------------------------------- target names


def test_targets_with_the_same_folder_name_are_refused(run_dir, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ValueError, match=r"0\.05.*0\.05004.*sigma_rel-0\.0500"):
        synthesize(str(run_dir / "snapshots"), sigma_rels=[0.05, 0.05004], out=str(out), progress=False)
    assert not out.exists()
    # the zarr output keeps each target in an array of its own: no name clash there
    res = synthesize(str(run_dir / "snapshots"), sigma_rels=[0.05, 0.05004], out=str(out), format="zarr",
                     progress=False)
    assert len(res.targets) == 2


# ----------------------------------------------------------------------------- high reconstruction error


def test_high_error_target_is_warned(tmp_path, caplog):
    url = str(tmp_path / "one")
    _train(url, steps=3, every=3)  # a single snapshot: 0.2886 is far from anything it can reconstruct
    with caplog.at_level(logging.WARNING, logger="dist_ema"):
        res = synthesize(url, sigma_rels=[0.1, 0.2886], out=str(tmp_path / "o"), progress=False)
    err = res.targets[1]["error"]
    assert err > 0.10 and res.targets[0]["error"] < 0.10
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "0.2886" in r.getMessage()]
    assert len(warned) == 1
    msg = warned[0].getMessage()
    assert f"{100 * err:.1f}%" in msg and "dist-ema error" in msg and "snapshots" in msg
    assert not any("0.1000" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_safetensors_files_are_read_by_safetensors_itself(tmp_path):
    """The export writes the format itself (header, then each tensor's bytes): safetensors reads it back."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dist_ema.synthesis import safetensors_parts

    ts = {"w": torch.randn(3, 4), "bf": torch.randn(5).to(torch.bfloat16), "steps": torch.tensor(7),
          "empty": torch.empty(0, 3), "half": torch.randn(2, 2).half(), "mask": torch.tensor([True, False]),
          "idx": torch.arange(5), "f64": torch.randn(2, dtype=torch.float64)}
    path = tmp_path / "m.safetensors"
    with open(path, "wb") as f:
        for part in safetensors_parts(ts, {"format": "pt", "dist_ema": "{}"}):
            f.write(part)
    got = load_file(str(path))
    assert got.keys() == ts.keys()
    for k, v in ts.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "dist_ema": "{}"}
    with pytest.raises(ValueError, match="no safetensors code"):
        safetensors_parts({"c": torch.zeros(2, dtype=torch.complex64)}, {})
