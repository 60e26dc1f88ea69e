"""Adapter for FSDP2 (``torch.distributed.fsdp.fully_shard``) and DTensor parameters of any placements.

FSDP2 replaces every managed parameter with a ``DTensor`` whose local tensor is this rank's
shard; tensor parallel (``parallelize_module``), expert parallel and FSDP2 over several mesh
axes make the same kind of parameter. The local tensor is the fp32 master even under
``MixedPrecisionPolicy(param_dtype=bf16)`` and the optimizer updates it in place, so a 1-d view
of it taken once stays live across steps (until a checkpoint load with ``assign=True`` swaps
storages: use ``ShardLayout.refresh``). ``after_load`` reshards every FSDP unit, so a forward
after a write to the shards all-gathers them.

Where a shard lies in the global tensor is what DTensor itself computes for checkpoints
(``torch.distributed.tensor._utils``: the global indices each placement leaves this rank, per
tensor dimension, shard after shard). Consecutive indices make a box; several runs on one
dimension (``_StridedShard`` alone) make several boxes. Any placements on a mesh of any
dimension are described this way: ``Shard(d)``, ``_StridedShard`` (FSDP2 over a
tensor-parallel dimension), ``Replicate`` (HSDP, norms replicated over ``tp``, context
parallel), and parameters on different meshes (FSDP on ``dp`` for norms, ``dp x tp`` for
the tensor-parallel weights). ``Partial`` (a pending reduction) is refused. A box contiguous
in the parameter is a flat range, as before (FSDP2 ``Shard(0)`` layouts are unchanged).

Replicas (ranks holding the same box) all track it; the layout check
(``checks.verify_layout``) splits the writing among them.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from dist_ema.sharding.base import ShardLayout, ShardPiece, UnsupportedEngineError
from dist_ema.sharding.replicated import clean_fqn, persistent_buffers
from dist_ema.store.layout import canonical_piece

__all__ = ["dtensor_boxes", "fsdp2_layout", "reshard_all"]


def _local_tensor(p: DTensor, fqn: str) -> torch.Tensor:
    """This rank's local shard of ``p``, sharing storage with the parameter.

    ``DTensor._local_tensor`` is private but is what FSDP2 itself updates; ``to_local()``
    (public) returns a view of the same storage and is the fallback.
    """
    local = getattr(p, "_local_tensor", None)
    if local is None:
        with torch.no_grad():
            local = p.to_local()
    if not isinstance(local, torch.Tensor):
        raise UnsupportedEngineError(
            f"torch {torch.__version__} changed DTensor internals: the local shard of {fqn!r} "
            f"is a {type(local).__name__}, not a tensor"
        )
    return local.detach()


def _runs(index: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive runs of global indices: [(global start, length, local start)]."""
    out: list[tuple[int, int, int]] = []
    for i, g in enumerate(index):
        if out and out[-1][0] + out[-1][1] == g:
            out[-1] = (out[-1][0], out[-1][1] + 1, out[-1][2])
        else:
            out.append((g, 1, i))
    return out


def _dim_indices(p: DTensor, fqn: str) -> tuple[tuple[int, ...], list[list[int] | None]]:
    """(local shape, per dimension the global indices this rank holds; None: all of them), as DTensor computes it."""
    shape = tuple(p.shape)
    mesh, placements = p.device_mesh, tuple(p.placements)
    coord = mesh.get_coordinate()
    if coord is None:
        raise UnsupportedEngineError(f"parameter {fqn!r} lives on a device mesh this rank is not part of")
    try:
        from torch.distributed.tensor._utils import _get_shard_size_and_offsets
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # an older or newer torch: its public one-box computation
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
        return tuple(local_shape), [None if n == s else list(range(o, o + n))
                                    for n, s, o in zip(local_shape, shape, offset)]
    local = list(shape)
    index: dict[int, torch.Tensor] = {}
    for mesh_dim, pl in enumerate(placements):
        if isinstance(pl, Replicate):
            continue
        if not isinstance(pl, (Shard, _StridedShard)):
            raise UnsupportedEngineError(
                f"parameter {fqn!r} has placement {pl} on mesh dimension {mesh_dim} of {tuple(placements)}: "
                "a pending reduction (Partial) is not a shard of the parameter; dist-ema tracks parameters "
                "whose placements are Shard, _StridedShard or Replicate"
            )
        d = pl.dim
        size, idx = _get_shard_size_and_offsets(local[d], mesh.size(mesh_dim), coord[mesh_dim], pl,
                                                index.get(d), shape[d], False)
        local[d] = int(size)
        index[d] = idx
    return tuple(local), [None if d not in index else (index[d][: local[d]].tolist() if local[d] else [])
                          for d in range(len(shape))]


def dtensor_boxes(p: DTensor, fqn: str = "") -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[slice, ...]]]:
    """This rank's part of a DTensor as boxes: [(global starts, sizes, slices of the local tensor)].

    One box, unless a dimension holds several runs of global indices (``_StridedShard``). Empty
    when this rank holds nothing of it.
    """
    shape = tuple(p.shape)
    local_shape, index = _dim_indices(p, fqn)
    if 0 in local_shape:
        return []
    per_dim = [[(0, n, 0)] if idx is None else _runs(idx) for n, idx in zip(local_shape, index)]
    out = []
    for combo in itertools.product(*per_dim):
        starts = tuple(g for g, _, _ in combo)
        sizes = tuple(n for _, n, _ in combo)
        slices = tuple(slice(li, li + n) for _, n, li in combo)
        out.append((starts, sizes, slices))
    if len(shape) == 0:
        out = [((), (), ())]
    return out


