"""An exception (Ctrl-C's KeyboardInterrupt, an error in the training loop) leaving a ``with PostHocEMA(...)``
block: one process commits what it took, as at exit; the writer, its shared memory and the store are released."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_ema.store import open_store
from dist_ema.tracker import PostHocEMA

pytest.importorskip("psutil")
from tests.test_interrupts import _running  # noqa: E402 - after the skip: it needs psutil


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_an_exception_in_a_with_block_commits_the_pending_snapshots_of_one_process(tmp_path, exc):
    url = str(tmp_path / "s")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    want, writer, shms = {}, None, []
    with pytest.raises(exc):
        with PostHocEMA(m, sigma_rels=(0.05, 0.10), store=url, writer="process") as ema:
            for i in range(6):
                m(torch.randn(8, 16)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                ema.update()
                if (i + 1) % 3 == 0:
                    ema.snapshot()
                    want[i + 1] = {k: v.clone() for k, v in ema.full_state_dict(sigma_rel=0.10).items()}
            writer = ema.snapshots.writer._proc.pid
            shms = [s.name for s in ema.snapshots.writer._shms]
            raise exc("interrupted")
    store = open_store(url)
    assert [s.step for s in store.snapshots()] == [3, 6]
    for step, values in want.items():
        for name, v in values.items():
            if name in dict(m.named_parameters()):  # buffers are checked by tests/test_buffers_0dim.py
                assert torch.equal(store.read(step, 0.10, name), v), (step, name)
    assert not _running(writer)
    assert [n for n in shms if Path("/dev/shm", n).exists()] == []
    assert not (Path(url) / "owner.json").exists()
