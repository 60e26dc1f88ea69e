"""The user's module names, whatever wraps the model: tied parameters, torch.compile, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_ema.synthesis import synthesize
from dist_ema.tracker import PostHocEMA
from tests.dist_harness import run_workers


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight  # tied: one parameter, two names

    def forward(self, idx):
        return self.head(torch.relu(self.mid(self.emb(idx))))


def _train(model, ema, steps, opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.2)
    for i in range(steps):
        torch.manual_seed(i)
        model(torch.randint(0, 5, (6,))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update()


def test_tied_parameters_are_exported_under_every_name(tmp_path):
    torch.manual_seed(0)
    m = Tied()
    url = str(tmp_path / "s")
    ema = PostHocEMA(m, sigma_rels=(0.05, 0.10), store=url, snapshot_every=2, writer="sync")
    _train(m, ema, 6)
    full = ema.full_state_dict(sigma_rel=0.10)
    ema.close()
    assert set(full) == set(m.state_dict())  # head.weight included
    assert torch.equal(full["head.weight"], full["emb.weight"])
    fresh = Tied()
    fresh.load_state_dict(full)  # strict
    torch.testing.assert_close(fresh.head.weight, full["emb.weight"])
    # the exported file: every name, loadable strictly; the tie is recorded in the metadata
    res = synthesize(url, sigma_rels=[0.10], out=str(tmp_path / "o"), progress=False)
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = next(Path(tmp_path / "o").glob("sigma_rel-*/model.safetensors"))
    sd = load_file(str(path))
    assert set(sd) == set(m.state_dict())
    torch.testing.assert_close(sd["head.weight"], full["emb.weight"])  # tracked profile == synthesized at its t
    Tied().load_state_dict(sd)
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["dist_ema"])["ties"] == {"head.weight": "emb.weight"}
    assert res.targets[0]["error"] < 1e-6


# ----------------------------------------------------------------------------- torch.compile and DDP


def worker_compiled_names(rank, ws, out, order):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    names = [n for n, _ in net.named_parameters()]
    if order == "compile_of_ddp":
        model = torch.compile(nn.parallel.DistributedDataParallel(net), backend="eager")
    elif order == "ddp_of_compiled":
        model = nn.parallel.DistributedDataParallel(torch.compile(net, backend="eager"))
    else:  # a compiled plain module (each rank averages a disjoint slice)
        model = torch.compile(net, backend="eager")
    ema = PostHocEMA(model, sigma_rels=(0.05,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        torch.manual_seed(100 * i + rank)
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update()
    full = ema.full_state_dict(sigma_rel=0.05)
    with ema.swapped(sigma_rel=0.05):
        inside = {n: p.detach().clone() for n, p in net.named_parameters()}
    if rank == 0:
        assert sorted(full) == sorted(names), (sorted(full), names)
        for n in names:
            torch.testing.assert_close(inside[n], full[n], rtol=0, atol=0)
        Path(out, "ok").write_text("1")


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("order", ["compile_of_ddp", "ddp_of_compiled", "compiled"])
def test_compiled_ddp_keeps_the_users_names(tmp_path, order):
    run_workers("tests.test_names:worker_compiled_names", 2, tmp_path, kwargs=dict(order=order))
    assert (tmp_path / "ok").exists()
