"""The README as a newcomer meets it: every command block runs, and close() keeps the last updates.

The README-blocks test extracts every fenced block of README.md, runs the Python snippets
against a tiny model and the shell commands with tiny step counts (a short, explicit table
of substitutions below), and skips only what needs more than this machine (SKIPPED, with
the reason). A block that is neither run nor skipped fails the test, so a new block has to
be added here.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import torch

from dist_ema import PostHocEMA, open_store
from tests.dist_harness import ROOT, run_workers
from tests.engines import TinyNet, batch


def _train_steps(ema: PostHocEMA, model, opt, steps: int, rank: int = 0) -> None:
    for step in range(steps):
        x, y = batch(step, rank)
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update()


# ------------------------------------------------------------------------------- close()


def test_close_takes_a_final_snapshot_of_the_updates_after_the_last_one(tmp_path, caplog):
    url = str(tmp_path / "s")
    torch.manual_seed(0)
    m = TinyNet()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    ema = PostHocEMA(m, store=url, snapshot_every=10, writer="sync")
    _train_steps(ema, m, opt, 65)
    with caplog.at_level(logging.INFO, logger="dist_ema"):
        ema.close()
    assert [s.step for s in open_store(url).snapshots()] == [10, 20, 30, 40, 50, 60, 65]
    final = [r.getMessage() for r in caplog.records if "final snapshot" in r.getMessage()]
    assert len(final) == 1 and "step 65" in final[0] and "step 60" in final[0], final
    # the final snapshot is the EMA at step 65, bit for bit
    assert torch.equal(open_store(url).read(65, 0.05, "fc1.weight"), ema.full_state_dict(sigma_rel=0.05)["fc1.weight"])
    ema.close()  # idempotent: no second snapshot
    assert [s.step for s in open_store(url).snapshots()][-1] == 65


def test_close_final_snapshot_false_and_an_ema_that_did_not_move(tmp_path, caplog):
    torch.manual_seed(0)
    m = TinyNet()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    skip = str(tmp_path / "skip")
    ema = PostHocEMA(m, store=skip, snapshot_every=10, writer="sync")
    _train_steps(ema, m, opt, 65)
    ema.close(final_snapshot=False)
    assert [s.step for s in open_store(skip).snapshots()][-1] == 60

    still = str(tmp_path / "still")  # the last update is a snapshot step: nothing after it
    ema = PostHocEMA(m, store=still, snapshot_every=10, writer="sync")
    _train_steps(ema, m, opt, 60)
    with caplog.at_level(logging.INFO, logger="dist_ema"):
        ema.close()
    assert [s.step for s in open_store(still).snapshots()] == [10, 20, 30, 40, 50, 60]
    assert not [r for r in caplog.records if "final snapshot" in r.getMessage()]

    on_demand = str(tmp_path / "on_demand")  # no snapshot_every: the script decides, close() adds nothing
    ema = PostHocEMA(m, store=on_demand, writer="sync")
    _train_steps(ema, m, opt, 5)
    ema.snapshot()
    _train_steps(ema, m, opt, 3)
    ema.close()
    assert [s.step for s in open_store(on_demand).snapshots()] == [5]


def _two_ranks_worker(rank: int, world: int, out_dir: str, url: str) -> None:
    import json

    torch.manual_seed(0)
    m = torch.nn.parallel.DistributedDataParallel(TinyNet())
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("dist_ema").addHandler(handler)
    logging.getLogger("dist_ema").setLevel(logging.INFO)
    with PostHocEMA(m, store=url, snapshot_every=10) as ema:  # leaving the block closes it
        _train_steps(ema, m, opt, 65, rank)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump([x for x in records if "final snapshot" in x], f)


def test_close_final_snapshot_on_two_ranks(tmp_path):
    import json

    url = str(tmp_path / "s")
    out = tmp_path / "out"
    out.mkdir()
    run_workers("tests.test_readme:_two_ranks_worker", world_size=2, out_dir=out,
                kwargs={"url": url}, timeout=180)
    assert [s.step for s in open_store(url).snapshots()] == [10, 20, 30, 40, 50, 60, 65]
    assert len(json.loads((out / "rank0.json").read_text())) == 1  # one INFO line, from rank 0
    assert json.loads((out / "rank1.json").read_text()) == []


def test_at_exit_without_close_takes_no_final_snapshot(tmp_path):
    """At interpreter exit (no close()) the pending snapshots are committed as before, nothing more."""
    url = str(tmp_path / "s")
    code = textwrap.dedent(f"""
        import torch
        from dist_ema import PostHocEMA
        from tests.engines import TinyNet, batch
        torch.manual_seed(0)
        m = TinyNet()
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        ema = PostHocEMA(m, store={url!r}, snapshot_every=10)
        for step in range(65):
            x, y = batch(step, 0)
            (m(x) - y).pow(2).mean().backward(); opt.step(); opt.zero_grad(); ema.update()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [s.step for s in open_store(url).snapshots()] == [10, 20, 30, 40, 50, 60]
    assert "without ema.close()" in r.stderr
