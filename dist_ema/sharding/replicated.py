"""Adapter for plain modules and ``DistributedDataParallel``: replicated parameters.

Under DDP (or a single process) every rank holds every parameter in full, and all
replicas are bit-identical after each optimizer step. Tracking the full EMA on every
rank would waste ``world`` times the memory and update time, so each rank tracks and
writes only a disjoint contiguous 1/world slice of every parameter's flat range (a
``torch.chunk``-like split, ``base.even_split``: ``ceil(numel / world)`` elements per rank, the
last ranks may hold less or nothing). The owner pieces of all ranks cover every parameter once.

This module also holds the small helpers the other adapters share (name cleaning,
persistent buffers, which parameters are tracked).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from dist_ema.errors import ConfigError
from dist_ema.sharding.base import ShardLayout, ShardPiece, UnsupportedEngineError, even_split
from dist_ema.sharding.resync import make_replicated_resync

__all__ = [
    "clean_fqn",
    "even_split",
    "persistent_buffers",
    "replicated_layout",
    "unwrap_ddp",
]

# Prefixes that wrappers insert into parameter names; the unwrapped model has none of them.
# FSDP1 (``_fsdp_wrapped_module.``), activation checkpointing (``_checkpoint_wrapped_module.``),
# ``torch.compile`` (``_orig_mod.``).
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_fqn(name: str) -> str:
    """Return ``name`` without the wrapper prefixes FSDP1, checkpoint wrappers and compile add.

    Equivalent to ``torch.distributed.fsdp._common_utils.clean_tensor_name`` plus the
    ``torch.compile`` prefix; kept here so no private torch function is needed.
    """
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The user's module inside ``DistributedDataParallel`` and ``torch.compile`` wrappers, in any order.

    ``torch.compile(DDP(m))``, ``DDP(torch.compile(m))`` and ``DDP(m)`` all give ``m``, so
    parameter names are the user's (no ``module.`` or ``_orig_mod.`` prefix).
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's wrapper
        else:
            return model


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's buffers that ``state_dict()`` contains, by clean name.

    Non-persistent buffers (``register_buffer(..., persistent=False)``, e.g. rotary
    caches) are left out: they are not part of a checkpoint, and an exported state dict
    containing them would fail ``load_state_dict(strict=True)``.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        non_persistent = getattr(mod, "_non_persistent_buffers_set", set())
        for buf_name, buf in mod.named_buffers(recurse=False):
            if buf is None or buf_name in non_persistent or id(buf) in seen:
                continue
            seen.add(id(buf))
            out[clean_fqn(f"{mod_name}.{buf_name}" if mod_name else buf_name)] = buf
    return out


def _flat_view(p: torch.Tensor, fqn: str) -> torch.Tensor:
    """1-d view of ``p``'s storage in row-major order, or a clear error if none exists."""
    t = p.detach()
    if not t.is_contiguous():
        raise UnsupportedEngineError(
            f"parameter {fqn!r} is not contiguous (shape {tuple(t.shape)}, stride {t.stride()}), "
            "so its row-major flat range is not a view of its storage; make it contiguous "
            "(e.g. do not use channels_last memory format for parameters) before creating the EMA"
        )
    return t.view(-1)


def _reject_sharded(model: nn.Module) -> None:
    """Refuse models whose parameters are FSDP/DeepSpeed shards: their layout is not replicated."""
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters():
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            raise UnsupportedEngineError(
                f"parameter {name!r} is managed by DeepSpeed ZeRO; pass the DeepSpeed engine itself "
                "(what deepspeed.initialize returned), not engine.module"
            )
        if isinstance(p, DTensor) or getattr(p, "_is_flat_param", False):
            kind = "DTensor" if isinstance(p, DTensor) else "FSDP1 FlatParameter"
            raise UnsupportedEngineError(
                f"parameter {name!r} is sharded ({kind}), so replicated_layout does not "
                "apply; use dist_ema.sharding.detect.make_layout(model_or_engine) to pick the right adapter"
            )


def _named_tracked(model: nn.Module, include_frozen: bool) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in model.named_parameters():
        if p.requires_grad or include_frozen:
            yield clean_fqn(name), p


def replicated_layout(
    model: nn.Module, include_frozen: bool = True, process_group: object | None = None
) -> ShardLayout:
    """Layout for a plain or DDP-wrapped model: each rank owns a 1/world slice of every parameter.

    Args:
        model: a plain ``nn.Module`` or a ``DistributedDataParallel`` (its ``.module`` is used
            and, unless ``process_group`` is given, its process group).
        include_frozen: also track parameters with ``requires_grad=False``.
        process_group: the group the replicas live in; ``None`` = DDP's group or the
            default group. Without an initialized process group (single process) this
            rank owns everything.

    Returns:
        A ``ShardLayout`` with engine ``"replicated"``. Every piece is a view of the live
        parameter (``p.detach().view(-1)[a:b]``), so it sees every optimizer step.
        ``after_load`` all-gathers the owned slices into every rank's full parameters.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedEngineError(f"replicated_layout expects an nn.Module, got {type(model).__name__}")
    if process_group is None and isinstance(model, nn.parallel.DistributedDataParallel):
        process_group = model.process_group
    inner = unwrap_ddp(model)
    _reject_sharded(inner)
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size(process_group)
        rank = dist.get_rank(process_group)
        if rank < 0:
            raise ConfigError("this rank is not a member of the process group given to replicated_layout")
    else:
        world, rank = 1, 0

    pieces: list[ShardPiece] = []
    params: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    full: dict[str, torch.Tensor] = {}
    for fqn, p in _named_tracked(inner, include_frozen):
        shape = tuple(p.shape)
        params[fqn] = (shape, p.dtype)
        flat = _flat_view(p, fqn)  # also for params this rank holds nothing of: the resync writes them
        full[fqn] = p
        start, end = even_split(p.numel(), world, rank)
        if end <= start:
            continue
        pieces.append(ShardPiece(fqn, shape, p.dtype, start, end - start, flat[start:end], owner=True))

    return ShardLayout(
        engine="replicated",
        pieces=pieces,
        params=params,
        buffers=persistent_buffers(inner),
        process_group=process_group,
        refresh=functools.partial(replicated_layout, model, include_frozen, process_group),
        # each rank writes only its own slices: one all-gather fills in the others' (None in
        # a single process); it holds these parameter tensors, refresh() re-lists new ones
        after_load=make_replicated_resync(full, pieces, process_group),
    )
