"""The benchmarks run: ``python bench/run.py --quick`` (tiny sizes, about a minute) in a fresh process.

A benchmark that a refactor broke fails here instead of at the next full benchmark run: every
benchmark of the default set must report its tables and goals without an error. The figures of a
quick run are not checked (tiny sizes on a shared machine say nothing about speed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.dist_harness import ROOT

pytestmark = pytest.mark.dist


@pytest.mark.timeout(600)
def test_every_benchmark_runs_quick(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "bench/run.py", "--quick", "--out", str(tmp_path)], cwd=str(ROOT), env=env,
                       capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "quick.json").read_text())
    names = [res["name"] for res in doc["results"]]
    for want in ("update", "update_models", "sharded", "train", "snapshot", "synthesis", "solver", "scale", "many",
                 "offload"):
        assert want in names, names
    for res in doc["results"]:
        assert res["error"] is None, f"benchmark {res['name']} failed:\n{res['error']}"
        assert res["tables"] and res["goals"], res["name"]
    assert (tmp_path / "quick.md").read_text().count("| goal |") >= len(doc["results"])  # and a summary
