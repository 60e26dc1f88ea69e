"""`dist-ema error`: the schedule table, JSON output, the plot and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dist_ema import phema
from dist_ema.cli import main, schedule_profiles


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


def test_error_table_and_plot(tmp_path):
    png = tmp_path / "p.png"
    r = subprocess.run([sys.executable, "-m", "dist_ema", "error", "--targets", "0.08", "0.2", "--plot", str(png)],
                       capture_output=True, text=True, timeout=120)
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


def _dist_ema(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_ema", *argv], capture_output=True, text=True, timeout=120)


def test_sigma_rels_is_the_spelling_and_tracked_an_alias(capsys):
    argv = ["--snapshot-every", "100", "--steps", "2000", "--targets", "0.12", "--json"]
    assert main(["error", "--sigma-rels", "0.05", "0.1", *argv]) == 0
    new = json.loads(capsys.readouterr().out)
    assert main(["error", "--tracked", "0.05", "0.1", *argv]) == 0
    assert json.loads(capsys.readouterr().out) == new and new["tracked_sigma_rels"] == [0.05, 0.1]


def test_errors_of_the_error_command_say_error_once():
    r = _dist_ema("error", "--sigma-rels", "0.3")
    assert r.returncode == 2 and r.stderr.startswith("dist-ema error: sigma_rel must be in"), r.stderr
    r = _dist_ema("error", "--steps", "x")  # argparse's own errors too
    assert r.returncode == 2 and "dist-ema error: argument --steps: invalid float value" in r.stderr, r.stderr
    assert "error: error:" not in r.stderr


def test_sigma_rel_zero_is_not_explained_by_the_upper_bound(capsys):
    assert main(["error", "--targets", "0"]) == 2
    err = capsys.readouterr().err
    assert "must be in (0, 0.2887); got [0.0]" in err and "must be > 0" in err and "1/sqrt(12)" not in err
    assert main(["error", "--targets", "0.3"]) == 2
    assert "1/sqrt(12)" in capsys.readouterr().err  # the upper bound keeps its explanation


def test_version_and_verbose_after_the_subcommand():
    from dist_ema import __version__

    r = _dist_ema("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"dist-ema {__version__}"
    for argv in (["-v", "error", "--steps", "2000"], ["error", "--steps", "2000", "-v"]):
        r = _dist_ema(*argv, "--plot", "/nonexistent-dir/p.png")  # -v: matplotlib's DEBUG lines show up
        assert "DEBUG" in r.stderr, (argv, r.stderr[-500:])
    assert "DEBUG" not in _dist_ema("error", "--steps", "2000").stderr


def test_a_mistyped_flag_names_the_closest_one(tmp_path):
    r = _dist_ema("ls", str(tmp_path), "--verfy")
    assert r.returncode == 2
    assert "usage: dist-ema ls" in r.stderr  # the subcommand's usage, not the top level's
    assert "dist-ema ls: error: unrecognized arguments: --verfy (did you mean --verify?)" in r.stderr, r.stderr
    r = _dist_ema("error", "--snapshot-evry", "10")
    assert "--snapshot-evry (did you mean --snapshot-every?)" in r.stderr, r.stderr
