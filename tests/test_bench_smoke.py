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


# two halves of about equal time, run at once: the runs are single-threaded and the figures of a quick
# run are not checked, so the smoke test takes half the wall time
HALVES = ("synthesis,update,snapshot,solver,scale", "many,update_models,sharded,train,offload")


@pytest.mark.timeout(600)
def test_every_benchmark_runs_quick(tmp_path):
    from bench.run import NAMES

    assert sorted(",".join(HALVES).split(",")) == sorted(n for n in NAMES if n != "update_gpu")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "bench/run.py", "--quick", "--only", names, "--out",
                               str(tmp_path / f"half{i}")], cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i, names in enumerate(HALVES)]
    results = []
    for i, p in enumerate(procs):
        out, _ = p.communicate(timeout=540)
        assert p.returncode == 0, out[-6000:]
        doc = json.loads((tmp_path / f"half{i}" / "quick.json").read_text())
        results += doc["results"]
        assert (tmp_path / f"half{i}" / "quick.md").read_text().count("| goal |") >= len(doc["results"])
    names = [res["name"] for res in results]
    for want in ("update", "update_models", "sharded", "train", "snapshot", "synthesis", "solver", "scale", "many",
                 "offload"):
        assert want in names, names
    for res in results:
        assert res["error"] is None, f"benchmark {res['name']} failed:\n{res['error']}"
        assert res["tables"] and res["goals"], res["name"]
