"""The command line: `dist-ema error` (the schedule table, JSON output, the plot, bad input) and
`dist-ema ls|inspect|synthesize` (bad paths and risky output are one line on stderr and exit 2).

Tests that run the command in a subprocess carry the dist marker; the others call ``main`` in this process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_ema import phema
from dist_ema.cli import main, schedule_profiles
from dist_ema.tracker import PostHocEMA
from tests.dist_harness import ROOT
from tests.engines import TinyNet


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """``python -m dist_ema ARGV`` in a subprocess (from the repository root)."""
    return subprocess.run([sys.executable, "-m", "dist_ema", *argv], capture_output=True, text=True, timeout=120,
                          cwd=str(ROOT))


# ----------------------------------------------------------------------------- dist-ema error

def test_schedule_profiles_layout():
    t, g = schedule_profiles([0.05, 0.10], 300, 1000)
    # 300, 600, 900 and the end of training, each with both profiles
    np.testing.assert_array_equal(t, [300, 300, 600, 600, 900, 900, 1000, 1000])
    np.testing.assert_allclose(g[:2], phema.sigma_rel_to_gamma([0.05, 0.10]))


def test_error_json_matches_solver(capsys):
    assert main(["error", "--tracked", "0.05", "0.1", "--snapshot-every", "100", "--steps", "2000",
                 "--targets", "0.1", "0.15", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    t, g = schedule_profiles([0.05, 0.1], 100, 2000)
    ref = phema.solve_coefficients(t, g, [2000.0, 2000.0], phema.sigma_rel_to_gamma([0.1, 0.15]))
    assert [x["error"] for x in out["targets"]] == pytest.approx(ref.error.tolist())
    assert out["targets"][0]["error"] < 1e-6  # a tracked profile at the last snapshot is exact
    assert out["snapshots_used"] == 40


@pytest.mark.dist
def test_error_table_and_plot(tmp_path):
    png = tmp_path / "p.png"
    r = _cli("error", "--targets", "0.08", "0.2", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert "0.0800" in r.stdout and "rel. error" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--targets", "0.3"], "sigma_rel must be in (0, 0.2887)"),
        (["--tracked", "0"], "sigma_rel must be in"),
        (["--snapshot-every", "0"], "must be > 0"),
        (["--snapshot-every", "500", "--steps", "100"], "larger than --steps"),
        (["--t", "10"], "before the first snapshot"),
    ],
)
def test_error_bad_input(argv, needle, capsys):
    assert main(["error", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_sigma_rels_is_the_spelling_and_tracked_an_alias(capsys):
    argv = ["--snapshot-every", "100", "--steps", "2000", "--targets", "0.12", "--json"]
    assert main(["error", "--sigma-rels", "0.05", "0.1", *argv]) == 0
    new = json.loads(capsys.readouterr().out)
    assert main(["error", "--tracked", "0.05", "0.1", *argv]) == 0
    assert json.loads(capsys.readouterr().out) == new and new["tracked_sigma_rels"] == [0.05, 0.1]


@pytest.mark.dist
def test_errors_of_the_error_command_say_error_once():
    r = _cli("error", "--sigma-rels", "0.3")
    assert r.returncode == 2 and r.stderr.startswith("dist-ema error: sigma_rel must be in"), r.stderr
    r = _cli("error", "--steps", "x")  # argparse's own errors too
    assert r.returncode == 2 and "dist-ema error: argument --steps: invalid float value" in r.stderr, r.stderr
    assert "error: error:" not in r.stderr


def test_sigma_rel_zero_is_not_explained_by_the_upper_bound(capsys):
    assert main(["error", "--targets", "0"]) == 2
    err = capsys.readouterr().err
    assert "must be in (0, 0.2887); got [0.0]" in err and "must be > 0" in err and "1/sqrt(12)" not in err
    assert main(["error", "--targets", "0.3"]) == 2
    assert "1/sqrt(12)" in capsys.readouterr().err  # the upper bound keeps its explanation


@pytest.mark.dist
def test_version_and_verbose_after_the_subcommand():
    from dist_ema import __version__

    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"dist-ema {__version__}"
    for argv in (["-v", "error", "--steps", "2000"], ["error", "--steps", "2000", "-v"]):
        r = _cli(*argv, "--plot", "/nonexistent-dir/p.png")  # -v: matplotlib's DEBUG lines show up
        assert "DEBUG" in r.stderr, (argv, r.stderr[-500:])
    assert "DEBUG" not in _cli("error", "--steps", "2000").stderr


@pytest.mark.dist
def test_a_mistyped_flag_names_the_closest_one(tmp_path):
    r = _cli("ls", str(tmp_path), "--verfy")
    assert r.returncode == 2
    assert "usage: dist-ema ls" in r.stderr  # the subcommand's usage, not the top level's
    assert "dist-ema ls: error: unrecognized arguments: --verfy (did you mean --verify?)" in r.stderr, r.stderr
    r = _cli("error", "--snapshot-evry", "10")
    assert "--snapshot-evry (did you mean --snapshot-every?)" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- dist-ema ls, inspect, synthesize


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


def _one_line_exit_2(r: subprocess.CompletedProcess, command: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"dist-ema {command}: error: "), r.stderr
    return lines[0]


@pytest.mark.dist
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


@pytest.mark.dist
def test_synthesis_summary_is_printed_once(store, tmp_path):
    r = _cli("synthesize", store, "--sigma-rels", "0.08", "--out", str(tmp_path / "o"), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (r.stdout + r.stderr).count("target(s) at t=") == 1, (r.stdout, r.stderr)


@pytest.mark.dist
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
