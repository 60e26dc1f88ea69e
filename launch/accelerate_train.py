#!/usr/bin/env python
"""dist-ema with HF Accelerate: a toy regression model, 2 processes, snapshots, then a synthesis.

    accelerate launch --num_processes 2 launch/accelerate_train.py                   # DDP (gloo on CPU)
    accelerate launch --use_deepspeed --zero_stage 2 --num_processes 2 launch/accelerate_train.py
    accelerate launch --num_processes 2 launch/accelerate_train.py --steps 100 --run-dir runs/acc2

Trains a small MLP for 40 optimizer steps (gradient accumulation 2) with a deliberately high
learning rate. ``attach_ema`` tracks sigma_rel 0.05 and 0.10 and writes a snapshot every 10 steps
into ``<run-dir>/snapshots``; ``accelerator.save_state`` writes the EMA next to the model and
optimizer (``<run-dir>/state/dist_ema``, every process its own shards). At the end the held-out
loss of the raw weights and of three EMAs swapped into the live model is printed (0.07 is not
tracked: it is synthesized from the snapshots), then every process takes part in a synthesis of
sigma_rel 0.07 into safetensors, which rank 0 loads into a plain ``nn.Module``.

On CPU, Accelerate needs ``Accelerator(cpu=True)`` to join the processes (gloo), and it ignores the
DeepSpeed plugin then; for ``--use_deepspeed`` this script passes the gloo backend instead (and
DeepSpeed's accelerator must be the CPU: ``DS_ACCELERATOR=cpu``, set here when no GPU is found).
Each run starts from a clean run directory (one this script did not create is never touched).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

MARKER = ".dist-ema-accelerate-example"
SIGMAS = (0.05, 0.10)


def make_accelerator(gradient_accumulation_steps: int):
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if torch.cuda.is_available():
        return Accelerator(gradient_accumulation_steps=gradient_accumulation_steps)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        import deepspeed.comm.torch  # noqa: F401

        # DeepSpeed JIT-builds a shared-memory op on CPU (~60 s) that only inference all-reduce uses
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        return Accelerator(gradient_accumulation_steps=gradient_accumulation_steps,
                           kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    return Accelerator(cpu=True, gradient_accumulation_steps=gradient_accumulation_steps)


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x @ torch.linspace(-1, 1, 8)).unsqueeze(1) + 0.3 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", default="runs/accelerate", help="snapshots, state and synthesis go here")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps")
    p.add_argument("--snapshot-every", type=int, default=10)
    args = p.parse_args()
    accelerator = make_accelerator(gradient_accumulation_steps=2)
    from dist_ema import open_store, synthesize
    from dist_ema.integrations.accelerate import attach_ema

    run = Path(args.run_dir)
    if accelerator.is_main_process:  # a clean run directory: the store refuses to overwrite snapshots
        if run.exists() and any(run.iterdir()):
            if not (run / MARKER).exists():
                raise SystemExit(f"{run} exists and was not made by this script; pass --run-dir to a new directory")
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)
        (run / MARKER).write_text("made by launch/accelerate_train.py; its next run deletes this directory\n")
    accelerator.wait_for_everyone()

    torch.manual_seed(0)
    net = make_model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    # enough batches for every step: 2 micro-batches per step and process
    loader = DataLoader(data(8 * 2 * accelerator.num_processes * args.steps, 1), batch_size=8, shuffle=True)
    model, opt, loader = accelerator.prepare(net, opt, loader)
    store = str(run / "snapshots")
    ema = attach_ema(accelerator, model, sigma_rels=SIGMAS, store=store, snapshot_every=args.snapshot_every)

    step = 0
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            opt.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            ema.update()  # once per real optimizer step
            step += 1
            if step == args.steps:
                break
    accelerator.save_state(str(run / "state"))  # model, optimizer and the EMA (state/dist_ema, DCP)

    held_out = data(512, 2).tensors
    x_eval, y_eval = (t.to(accelerator.device) for t in held_out)

    def loss() -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(model(x_eval), y_eval).item()

    rows = [("raw weights", loss())]
    for s in (0.05, 0.07, 0.10):
        with ema.swapped(sigma_rel=s):  # every process its own shards; the training weights come back after
            rows.append((f"EMA sigma_rel={s:.2f}" + ("" if s in SIGMAS else " (synthesized)"), loss()))
    ema.close()  # commits every snapshot

    out = str(run / "synth")
    result = synthesize(store, sigma_rels=[0.07], out=out, progress=False)  # every process takes part
    if accelerator.is_main_process:
        snaps = open_store(store).snapshots()
        print(f"{accelerator.distributed_type.value} on {accelerator.num_processes} processes, {step} optimizer steps")
        print(f"stored snapshots (steps): {[s.step for s in snaps]} in {store}")
        print(f"EMA checkpoint of save_state: {sorted(f.name for f in (run / 'state' / 'dist_ema').iterdir())}")
        for name, value in rows:
            print(f"  {name:<36} held-out loss {value:.4f}")
        from safetensors.torch import load_file

        plain = make_model()
        plain.load_state_dict(load_file(result.files[0]))
        with torch.no_grad():
            synth_loss = nn.functional.mse_loss(plain(held_out[0]), held_out[1]).item()
        print(f"synthesized sigma_rel=0.07 from {len(result.snapshots)} snapshots -> {result.files[0]}: "
              f"held-out loss {synth_loss:.4f} in a plain nn.Module")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
