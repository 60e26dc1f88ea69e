#!/usr/bin/env python
"""The smallest complete use of dist-ema: FSDP2 training with post-hoc EMA, then a sigma_rel sweep.

    torchrun --nproc-per-node 2 launch/minimal_train.py runs/minimal     # CPU (gloo) or one GPU per rank (NCCL)

A small MLP learns a fixed linear map from synthetic data under ``fully_shard``. The lines marked
``# dist-ema`` are all that post-hoc EMA adds: track two profiles, write a snapshot every 20 steps,
update after every optimizer step, close, then synthesize sigma_rels that were never tracked from
the snapshots (here on the training ranks; later, at any world size, with the command printed last).
The run directory must not hold an earlier run (the store refuses to mix two runs).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard

from dist_ema import PostHocEMA, synthesize  # dist-ema

STEPS, BATCH, LR = 200, 64, 0.01
SIGMA_RELS = (0.05, 0.10)  # tracked during training
SWEEP = (0.05, 0.10, 0.15, 0.20)  # synthesized after training


def build_model() -> nn.Sequential:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s (inputs, targets) at ``step``: a pure function of both, so any run can replay it."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x, noise = torch.randn(BATCH, 32, generator=g), torch.randn(BATCH, 8, generator=g)
    w = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)) / 32**0.5  # the map to learn
    return x, x @ w + 0.1 * noise


def main(run_dir: str) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    model = build_model().to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    store = f"{run_dir}/snapshots"

    ema = PostHocEMA(model, sigma_rels=SIGMA_RELS, store=store, snapshot_every=20)  # dist-ema
    for step in range(1, STEPS + 1):
        x, y = (t.to(device) for t in batch(step, rank))
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update()  # dist-ema: after every optimizer step
        if rank == 0 and step % 50 == 0:
            print(f"step {step}/{STEPS}  loss {loss.item():.4f}", flush=True)
    ema.close()  # dist-ema: a final snapshot if needed, then wait until every snapshot is committed

    res = synthesize(store, sigma_rels=SWEEP, out=f"{run_dir}/synth", progress=False)  # dist-ema: every rank
    if rank == 0:
        for target, file in zip(res.targets, res.files):
            print(f"sigma_rel={target['sigma_rel']:.2f}  reconstruction error {target['error']:.2%}  -> {file}")
        print(f"later, at any world size: torchrun --nproc-per-node N -m dist_ema synthesize {store} "  # dist-ema
              f"--sigma-rel 0.12 --out {run_dir}/synth-0.12")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/minimal")
