"""dist-ema's object collectives leave nothing for gloo's threads to free at interpreter exit.

A job whose last collective is one of dist-ema's (a synthesis, ``close()``) exits right after it.
Were a gloo worker thread still holding the collective's tensors then, its release would need the
GIL during interpreter finalization and the process would abort ("terminate called without an
active exception", SIGABRT), failing a job that had finished. Each case runs 2 real ranks that end
with one collective and exit normally (no ``destroy_process_group``, the main thread keeping the
GIL as long as it can, which widens the window: torch's own ``all_gather_object`` aborts in about
half the runs of this script), and checks the exchanged objects against what each rank sent (in
the rank, before it exits).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.dist_harness import ROOT, free_port

pytestmark = pytest.mark.dist

_SCRIPT = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    from dist_ema import collective
    dist.init_process_group("gloo")
    rank, which = dist.get_rank(), sys.argv[1]
    sent = [{"rank": r, "blob": "x" * (1000 + 70_000 * r)} for r in range(2)]  # sizes differ between ranks
    want = {"all_gather_object": sent, "gather_to_rank0": sent if rank == 0 else None,
            "broadcast_object": sent[1]}[which]
    sys.setswitchinterval(1000.0)  # the main thread gives up the GIL only when it blocks
    if which == "all_gather_object":
        got = collective.all_gather_object(sent[rank])
    elif which == "gather_to_rank0":
        got = collective.gather_to_rank0(sent[rank])
    else:
        got = collective.broadcast_object(sent[rank] if rank == 1 else None, src=1)
    # no output after the collective (writing one would hand the GIL over): a wrong result is exit code 3
    sys.exit(0 if got == want else 3)
""")


def _run(which: str, tmp_path: Path) -> list[tuple[int, str]]:
    script = tmp_path / "last_collective.py"
    script.write_text(_SCRIPT)
    port, procs = free_port(), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, str(script), which], env=env, cwd=str(ROOT),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=120)
        out.append((p.returncode, text.decode(errors="replace")))
    return out


@pytest.mark.parametrize("which", ["all_gather_object", "gather_to_rank0", "broadcast_object"])
def test_a_job_ending_in_a_collective_exits_cleanly(which, tmp_path):
    out = _run(which, tmp_path)
    for rank, (code, text) in enumerate(out):
        assert code != 3, f"rank {rank}: {which} returned objects other than the ranks sent"
        assert code == 0, f"rank {rank} exited with {code} after {which}:\n{text[-3000:]}"
