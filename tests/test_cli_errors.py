"""`dist-ema ls|inspect|synthesize`: bad paths and risky output are one line on stderr and exit 2."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_ema.cli import main
from dist_ema.tracker import PostHocEMA
from tests.dist_harness import ROOT
from tests.engines import TinyNet


def _train(url: str, steps: int, every: int) -> None:
    torch.manual_seed(0)
    m = TinyNet()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with PostHocEMA(m, store=url, snapshot_every=every, writer="sync", max_object_bytes=64) as ema:
        for _ in range(steps):
            m(torch.arange(7)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            ema.update()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("cli") / "run" / "snapshots")
    _train(url, 9, 3)
    return url


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_ema", *argv], capture_output=True, text=True, timeout=120,
                          cwd=str(ROOT))


def _one_line_exit_2(r: subprocess.CompletedProcess, command: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"dist-ema {command}: error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["ls", "inspect"])
def test_ls_inspect_on_a_file(tmp_path, command):
    f = tmp_path / "notes.txt"
    f.write_text("not a store")
    line = _one_line_exit_2(_cli(command, str(f)), command)
    assert str(f) in line and "is a file" in line


def test_inspect_a_safetensors_file_points_at_its_store(store, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["synthesize", store, "--sigma-rel", "0.08", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out / "sigma_rel-0.0800" / "model.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and f"dist-ema inspect {out / 'zarr'}" in err


@pytest.mark.parametrize("command", ["ls", "inspect"])
def test_synthesis_output_points_at_its_store(store, tmp_path, capsys, command):
    out = tmp_path / "o"
    assert main(["synthesize", store, "--sigma-rel", "0.08", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main([command, str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "synthesis output" in err[0] and f"{out / 'zarr'}" in err[0], err
    # ... and that store is what it says
    assert main(["inspect", str(out / "zarr")]) == 0
    assert "sigma_rel 0.0800" in capsys.readouterr().out


def test_synthesize_into_a_user_folder(store, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main(["synthesize", store, "--sigma-rel", "0.08", "--out", str(results), "--no-progress",
                     *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(results) in err[0] and "notes.txt" in err[0], err
    assert [p.name for p in results.iterdir()] == ["notes.txt"] and (results / "notes.txt").read_text() == "mine"


def _digest(root: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())).hexdigest()


def test_synthesize_around_the_store(store, capsys):
    run = Path(store).parent
    before = _digest(run)
    for fmt in ("zarr", "safetensors"):
        assert main(["synthesize", store, "--sigma-rel", "0.07", "--out", str(run), "--format", fmt, "--overwrite",
                     "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "contains the snapshot store" in err[0], err
    assert _digest(run) == before


def test_synthesize_high_error_is_warned_in_the_summary(tmp_path, capsys, caplog):
    url = str(tmp_path / "one")
    _train(url, 3, 3)  # one snapshot
    with caplog.at_level(logging.WARNING, logger="dist_ema"):
        assert main(["synthesize", url, "--sigma-rel", "0.1", "0.2886", "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    row = next(x for x in out.splitlines() if x.strip().startswith("0.2886"))
    assert "HIGH" in row
    assert not any("HIGH" in x for x in out.splitlines() if x.strip().startswith("0.1000"))
    warn = [x for x in out.splitlines() if x.startswith("WARNING")]
    assert len(warn) == 1 and "0.2886" in warn[0] and "dist-ema error" in warn[0]
    assert any(r.levelno == logging.WARNING and "0.2886" in r.getMessage() for r in caplog.records)


def test_synthesize_takes_sigma_rels_like_training_and_sigma_rel_as_an_alias(store, tmp_path, capsys):
    for i, flag in enumerate(("--sigma-rels", "--sigma-rel")):
        assert main(["synthesize", store, flag, "0.08", "0.1", "--out", str(tmp_path / f"o{i}"), "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert "0.0800" in out and "0.1000" in out


def test_synthesis_summary_is_printed_once(store, tmp_path):
    r = _cli("synthesize", store, "--sigma-rels", "0.08", "--out", str(tmp_path / "o"), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (r.stdout + r.stderr).count("target(s) at t=") == 1, (r.stdout, r.stderr)


def test_synthesize_help_names_format_and_dtype_defaults():
    r = _cli("synthesize", "--help")
    text = " ".join(r.stdout.split())
    assert "safetensors (default)" in text and "default float32" in text, text


def test_a_ddp_or_plain_store_shows_its_engine_by_name(store, capsys):
    assert main(["ls", store]) == 0
    out = capsys.readouterr().out
    assert "ddp/plain" in out and "replicated" not in out
    assert main(["inspect", store]) == 0
    assert "engine: ddp/plain" in capsys.readouterr().out


def test_store_read_of_a_mistyped_name_suggests_the_closest(store):
    from dist_ema import open_store

    s = open_store(store)
    step = s.snapshots()[-1].step
    with pytest.raises(KeyError) as e:
        s.read(step, 0.05, "fc1.weigth")
    msg = str(e.value)
    assert msg.startswith("no parameter 'fc1.weigth'") and "did you mean 'fc1.weight'" in msg, msg
    assert torch.equal(s.read(step, 0.05, "fc1.weight"), s.read(step, 0.05, "fc1.weight"))  # the right name reads
