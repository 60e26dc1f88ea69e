"""Adapter for FSDP2 (``torch.distributed.fsdp.fully_shard``): DTensor parameters.

FSDP2 replaces every managed parameter with a ``DTensor`` whose local tensor is this
rank's shard. With the default ``Shard(0)`` placement the shard is a block of rows
split with ``torch.chunk`` semantics (``ceil(dim0 / world)`` rows per rank, trailing
ranks may hold none), i.e. one contiguous flat range of the row-major parameter:
``[row0 * row_size, (row0 + rows) * row_size)``. The local tensor is the fp32 master
even under ``MixedPrecisionPolicy(param_dtype=bf16)``, and the optimizer updates it in
place, so a 1-d view of it taken once stays live across steps (until a checkpoint load
with ``assign=True`` swaps storages: use ``ShardLayout.refresh``). ``after_load``
reshards every unit, so a forward after a write to the shards all-gathers them.

Supported placements: ``(Shard(0),)`` on a 1-d mesh, and HSDP ``(Replicate(), Shard(0))``
on a 2-d mesh. In HSDP every replica tracks its whole shard (a swapped-in EMA exists on
every rank), and the R replicas of a shard split the writing: replicate coordinate i owns
the i-th 1/R of the shard's elements (``share_among_replicas``), so a snapshot's bytes per
rank fall R-fold instead of resting on replicate coordinate 0. Everything else (``Shard(1)``,
``_StridedShard`` from TP+FSDP, ``Partial``, ...) is refused with
``UnsupportedEngineError``: such shards are not contiguous flat ranges.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from dist_ema.sharding.base import ShardLayout, ShardPiece, UnsupportedEngineError, even_split, share_among_replicas
from dist_ema.sharding.replicated import clean_fqn, persistent_buffers

__all__ = ["fsdp2_layout", "reshard_all"]

_SUPPORTED = "(Shard(0),) on a 1-d device mesh (FSDP) or (Replicate(), Shard(0)) on a 2-d mesh (HSDP)"


@dataclass(frozen=True)
class _Placement:
    """Where this rank's shard of one parameter sits, derived from its placements."""

    shard_mesh_dim: int
    shard_rank: int
    shard_world: int
    replica: int  # coordinate on the replicate axis (0 without one)
    replicas: int  # size of the replicate axis (1 without one)


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


def _placement(p: DTensor, fqn: str) -> _Placement:
    """Check ``p``'s placements are supported and return this rank's shard coordinates."""
    mesh = p.device_mesh
    placements = tuple(p.placements)
    is_shard0 = [type(pl) is Shard and pl.dim == 0 for pl in placements]
    if mesh.ndim == 1 and is_shard0 == [True]:
        return _Placement(0, mesh.get_local_rank(0), mesh.size(0), replica=0, replicas=1)
    if mesh.ndim == 2 and type(placements[0]) is Replicate and is_shard0 == [False, True]:
        return _Placement(1, mesh.get_local_rank(1), mesh.size(1), replica=mesh.get_local_rank(0),
                          replicas=mesh.size(0))
    raise UnsupportedEngineError(
        f"parameter {fqn!r} has placements {placements} on a {mesh.ndim}-d device mesh "
        f"{tuple(mesh.shape)}{'' if mesh.mesh_dim_names is None else ' ' + str(mesh.mesh_dim_names)}; "
        f"dist-ema supports {_SUPPORTED}. Tensor parallel (_StridedShard), Shard(dim>0) "
        "(fully_shard's shard_placement_fn) and Partial placements are not contiguous flat ranges."
    )


def _chunk_rows(dim0: int, world: int, rank: int) -> tuple[int, int]:
    """First row and row count of ``rank`` under ``torch.chunk(dim0 rows, world)``."""
    start, end = even_split(dim0, world, rank)
    return start, end - start


def fsdp2_layout(model: nn.Module, include_frozen: bool = True) -> ShardLayout:
    """List this rank's FSDP2 shards as flat-range pieces.

    Args:
        model: the model after ``fully_shard`` was applied (to its root, and usually to
            its blocks). Every tracked parameter must be a DTensor.
        include_frozen: also track parameters with ``requires_grad=False``.

    Returns:
        ``ShardLayout`` with engine ``"fsdp2"``; ``process_group`` is the group of the
        shard mesh axis (the same for all parameters).

    Raises:
        UnsupportedEngineError: a tracked parameter is not a DTensor (a module outside
            ``fully_shard``), has unsupported placements, or parameters use different meshes.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedEngineError(f"fsdp2_layout expects an nn.Module, got {type(model).__name__}")
    pieces: list[ShardPiece] = []
    params: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    mesh = None
    shard_mesh_dim, replica, replicas = 0, 0, 1
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
        where = _placement(p, fqn)
        if mesh is None:
            mesh, shard_mesh_dim = p.device_mesh, where.shard_mesh_dim
            replica, replicas = where.replica, where.replicas
        elif p.device_mesh != mesh:
            raise UnsupportedEngineError(
                f"parameter {fqn!r} lives on device mesh {p.device_mesh} but earlier parameters on "
                f"{mesh}; dist-ema needs all FSDP2 parameters sharded over one mesh"
            )
        shape = tuple(p.shape)
        params[fqn] = (shape, p.dtype)
        if len(shape) == 0:
            raise UnsupportedEngineError(f"parameter {fqn!r} is 0-d; FSDP2 Shard(0) needs at least 1 dim")
        row0, rows = _chunk_rows(shape[0], where.shard_world, where.shard_rank)
        local = _local_tensor(p, fqn)
        expected = (rows, *shape[1:])
        if tuple(local.shape) != expected:
            raise UnsupportedEngineError(
                f"torch {torch.__version__} changed FSDP2 sharding: the local shard of {fqn!r} has "
                f"shape {tuple(local.shape)}, but torch.chunk semantics give {expected} on shard "
                f"rank {where.shard_rank} of {where.shard_world}"
            )
        if rows == 0:
            continue
        if not local.is_contiguous():
            raise UnsupportedEngineError(
                f"the local shard of {fqn!r} is not contiguous (stride {local.stride()}); its flat "
                "range is not a view of its storage"
            )
        row_size = math.prod(shape[1:])
        pieces.append(
            ShardPiece(
                fqn=fqn,
                global_shape=shape,
                dtype=p.dtype,
                flat_start=row0 * row_size,
                numel=rows * row_size,
                source=local.view(-1),
            )
        )
    if replicas > 1:  # HSDP: the replicas of this shard write 1/replicas of it each
        pieces = share_among_replicas(pieces, replica, replicas)
    return ShardLayout(
        engine="fsdp2",
        pieces=pieces,
        params=params,
        buffers=persistent_buffers(model),
        process_group=None if mesh is None else mesh.get_group(shard_mesh_dim),
        refresh=functools.partial(fsdp2_layout, model, include_frozen),
        after_load=functools.partial(reshard_all, model),
    )


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
