"""Lightning: ``PostHocEMACallback``, an EMA of the model as the strategy sharded it.

    trainer = Trainer(strategy="ddp", accumulate_grad_batches=4,
                      callbacks=[PostHocEMACallback(sigma_rels=(0.05, 0.10), store="runs/x/snapshots",
                                                    snapshot_every=100, validate_with=0.10)])
    trainer.fit(model)                       # trainer.fit(model, ckpt_path=...) restores the EMA too

- builds a :class:`~dist_ema.PostHocEMA` on ``trainer.strategy.model`` when training starts
  (DDP module, FSDP module or DeepSpeed engine: every rank keeps its own shards, nothing gathered);
- updates it once per real optimizer step (``trainer.global_step`` advanced: gradient-accumulation
  micro-batches are not counted; steps the GradScaler or DeepSpeed skipped are detected by the EMA);
- snapshots on the EMA's schedule (``snapshot_every``);
- ``validate_with=sigma_rel``: validation runs with that EMA swapped into the live model (tracked or
  synthesized), the training weights are restored exactly afterwards;
- checkpoints: ``trainer.save_checkpoint(path)`` (and ``ModelCheckpoint``) also writes the EMA with
  torch.distributed.checkpoint to ``<path>.dist_ema/`` (every rank its own shards; removed with the
  checkpoint), and the callback's state in the checkpoint records it; ``fit(ckpt_path=path)`` loads it
  back (any world size: DCP reshards);
- flushes and closes the EMA at the end of fit (``ema.close()``); a later ``fit()`` on the same Trainer
  reopens it (from the store's newest snapshot, as a restart; without a store the in-memory state);
- ``fit(ckpt_path=...)`` follows a link (``ModelCheckpoint(save_last="link")``'s ``last.ckpt``) to the
  checkpoint it names, whose EMA folder sits beside it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the extra is optional
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as e:
        raise ImportError(
            "dist_ema.integrations.lightning needs Lightning: pip install 'dist-ema[lightning]'"
        ) from e

from dist_ema.errors import CheckpointError, ConfigError
from dist_ema.tracker import PostHocEMA

__all__ = ["EMA_SUFFIX", "PostHocEMACallback"]

EMA_SUFFIX = ".dist_ema"  # the EMA's DCP checkpoint next to a Lightning checkpoint: <path>.dist_ema/


class PostHocEMACallback(Callback):
    """Post-hoc EMA for a Lightning ``Trainer``; see the module docstring.

    Args:
        sigma_rels: tracked profiles (default (0.05, 0.10)).
        store / snapshot_every: the snapshot store and its schedule (see :class:`PostHocEMA`).
        validate_with: a sigma_rel to validate with (swapped in for validation), or None.
        **ema_kwargs: any other :class:`PostHocEMA` option (``gammas``, ``update_every``, ``keep``, ...).

    ``self.ema`` is the :class:`PostHocEMA` (None before training starts).
    """

    def __init__(self, sigma_rels: Sequence[float] | None = None, *, store: str | None = None,
                 snapshot_every: int | None = None, validate_with: float | None = None, **ema_kwargs: Any) -> None:
        self.ema_kwargs = dict(ema_kwargs, sigma_rels=sigma_rels, store=store, snapshot_every=snapshot_every)
        self.validate_with = validate_with
        self.ema: PostHocEMA | None = None
        self._seen_step = None
        self._swap: contextlib.ExitStack | None = None
        self._pending: str | None = None  # DCP folder to load once the EMA exists
        self._load_path: str | None = None
        self._wrapped = None
        self._closed = False  # the EMA was closed at the end of a fit()

    @property
    def state_key(self) -> str:
        return "PostHocEMACallback"

    # ------------------------------------------------------------------ construction

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self._wrapped is trainer.strategy:
            return
        self._wrap_strategy(trainer.strategy)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.ema is None or self._closed:
            self.ema = self._open(trainer.strategy.model, previous=self.ema)
            self._closed = False
        if self._pending is not None:
            import torch.distributed.checkpoint as dcp

            path, self._pending = self._pending, None
            dcp.load({"ema": self.ema}, checkpoint_id=path)
        self._seen_step = trainer.global_step

    def _open(self, model, previous: PostHocEMA | None) -> PostHocEMA:
        """The EMA of ``model`` (the strategy's, wrapped anew by every ``fit()``).

        A later ``fit()`` on the same Trainer finds the previous fit's EMA closed: with a store it is
        reopened from the store's newest snapshot (which ``close()`` made the final state), as a restart
        would; without one the in-memory state is carried over (same sharding). A checkpoint given
        as ``ckpt_path`` is loaded over either afterwards.
        """
        kwargs = dict(self.ema_kwargs)
        reopen = previous is not None
        if (reopen or self._pending is not None) and kwargs.get("store") is not None:
            kwargs["resume"] = kwargs.get("resume") or True  # the store holds this run's snapshots
        ema = PostHocEMA(model, **kwargs)
        if reopen and kwargs.get("store") is None:
            ema.load_state_dict(previous.per_rank_state_dict())
        return ema

    def _wrap_strategy(self, strategy) -> None:
        """Route the strategy's checkpoint save/load/remove through the EMA too (on every rank)."""
        save, load, remove = strategy.save_checkpoint, strategy.load_checkpoint, strategy.remove_checkpoint
        cb = self

        def save_checkpoint(checkpoint, filepath, *args, **kwargs):
            if cb.ema is not None:
                import torch.distributed.checkpoint as dcp

                cb.ema.flush()  # the checkpoint and the store agree
                dcp.save({"ema": cb.ema}, checkpoint_id=_ema_dir(filepath))
            return save(checkpoint, filepath, *args, **kwargs)

        def load_checkpoint(checkpoint_path, *args, **kwargs):
            # ModelCheckpoint(save_last="link") makes last.ckpt a link: the EMA folder sits beside its target
            cb._load_path = _resolve_link(os.fspath(checkpoint_path))
            return load(checkpoint_path, *args, **kwargs)

        def remove_checkpoint(filepath, *args, **kwargs):
            out = remove(filepath, *args, **kwargs)
            if strategy.is_global_zero:
                shutil.rmtree(_ema_dir(filepath), ignore_errors=True)
            return out

        strategy.save_checkpoint, strategy.load_checkpoint = save_checkpoint, load_checkpoint
        strategy.remove_checkpoint = remove_checkpoint
        self._wrapped = strategy

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        head = dict(self.ema.state_dict()["dist_ema"])  # scalars only; the shards go through DCP
        head["dcp_suffix"] = EMA_SUFFIX
        return head

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._load_path is None:
            raise ConfigError("PostHocEMACallback: a checkpoint state arrived without a checkpoint path")
        path = _ema_dir(self._load_path)
        if not os.path.exists(os.path.join(path, ".metadata")):
            raise CheckpointError(
                f"the EMA of checkpoint {self._load_path!r} is missing ({path}); copy it along with the "
                "checkpoint, or resume the EMA from its snapshot store (store=url, resume=True)"
            )
        self._pending = path
        if self.ema is not None:  # loaded after training started (the strategy restores late)
            import torch.distributed.checkpoint as dcp

            self._pending = None
            dcp.load({"ema": self.ema}, checkpoint_id=path)

    # ------------------------------------------------------------------ training

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.ema is None or trainer.global_step == self._seen_step:
            return  # a gradient-accumulation micro-batch: no optimizer step yet
        self._seen_step = trainer.global_step
        self.ema.update()

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.validate_with is None or self.ema is None or self.ema.updates == 0 or trainer.sanity_checking:
            return
        self._swap = contextlib.ExitStack()
        self._swap.enter_context(self.ema.swapped(sigma_rel=self.validate_with))

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.close()  # the training weights back, exactly

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.ema is not None and not self._closed:
            self.ema.close()  # kept for full_state_dict() and save_checkpoint(); a later fit() reopens it
            self._closed = True

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._swap is not None:
            with contextlib.suppress(Exception):
                self._swap.close()
            self._swap = None
        if self.ema is not None and self.ema.snapshots is not None:
            self.ema.snapshots.abandon()  # no collectives: the other ranks may not be here
        self._closed = self.ema is not None  # a later fit() opens a new EMA


def _resolve_link(path: str) -> str:
    """``path`` with symbolic links resolved (local paths only: a URL is returned as it is)."""
    if "://" in path or not os.path.islink(path):
        return path
    return os.path.realpath(path)


def _ema_dir(filepath) -> str:
    return os.fspath(filepath).rstrip("/\\") + EMA_SUFFIX
