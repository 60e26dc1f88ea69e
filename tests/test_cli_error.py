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
