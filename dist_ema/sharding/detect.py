"""Pick the right engine adapter for a model or engine: ``make_layout(model_or_engine)``.

Detection order:

1. DeepSpeed engine (``deepspeed.DeepSpeedEngine`` or a subclass), recognised by
   :func:`dist_ema.sharding.deepspeed.is_deepspeed_engine` without importing deepspeed
   (it is only looked up in ``sys.modules``, so non-DeepSpeed users never pay its import time).
2. FSDP2: a module of the tree is an ``FSDPModule`` or a parameter is a ``DTensor``.
3. FSDP1: a ``FullyShardedDataParallel`` unit in the module tree.
4. Plain module or ``DistributedDataParallel``: replicated parameters.

FSDP1 units mixed with FSDP2 modules, a DeepSpeed-managed ``engine.module`` passed
instead of the engine, and objects that are none of the above raise
``UnsupportedEngineError``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist_ema.sharding.base import ShardLayout, UnsupportedEngineError
from dist_ema.sharding.deepspeed import is_deepspeed_engine
from dist_ema.sharding.replicated import clean_fqn, persistent_buffers

__all__ = ["detect_engine", "make_layout"]


def _deepspeed_param(model: nn.Module) -> str | None:
    """Name of a parameter DeepSpeed ZeRO manages (ZeRO-3 ``ds_id``, ZeRO-1/2 ``_hp_mapping``)."""
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            return name
    return None


def detect_engine(model_or_engine: Any) -> str:
    """Return ``"deepspeed"``, ``"fsdp2"``, ``"fsdp1"`` or ``"replicated"`` for ``model_or_engine``.

    Raises:
        UnsupportedEngineError: not an ``nn.Module``/DeepSpeed engine, FSDP1 and FSDP2
            mixed in one model, or a DeepSpeed-managed module passed without its engine.
    """
    if is_deepspeed_engine(model_or_engine):
        return "deepspeed"
    if not isinstance(model_or_engine, nn.Module):
        cls = type(model_or_engine)
        raise UnsupportedEngineError(
            f"dist-ema cannot track a {cls.__module__}.{cls.__qualname__}: "
            "pass an nn.Module (plain, DistributedDataParallel, FSDP1, or FSDP2 fully_shard) or a "
            "DeepSpeed engine returned by deepspeed.initialize"
        )
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    fsdp1 = fsdp2 = None
    for name, mod in model_or_engine.named_modules():
        if fsdp1 is None and isinstance(mod, FullyShardedDataParallel):
            fsdp1 = name or "<root>"
        if fsdp2 is None and isinstance(mod, FSDPModule):
            fsdp2 = name or "<root>"
    if fsdp2 is None:
        for name, p in model_or_engine.named_parameters():
            if isinstance(p, DTensor):
                fsdp2 = f"parameter {name}"
                break
    if fsdp1 is not None and fsdp2 is not None:
        raise UnsupportedEngineError(
            f"the model mixes FSDP1 (FullyShardedDataParallel at {fsdp1!r}) and FSDP2 "
            f"(fully_shard/DTensor at {fsdp2!r}); dist-ema supports one sharding engine per model"
        )
    if fsdp2 is not None:
        return "fsdp2"
    if fsdp1 is not None:
        return "fsdp1"
    ds_name = _deepspeed_param(model_or_engine)
    if ds_name is not None:
        raise UnsupportedEngineError(
            f"parameter {ds_name!r} is managed by DeepSpeed ZeRO; pass the DeepSpeed engine "
            "(what deepspeed.initialize returned), not engine.module"
        )
    return "replicated"


def _engine_module(model_or_engine: Any) -> nn.Module:
    module = getattr(model_or_engine, "module", model_or_engine)
    return module if isinstance(module, nn.Module) else model_or_engine


def _params_of(module: nn.Module, include_frozen: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shapes of ``module``'s tracked parameters (ZeRO-3 keeps the real shape in ``ds_shape``)."""
    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad or include_frozen:
            shape = tuple(getattr(p, "ds_shape", p.shape))
            out[clean_fqn(name)] = (shape, p.dtype)
    return out


def make_layout(model_or_engine: Any, include_frozen: bool = True, params: Any = None) -> ShardLayout:
    """Build this rank's ``ShardLayout`` for any supported engine (see the module docstring).

    The result always has ``params`` (every tracked parameter, identical on all ranks),
    ``buffers`` (the buffers ``state_dict()`` holds, by clean name; non-persistent ones
    are left out so an exported state dict loads with ``strict=True``) and ``refresh`` (re-runs this
    function on the same object, e.g. after a checkpoint load replaced storages) set.
    ``params``: glob patterns or a predicate choosing the tracked parameters and kept buffers
    (``select.select_layout``: pieces, params and buffers restricted together; None: all of them).
    This function runs no collective; call ``checks.verify_layout`` once to check the
    layout across ranks (it also compares the ranks' choices).
    """
    from dist_ema.sharding.parts import as_model

    model_or_engine = as_model(model_or_engine)
    engine = detect_engine(model_or_engine)
    if engine == "deepspeed":
        from dist_ema.sharding.deepspeed import deepspeed_layout

        layout = deepspeed_layout(model_or_engine, include_frozen=include_frozen)
    elif engine == "fsdp2":
        from dist_ema.sharding.fsdp2 import fsdp2_layout

        layout = fsdp2_layout(model_or_engine, include_frozen=include_frozen)
    elif engine == "fsdp1":
        from dist_ema.sharding.fsdp1 import fsdp1_layout

        layout = fsdp1_layout(model_or_engine, include_frozen=include_frozen)
    else:
        from dist_ema.sharding.replicated import replicated_layout

        layout = replicated_layout(model_or_engine, include_frozen=include_frozen)

    module = _engine_module(model_or_engine)
    if not layout.params:
        layout.params = _params_of(module, include_frozen)
    # one definition for every engine: persistent buffers by clean name
    layout.buffers = persistent_buffers(module)
    layout.refresh = lambda: make_layout(model_or_engine, include_frozen=include_frozen, params=params)
    if params is None:
        return layout
    from dist_ema.sharding.select import select_layout

    return select_layout(layout, params, module)
