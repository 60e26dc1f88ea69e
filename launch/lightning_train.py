#!/usr/bin/env python
"""dist-ema with Lightning: a toy regression model, DDP on 2 CPU processes, snapshots, then a synthesis.

    python launch/lightning_train.py                        # Lightning starts the 2 processes itself
    python launch/lightning_train.py --steps 100 --devices 3 --run-dir runs/lit2

Trains a small MLP for 40 optimizer steps (``accumulate_grad_batches=2``) with a deliberately high
learning rate. ``PostHocEMACallback`` tracks sigma_rel 0.05 and 0.10, writes a snapshot every 10
steps into ``<run-dir>/snapshots`` and validates with the sigma_rel 0.10 EMA swapped in (the training
weights come back exactly afterwards). ``trainer.save_checkpoint`` writes the EMA next to the
checkpoint (``<run-dir>/last.ckpt.dist_ema``, every process its own shards). After fit every process
takes part in a synthesis of sigma_rel 0.07 (not tracked) from the snapshots; rank 0 loads it into a
plain ``nn.Module`` and prints the held-out loss of the raw weights, the validation with the EMA and
the synthesized EMA. Each run starts from a clean run directory (one this script did not create is
never touched).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import lightning as L  # noqa: N812
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dist_ema import open_store, synthesize
from dist_ema.integrations.lightning import PostHocEMACallback

MARKER = ".dist-ema-lightning-example"


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x @ torch.linspace(-1, 1, 8)).unsqueeze(1) + 0.3 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def make_net() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))


class Regression(L.LightningModule):
    def __init__(self, train_samples: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = make_net()
        self.train_samples = train_samples

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(data(self.train_samples, 1), batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(data(512, 2), batch_size=512)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", default="runs/lightning", help="snapshots, checkpoint and synthesis go here")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps")
    p.add_argument("--snapshot-every", type=int, default=10)
    p.add_argument("--devices", type=int, default=2, help="CPU processes (DDP)")
    args = p.parse_args()
    run = Path(args.run_dir)
    store = str(run / "snapshots")

    ema_cb = PostHocEMACallback(sigma_rels=(0.05, 0.10), store=store, snapshot_every=args.snapshot_every,
                                validate_with=0.10)
    # one epoch of exactly --steps optimizer steps (2 micro-batches of 8 per step and process), validated at its end
    model = Regression(train_samples=8 * 2 * args.devices * args.steps)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp", max_steps=args.steps,
                        accumulate_grad_batches=2, num_sanity_val_steps=0, callbacks=[ema_cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    if trainer.is_global_zero:  # a clean run directory: the store refuses to overwrite snapshots
        if run.exists() and any(run.iterdir()):
            if not (run / MARKER).exists():
                raise SystemExit(f"{run} exists and was not made by this script; pass --run-dir to a new directory")
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)
        (run / MARKER).write_text("made by launch/lightning_train.py; its next run deletes this directory\n")
    trainer.fit(model)  # the processes join here; the EMA is closed (every snapshot committed) at the end
    val_with_ema = float(trainer.callback_metrics["val_loss"])
    trainer.save_checkpoint(str(run / "last.ckpt"))  # last.ckpt and, next to it, last.ckpt.dist_ema/

    result = synthesize(store, sigma_rels=[0.07], out=str(run / "synth"), progress=False)  # every process
    if trainer.is_global_zero:
        from safetensors.torch import load_file

        x, y = data(512, 2).tensors
        plain = make_net()
        with torch.no_grad():
            raw = nn.functional.mse_loss(model.net(x), y).item()
            plain.load_state_dict({k.removeprefix("net."): v for k, v in load_file(result.files[0]).items()})
            synth = nn.functional.mse_loss(plain(x), y).item()
        snaps = open_store(store).snapshots()
        print(f"Lightning DDP on {trainer.world_size} processes, {trainer.global_step} optimizer steps")
        print(f"stored snapshots (steps): {[s.step for s in snaps]} in {store}")
        print(f"EMA next to the checkpoint: {sorted(f.name for f in (run / 'last.ckpt.dist_ema').iterdir())}")
        print(f"  raw weights                          held-out loss {raw:.4f}")
        print(f"  EMA sigma_rel=0.10 (validate_with)   held-out loss {val_with_ema:.4f}")
        print(f"  EMA sigma_rel=0.07 (synthesized)     held-out loss {synth:.4f}  <- {result.files[0]}")


if __name__ == "__main__":
    main()