def _pieces_of(p: DTensor, fqn: str) -> list[ShardPiece]:
    shape = tuple(p.shape)
    local = _local_tensor(p, fqn)
    local_shape, _ = _dim_indices(p, fqn)
    if tuple(local.shape) != local_shape:
        raise UnsupportedEngineError(
            f"torch {torch.__version__} changed DTensor sharding: the local shard of {fqn!r} has shape "
            f"{tuple(local.shape)}, but its placements {tuple(p.placements)} on mesh {tuple(p.device_mesh.shape)} "
            f"give {local_shape}"
        )
    if local.numel() == 0:
        return []
    if not local.is_contiguous():
        raise UnsupportedEngineError(
            f"the local shard of {fqn!r} is not contiguous (shape {tuple(local.shape)}, stride {local.stride()}); "
            "its elements are not a view of its storage in row-major order"
        )
    pieces = []
    for starts, sizes, slices in dtensor_boxes(p, fqn):
        for sub_starts, sub_sizes, sub in _contiguous_parts(local, starts, sizes, slices):
            start, numel, box = canonical_piece(shape, 0, math.prod(sub_sizes), (sub_starts, sub_sizes))
            pieces.append(ShardPiece(fqn=fqn, global_shape=shape, dtype=p.dtype, flat_start=start, numel=numel,
                                     source=sub.view(-1), box=box))
    return pieces


def _contiguous_parts(local: torch.Tensor, starts: tuple, sizes: tuple, slices: tuple):
    """A box's region of the local tensor as parts that are contiguous in it (split on the leading dim)."""
    region = local[slices] if slices else local
    if region.is_contiguous():
        yield starts, sizes, region
        return
    for i in range(sizes[0]):
        sl = (slice(slices[0].start + i, slices[0].start + i + 1), *slices[1:])
        yield from _contiguous_parts(local, (starts[0] + i, *starts[1:]), (1, *sizes[1:]), sl)


def fsdp2_layout(model: nn.Module, include_frozen: bool = True) -> ShardLayout:
    """List this rank's shards of DTensor parameters (FSDP2, tensor/expert parallel, HSDP) as pieces.

    Args:
        model: the model after ``fully_shard`` (and/or ``parallelize_module``) was applied, or
            :class:`~dist_ema.sharding.parts.ModelParts` of pipeline stages. Every tracked
            parameter must be a DTensor.
        include_frozen: also track parameters with ``requires_grad=False``.

    Returns:
        ``ShardLayout`` with engine ``"fsdp2"``. Every piece is marked owner; replicas of a box
        (Replicate placements, meshes that leave out a dimension) are split among the ranks
        holding it by ``checks.verify_layout``.

    Raises:
        UnsupportedEngineError: a tracked parameter is not a DTensor (a module outside
            ``fully_shard``), has a ``Partial`` placement, or a local shard torch's own
            placement arithmetic does not explain.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedEngineError(f"fsdp2_layout expects an nn.Module, got {type(model).__name__}")
    pieces: list[ShardPiece] = []
    params: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for raw_name, p in model.named_parameters():
        if not (p.requires_grad or include_frozen):
            continue
        fqn = clean_fqn(raw_name)
        if not isinstance(p, DTensor):
            frozen_hint = " or pass include_frozen=False" if not p.requires_grad else ""
            raise UnsupportedEngineError(
                f"parameter {fqn!r} is not sharded by FSDP2 (a plain {type(p).__name__}, not a DTensor); "
                f"apply fully_shard to the root module too{frozen_hint}, so that "
                "every tracked parameter is sharded"
            )
        params[fqn] = (tuple(p.shape), p.dtype)
        pieces.extend(_pieces_of(p, fqn))
    return ShardLayout(
        engine="fsdp2",
        pieces=pieces,
        params=params,
        buffers=persistent_buffers(model),
        process_group=None,
        refresh=functools.partial(fsdp2_layout, model, include_frozen),
        after_load=functools.partial(reshard_all, model),
        dtensor_params=functools.partial(dtensor_params, model),
    )


def dtensor_params(model: nn.Module) -> dict[str, DTensor]:
    """The model's DTensor parameters now, ``{fqn: DTensor}`` (``ShardLayout.dtensor_params``)."""
    return {clean_fqn(name): p for name, p in model.named_parameters() if isinstance(p, DTensor)}


def reshard_all(model: nn.Module) -> None:
    """Drop every FSDP2 unit's unsharded parameters, so the next forward all-gathers the shards.

    FSDP2 does not reshard the root after forward (``reshard_after_forward`` is off for
    the root, and for any unit created with ``reshard_after_forward=False``): after an
    eval forward, which has no backward to reshard it, the unit keeps computing with its
    all-gathered copy, and a write to its shards stays invisible until the next backward.
    ``FSDPModule.reshard()`` (public, not recursive) frees that copy and re-registers the
    sharded parameters; it copies nothing back, and is a no-op for a sharded unit.
    """
    from torch.distributed.fsdp import FSDPModule

    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.reshard()
