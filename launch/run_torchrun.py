#!/usr/bin/env python
"""torchrun, with a failed job summed up in one line instead of torchrun's ChildFailedError report.

    python launch/run_torchrun.py [torchrun options] SCRIPT_OR_-m_MODULE [its arguments]

The launch scripts (torchrun.sh, torchrun_multinode.sh, synthesize.sh) start jobs through this;
it is torchrun in every other respect (same options, same environment for the ranks). A rank
that exits with code 2 has reported its own error in one line (launch/train.py, dist-ema):
nothing is added. Any other failure gets one line naming the rank and its exit code or signal.
TORCHRUN_FULL_REPORT=1 shows torchrun's own report (as does plain torchrun).
"""

from __future__ import annotations

import logging
import os
import sys

REPORTED = 2  # exit code of a rank that printed its error itself


class _FailureLines(logging.Filter):
    """Drop torchrun's per-process failure lines: the one-line summary below replaces them."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("failed (exitcode") or "closing signal" in msg)


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if os.environ.get("TORCHRUN_FULL_REPORT") == "1":
        torchrun(argv)
        return 0
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_FailureLines())
    try:
        torchrun(argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code != REPORTED:
            how = f"was killed by {failure.signal_name()}" if code < 0 else f"exited with code {code}"
            others = f" ({len(e.failures) - 1} more rank(s) failed after it)" if len(e.failures) > 1 else ""
            print(f"torchrun: {e.name} failed: rank {rank} {how}{others}; TORCHRUN_FULL_REPORT=1 shows "
                  f"torchrun's report", file=sys.stderr)
        return code if code > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
