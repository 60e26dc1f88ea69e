"""HF Accelerate: an EMA on the prepared (sharded) model, saved and loaded with ``save_state`` / ``load_state``.

    accelerator = Accelerator(gradient_accumulation_steps=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema = attach_ema(accelerator, model, sigma_rels=(0.05, 0.10), store="runs/x/snapshots", snapshot_every=100)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model, batch))
            optimizer.step(); optimizer.zero_grad()
        if accelerator.sync_gradients:
            ema.update()            # once per real optimizer step
    accelerator.save_state("ckpt")  # the EMA goes to ckpt/dist_ema (DCP, every rank its own shards)
    ema.close()

``accelerator.load_state("ckpt")`` restores it (at any world size: DCP reshards). Works with
DDP, the FSDP plugin and the DeepSpeed plugin (pass the model ``prepare`` returned: under
DeepSpeed that is the engine).

On CPU, Accelerate applies neither plugin with ``Accelerator(cpu=True)``, and the FSDP plugin not
at all (it turns FSDP on only for accelerator devices); the DeepSpeed plugin runs on CPU with
``Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])`` and ``DS_ACCELERATOR=cpu``.
``attach_ema`` logs a warning when ``accelerate launch`` asked for a plugin that the prepared model
does not use, since the EMA then tracks what ``prepare`` really built.
"""

from __future__ import annotations

import logging
import os

from dist_ema.errors import CheckpointError
from dist_ema.tracker import PostHocEMA

log = logging.getLogger("dist_ema")

__all__ = ["EMA_DIR", "attach_ema"]

EMA_DIR = "dist_ema"  # the EMA's DCP checkpoint inside an Accelerate state folder


def attach_ema(accelerator, model, **ema_kwargs) -> PostHocEMA:
    """Create a :class:`PostHocEMA` of ``model`` (as ``accelerator.prepare`` returned it) and hook it into
    ``accelerator.save_state`` / ``load_state``. Collective: call on every process.

    ``ema_kwargs`` are :class:`PostHocEMA`'s (``sigma_rels``, ``store``, ``snapshot_every``, ...). When
    the state folder is loaded later, the EMA comes back with its clock; snapshots in the store after
    the loaded step are retired (the run continues from an older checkpoint).
    """
    _warn_ignored_plugin(accelerator, model)
    ema = PostHocEMA(model, **ema_kwargs)

    def save_hook(models, weights, output_dir) -> None:
        import torch.distributed.checkpoint as dcp

        ema.flush()  # the checkpoint and the store agree
        dcp.save({"ema": ema}, checkpoint_id=os.path.join(output_dir, EMA_DIR))

    def load_hook(models, input_dir) -> None:
        import torch.distributed.checkpoint as dcp

        path = os.path.join(input_dir, EMA_DIR)
        if not os.path.exists(os.path.join(path, ".metadata")):
            raise CheckpointError(
                f"{input_dir!r} holds no dist-ema state ({path} is missing): it was saved without attach_ema; "
                "resume the EMA from its snapshot store instead (attach_ema(..., store=url, resume=True))"
            )
        dcp.load({"ema": ema}, checkpoint_id=path)

    ema._accelerate_hooks = (accelerator.register_save_state_pre_hook(save_hook),
                             accelerator.register_load_state_pre_hook(load_hook))
    return ema


def _warn_ignored_plugin(accelerator, model) -> None:
    """``accelerate launch --use_fsdp`` / ``--use_deepspeed`` set these variables; Accelerate ignores them
    silently in some setups (on CPU: ``cpu=True``, or FSDP at all)."""
    kind = getattr(accelerator, "distributed_type", None)
    kind = str(getattr(kind, "value", kind))  # "FSDP", "DEEPSPEED", "MULTI_CPU", "NO", ...
    for env, plugin in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(env, "false").lower() == "true" and kind != plugin:
            log.warning(
                "attach_ema: %s=true, but Accelerate did not apply the %s plugin (distributed type %s, model %s): "
                "the EMA tracks the model as prepared. On CPU, Accelerator(cpu=True) ignores both plugins and FSDP "
                "needs an accelerator device; DeepSpeed runs on CPU with "
                "Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend='gloo')]) and DS_ACCELERATOR=cpu",
                env, plugin, kind, type(model).__name__,
            )
