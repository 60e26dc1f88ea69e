"""Run a test function in N real processes joined by torch.distributed (gloo, CPU).

    run_workers("tests.test_x:worker", world_size=2, tmp_path=tmp, kwargs={...})

Each process sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT the way torchrun
does, initializes a gloo process group, imports ``module:function`` and calls
``function(rank, world_size, out_dir, **kwargs)``. Workers write their results as
files under ``out_dir`` (``torch.save`` / ``np.save``); the test reads and checks
them. A worker that fails or a run past ``timeout`` kills all processes and fails
the test with the last lines of every rank's output.

Ranks are forks of one fork server per session that imported torch once (tests/rank_boot.py),
which halves the multi-process tests' time on a 2-core machine; ``DIST_HARNESS_FORK=0`` starts
each rank in a fresh interpreter instead (``python -c``), as torchrun does. The launcher tests
(torchrun, the deepspeed launcher, the CLI) always start fresh interpreters.

Tests that start processes carry the ``dist`` marker (``pytest -m "not dist"`` is the in-process
tier). ``run_workers`` refuses to start ranks in a test without it, and tests/conftest.py applies
the same rule to every other process a test starts (subprocess, multiprocessing, launchers, servers).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_BOOT = r"""
import importlib, json, os, sys
import faulthandler; faulthandler.enable()
spec, out_dir, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
import torch.distributed as dist
rank, ws = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
code = 0
try:
    if os.environ.get("DIST_HARNESS_NO_INIT") != "1":
        dist.init_process_group("gloo", rank=rank, world_size=ws)
    mod, fn = spec.split(":")
    getattr(importlib.import_module(mod), fn)(rank, ws, out_dir, **kwargs)
except BaseException:
    import traceback; traceback.print_exc(); code = 1
finally:
    sys.stdout.flush(); sys.stderr.flush()
    if code == 0 and dist.is_initialized():
        try:
            dist.barrier(); dist.destroy_process_group()
        except Exception:
            pass
# gloo threads can abort at interpreter exit after all work finished: leave at once.
os._exit(code)
"""


# ----------------------------------------------------------------------------- the dist marker

DIST = "dist"
RUNNING: list[pytest.Item] = []  # the tests now running, innermost last (pushed and popped by tests/conftest.py)
REFUSALS = pytest.StashKey[list]()  # a test's refused process starts: it fails for them even if it caught the error


class MissingDistMarker(AssertionError):
    """A test without the ``dist`` marker tried to start processes."""


def require_dist_marker(what: str) -> None:
    """Raise MissingDistMarker unless the running test is marked ``dist`` (no test running: allowed).

    The refusal is also kept on the test, which fails at teardown even if it caught the error.
    """
    if not RUNNING:
        return
    item = RUNNING[-1]
    if item.get_closest_marker(DIST) is not None:
        return
    msg = (f"{item.nodeid} starts processes ({what}) without the `{DIST}` marker: mark the test "
           f"@pytest.mark.{DIST} (or its module: pytestmark = pytest.mark.{DIST}) so that "
           f"`pytest -m 'not {DIST}'` stays the in-process tier")
    item.stash.setdefault(REFUSALS, []).append(msg)
    raise MissingDistMarker(msg)


def take_refusals() -> list[str]:
    """The running test's refused process starts, forgotten (for tests of the refusal itself)."""
    if not RUNNING:
        return []
    stash = RUNNING[-1].stash
    out = stash.get(REFUSALS, [])
    if REFUSALS in stash:
        del stash[REFUSALS]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Rank:
    """One rank started from the fork server: the subset of ``subprocess.Popen`` that run_workers uses."""

    def __init__(self, proc) -> None:
        self.proc = proc
        self.pid = proc.pid

    def poll(self) -> int | None:
        return self.proc.exitcode

    def wait(self) -> int:
        self.proc.join()
        return self.proc.exitcode

    def kill(self) -> None:
        self.proc.kill()

    @property
    def returncode(self) -> int | None:
        return self.proc.exitcode


class _Fresh:
    """A rank in a fresh interpreter (``DIST_HARNESS_FORK=0``): ``python -c BOOT``, as torchrun starts one."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT, *argv], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=str(ROOT))
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self) -> int:
        code = self.proc.wait()
        self._log.close()
        return code

    def kill(self) -> None:
        self.proc.kill()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode


_SERVER: list = []  # the multiprocessing context whose fork server starts the ranks (made once)


def _start_rank(argv: list[str], env: dict[str, str], log: Path):
    """Start one rank: a fork of a server that imported torch once (``tests/rank_boot.py``), or a fresh
    interpreter with ``DIST_HARNESS_FORK=0``. The rank sees the same environment, directory and argv."""
    if os.environ.get("DIST_HARNESS_FORK", "1") == "0":
        return _Fresh(argv, env, log)
    import multiprocessing

    from tests import rank_boot

    if not _SERVER:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(rank_boot.PRELOAD)
        _SERVER.append(ctx)
    proc = _SERVER[0].Process(target=rank_boot.main, args=(_BOOT, argv, env, str(ROOT), str(log)), daemon=False)
    proc.start()
    return _Rank(proc)


def run_workers(
    spec: str,
    world_size: int,
    out_dir: os.PathLike | str,
    kwargs: dict | None = None,
    timeout: float = 240.0,
    env: dict[str, str] | None = None,
    expect_failure: bool = False,
) -> list[str]:
    """Run ``spec`` on ``world_size`` ranks; return each rank's combined output."""
    require_dist_marker(f"run_workers({spec!r}, world_size={world_size})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for rank in range(world_size):
        e = dict(os.environ)
        e.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
            OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]),
        )
        e.update(env or {})
        log = out_dir / f"rank{rank}.log"
        logs.append(log)
        procs.append(_start_rank([spec, str(out_dir), json.dumps(kwargs or {})], e, log))
    deadline = time.monotonic() + timeout
    failed = timed_out = False
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            timed_out = True
            break
        if not expect_failure and any(p.poll() not in (None, 0) for p in procs):
            # one rank failed: give the others a moment to report, then stop them
            time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
            failed = True
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    outputs = [log.read_bytes().decode(errors="replace") if log.exists() else "" for log in logs]
    codes = [p.returncode for p in procs]
    bad = timed_out or failed or (not expect_failure and any(c != 0 for c in codes))
    if bad:
        tails = "\n".join(
            f"----- rank {r} (exit {codes[r]}) -----\n" + "\n".join(o.splitlines()[-40:])
            for r, o in enumerate(outputs)
        )
        why = f"timed out after {timeout:.0f}s" if timed_out else f"exit codes {codes}"
        raise AssertionError(f"{spec} on {world_size} ranks: {why}\n{tails}")
    return outputs
