"""A tiny Lightning run with PostHocEMACallback, started by tests/test_integrations.py under torchrun.

    torchrun --nproc-per-node 2 tests/apps/lightning_app.py OUT PHASE STRATEGY

Phase "a" trains 6 optimizer steps (accumulate_grad_batches=2) and saves a checkpoint; phase "b"
resumes it to step 10. Phase "twice" trains 6 steps, then 4 more with a second ``fit()`` on the same Trainer;
phase "link" trains 6 steps with ``ModelCheckpoint(save_last="link")``, then a new Trainer resumes from the
link ``last.ckpt`` to step 10. Rank 0 writes what the test compares with a brute-force EMA: the weights
after every optimizer step, the weights validation saw, the weights after validation, the EMA.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import lightning as L  # noqa: N812
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dist_ema.integrations.lightning import PostHocEMACallback

SIGMAS = (0.05, 0.10)


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full parameters by their plain name (under FSDP1 gathered: collective, every rank calls it)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    fsdp = [m for m in module.modules() if isinstance(m, FSDP)]
    with contextlib.ExitStack() as stack:
        for m in fsdp:
            if not any(m is not o and m in list(o.modules()) for o in fsdp):
                stack.enter_context(FSDP.summon_full_params(m, writeback=False))
        return {k.removeprefix("_forward_module.").replace("_fsdp_wrapped_module.", ""): v.detach().clone().float()
                for k, v in module.named_parameters()}


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)
        self.seen_in_validation: list = []

    def configure_model(self):
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy):
            # wrapped here with device_id=cpu: the strategy's own wrapping passes device_id=None, which FSDP
            # refuses without an accelerator ("FSDP needs a non-CPU accelerator device")
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            self.fc1 = FSDP(self.fc1, use_orig_params=True, device_id=torch.device("cpu"))
            self.fc2 = FSDP(self.fc2, use_orig_params=True, device_id=torch.device("cpu"))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))).sum(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self(x) - y) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.seen_in_validation.append((self.trainer.global_step, params(self)))
        x, y = batch
        self.log("val_loss", ((self(x) - y) ** 2).mean(), sync_dist=True)

    def configure_optimizers(self):
        # momentum: a non-empty optimizer state, which FSDP1's sharded load needs
        return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.5)

    def _data(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, generator=g)), batch_size=2)

    def train_dataloader(self):
        return self._data(16, 1)  # 2 ranks x 4 batches per epoch = 2 optimizer steps per epoch

    def val_dataloader(self):
        return self._data(4, 2)


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.trajectory, self.after_validation, self.seen = [], [], None

    def on_train_start(self, trainer, pl_module):
        self.seen = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.seen:
            self.seen = trainer.global_step
            self.trajectory.append(params(pl_module))

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.after_validation.append((trainer.global_step, params(pl_module)))


def make_strategy(name: str):
    """"ddp"; "fsdp": Lightning's FSDPStrategy (FSDP1). ``Trainer(strategy="fsdp", accelerator="cpu")`` is refused
    ("The strategy `fsdp` requires a GPU accelerator"); the check tests ``type(flag) is FSDPStrategy``, so a
    subclass instance (nothing overridden) runs the unchanged strategy on CPU with gloo."""
    if name != "fsdp":
        return name
    from lightning.pytorch.strategies import FSDPStrategy

    class CPUFSDPStrategy(FSDPStrategy):
        pass

    return CPUFSDPStrategy(process_group_backend="gloo", state_dict_type="sharded")


def make_trainer(strategy, cb: PostHocEMACallback, rec: Recorder, max_steps: int, *extra: L.Callback) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=max_steps, accumulate_grad_batches=2,
                     limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=bool(extra),
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, rec, *extra])


def make_callback(out: Path) -> PostHocEMACallback:
    return PostHocEMACallback(sigma_rels=SIGMAS, store=str(out / "store"), snapshot_every=2, validate_with=0.10)


def run_phase(out: Path, phase: str, strategy) -> tuple[L.Trainer, PostHocEMACallback, Recorder, Net]:
    """Train one phase; returns the last trainer, its callback, the recorder and the model."""
    cb, rec, model = make_callback(out), Recorder(), Net()
    if phase in ("a", "b"):
        trainer = make_trainer(strategy, cb, rec, 6 if phase == "a" else 10)
        trainer.fit(model, ckpt_path=None if phase == "a" else str(out / "a.ckpt"))
        if phase == "a":
            trainer.save_checkpoint(str(out / "a.ckpt"))
    elif phase == "twice":  # a second fit() on the same Trainer continues training, and the EMA with it
        trainer = make_trainer(strategy, cb, rec, 6)
        trainer.fit(model)
        trainer.fit_loop.epoch_loop.max_steps = 10
        trainer.fit(model)
    elif phase == "link":  # ModelCheckpoint's last.ckpt is a link; a new Trainer resumes from the link
        from lightning.pytorch.callbacks import ModelCheckpoint

        ckpt = ModelCheckpoint(dirpath=str(out / "ckpt"), every_n_train_steps=2, save_top_k=1, save_last="link")
        make_trainer(strategy, cb, rec, 6, ckpt).fit(model)
        cb, model = make_callback(out), Net()
        trainer = make_trainer(strategy, cb, rec, 10)
        trainer.fit(model, ckpt_path=str(out / "ckpt" / "last.ckpt"))
    else:
        raise ValueError(f"unknown phase {phase!r}")
    return trainer, cb, rec, model


def main() -> None:
    out, phase, strategy = Path(sys.argv[1]), sys.argv[2], make_strategy(sys.argv[3])
    trainer, cb, rec, model = run_phase(out, phase, strategy)
    ema = {s: cb.ema.full_state_dict(sigma_rel=s) for s in SIGMAS}
    if trainer.global_rank == 0:
        torch.save({"trajectory": rec.trajectory, "validation": model.seen_in_validation,
                    "after_validation": rec.after_validation, "ema": ema,
                    "clock": (cb.ema.step, cb.ema.t, cb.ema.updates)}, out / f"{phase}.pt")
    sys.stdout.flush()
    sys.stderr.flush()
    torch.distributed.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
