"""A tiny HF Accelerate run with attach_ema, started by tests/test_integrations.py under ``accelerate launch``.

    accelerate launch --multi_gpu --num_processes 2 tests/apps/accelerate_app.py OUT PHASE ddp
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 tests/apps/accelerate_app.py OUT PHASE fsdp2
    accelerate launch --use_deepspeed --zero_stage 3 --num_processes 2 tests/apps/accelerate_app.py OUT PHASE zero3

Phase "a" trains 6 optimizer steps (gradient_accumulation_steps=2) and saves the state; phase "b" (new
processes) loads it and trains 4 more. Phase "ab" does both in one run, with 3 abandoned steps between the
save and the load. Rank 0 writes the weights after every optimizer step, the EMA after phase a, right after
load_state and at the end.

On CPU, Accelerate needs help with two of the plugins (see ``make_accelerator``):

- DeepSpeed: ``Accelerator(cpu=True)`` ignores the plugin (its DeepSpeed branch requires ``not cpu``), and
  without it no process group backend is found on CPU (``num_processes`` is 1 and DeepSpeed's batch-size
  check fails); ``InitProcessGroupKwargs(backend="gloo")`` gives it one. Accelerate's DeepSpeed plugin also
  imports ``transformers`` unconditionally when it is selected.
- FSDP: Accelerate turns the FSDP plugin on only for accelerator distributed types (MULTI_GPU, MULTI_XPU, ...),
  never MULTI_CPU, so on CPU the plugin is ignored silently. The app marks the CPU state as MULTI_GPU before
  the ``Accelerator`` reads it; from there Accelerate's own FSDP2 preparation (``fully_shard``) runs unchanged.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dist_ema.integrations.accelerate import attach_ema

SIGMAS = (0.05, 0.10)


def make_accelerator(plugin: str) -> Accelerator:
    if plugin == "ddp":
        return Accelerator(cpu=True, gradient_accumulation_steps=2)
    if plugin == "fsdp2":
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        PartialState(cpu=True)  # gloo process group, MULTI_CPU
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # so the FSDP plugin is used
        return Accelerator(gradient_accumulation_steps=2)
    if plugin.startswith("zero"):
        import deepspeed.comm.torch  # noqa: F401
        from accelerate.utils import InitProcessGroupKwargs

        # on CPU, DeepSpeed JIT-builds a shared-memory op (~60 s) only inference all-reduce uses: skip it
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        return Accelerator(gradient_accumulation_steps=2, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    raise ValueError(plugin)


def full_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full parameters by name (FSDP2 DTensors and ZeRO-3 partitions gathered: collective, every rank calls it)."""
    params = list(module.parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather:
        out = {}
        for k, v in module.named_parameters():
            v = v.detach()
            full = v.full_tensor() if hasattr(v, "full_tensor") else v
            out[k.replace("_checkpoint_wrapped_module.", "")] = full.clone()
    return out


def main() -> None:
    out, phase, plugin = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    accelerator = make_accelerator(plugin)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    g = torch.Generator().manual_seed(1)
    loader = DataLoader(TensorDataset(torch.randn(160, 4, generator=g), torch.randn(160, 1, generator=g)), batch_size=2)
    model, opt, loader = accelerator.prepare(net, opt, loader)
    ema = attach_ema(accelerator, model, sigma_rels=SIGMAS)
    batches = iter(loader)
    inner = accelerator.unwrap_model(model)

    def train(steps: int) -> list[dict[str, torch.Tensor]]:
        trajectory = []
        while len(trajectory) < steps:
            x, y = next(batches)
            with accelerator.accumulate(model):
                accelerator.backward(((model(x) - y) ** 2).mean())
                opt.step()
                opt.zero_grad()
            if accelerator.sync_gradients:
                ema.update()
                trajectory.append(full_params(inner))
        return trajectory

    def record(name: str, trajectory, **extra) -> None:
        full = {s: ema.full_state_dict(sigma_rel=s) for s in SIGMAS}
        owned = [None] * accelerator.num_processes  # EMA elements each rank averages (and writes)
        torch.distributed.all_gather_object(owned, ema.owned_numel)
        if not accelerator.is_main_process:
            return
        zero = hasattr(next(inner.parameters()), "ds_id")
        torch.save({
            "trajectory": trajectory, "ema": full, "clock": (ema.step, ema.t, ema.updates),
            "world": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type).split(".")[-1],
            "engine": type(model).__name__, "layout": ema.layout.engine, "owned": owned,
            "numel": sum(p.ds_numel if zero else p.numel() for p in inner.parameters()),
            "gradient_accumulation": getattr(model, "gradient_accumulation_steps", lambda: None)(),
            "fsdp_units": sum(type(m).__name__.startswith("FSDP") for m in inner.modules()),
            "dtensor": any(hasattr(p, "full_tensor") for p in inner.parameters()),
            # ZeRO-3: outside a gather every parameter is an empty placeholder
            "partitioned": all(zero and p.numel() == 0 for p in inner.parameters()), **extra,
        }, out / f"{name}.pt")

    if phase in ("a", "ab"):  # 6 optimizer steps, then save_state
        trajectory = train(6)
        accelerator.save_state(str(out / "state"))
        record("a", trajectory)
    if phase == "ab":
        # in the same processes: 3 more steps, then load_state takes model, optimizer and EMA back to step 6
        train(3)
        accelerator.load_state(str(out / "state"))
        loaded = {s: ema.full_state_dict(sigma_rel=s) for s in SIGMAS}
        record("b", train(4), loaded=loaded)
    if phase == "b":  # fresh processes: load_state, then 4 more steps
        accelerator.load_state(str(out / "state"))
        loaded = {s: ema.full_state_dict(sigma_rel=s) for s in SIGMAS}
        record("b", train(4), loaded=loaded)
    ema.close()
    accelerator.wait_for_everyone()
    sys.stdout.flush()
    sys.stderr.flush()
    torch.distributed.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
