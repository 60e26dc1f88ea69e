"""The start of one test rank, in a child of a fork server that has imported torch already.

``tests/dist_harness.py`` starts every rank of ``run_workers`` from one multiprocessing fork
server per pytest session. The server imports the heavy libraries once (torch and its distributed
packages, numpy); each rank is a fork of it, so it skips the ~3 s of imports that a fresh
interpreter spends, and then becomes what ``python -c BOOT`` would have been: the test's own
environment, working directory and ``sys.argv``, its output in its log file. Nothing here
imports pytest or dist-ema (the rank imports what it uses, with its own environment).
"""

from __future__ import annotations

import os
import sys

# imported once by the fork server, before any rank exists; none of them reads the environment of
# a particular test at import time, and none starts a thread
PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.tensor",
           "torch.distributed.checkpoint", "torch.nn.parallel", "numpy"]


def main(boot: str, argv: list[str], env: dict[str, str], cwd: str, log_path: str) -> None:
    """Run ``boot`` (the harness's rank program) as ``python -c boot *argv`` would, output into ``log_path``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.argv = ["-c", *argv]
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    exec(compile(boot, "<rank>", "exec"), {"__name__": "__main__"})  # ends with os._exit(code)
