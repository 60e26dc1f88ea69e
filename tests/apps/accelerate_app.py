"""A tiny HF Accelerate run with attach_ema, started by tests/test_integrations.py under ``accelerate launch``.

    accelerate launch --cpu --num_processes 2 tests/apps/accelerate_app.py OUT PHASE

Phase "a" trains 6 optimizer steps (gradient_accumulation_steps=2) and saves the state; phase "b"
loads it and trains 4 more. Rank 0 writes the weights after every optimizer step and the EMA.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dist_ema.integrations.accelerate import attach_ema

SIGMAS = (0.05, 0.10)


def full_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full parameters by name (FSDP2 DTensors gathered: collective, every rank calls it)."""
    out = {}
    for k, v in module.named_parameters():
        v = v.detach()
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k.replace("_checkpoint_wrapped_module.", "")] = full.clone()
    return out


def main() -> None:
    out, phase = Path(sys.argv[1]), sys.argv[2]
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    g = torch.Generator().manual_seed(1)
    loader = DataLoader(TensorDataset(torch.randn(48, 4, generator=g), torch.randn(48, 1, generator=g)), batch_size=2)
    model, opt, loader = accelerator.prepare(net, opt, loader)
    ema = attach_ema(accelerator, model, sigma_rels=SIGMAS)
    if phase == "b":
        accelerator.load_state(str(out / "state"))
    steps = 6 if phase == "a" else 4
    trajectory = []
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(((model(x) - y) ** 2).mean())
            opt.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            ema.update()
            trajectory.append(full_params(accelerator.unwrap_model(model)))
            if len(trajectory) == steps:
                break
    if phase == "a":
        accelerator.save_state(str(out / "state"))
    full = {s: ema.full_state_dict(sigma_rel=s) for s in SIGMAS}
    if accelerator.is_main_process:
        clock = (ema.step, ema.t, ema.updates)
        record = {"trajectory": trajectory, "ema": full, "clock": clock, "world": accelerator.num_processes,
                  "engine": type(model).__name__,
                  "dtensor": any(hasattr(p, "full_tensor") for p in accelerator.unwrap_model(model).parameters())}
        torch.save(record, out / f"{phase}.pt")
    ema.close()
    accelerator.wait_for_everyone()
    sys.stdout.flush()
    sys.stderr.flush()
    torch.distributed.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
