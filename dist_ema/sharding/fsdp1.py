"""Adapter for FSDP1 (``FullyShardedDataParallel``), ``use_orig_params`` True and False.

FSDP1 flattens the parameters of each FSDP unit into one ``FlatParameter`` and gives
each rank a contiguous slice of it (``flat_param._local_shard``), padded at the tail
(and, with ``use_orig_params=True``, with alignment padding between parameters). The
flat parameter records, per original parameter, where its elements sit in this
rank's slice (``_shard_param_infos``: ``offset_in_shard``, ``numel_in_shard``,
``intra_param_start_idx``, ``intra_param_end_idx`` - the end is INCLUSIVE). Each
in-shard parameter therefore gives one flat-range piece whose source is a view of
``_local_shard``: the fp32 sharded master that the optimizer updates in place (it
stays fp32 under ``MixedPrecision``; ``_mp_shard`` is the low-precision copy).

Private FSDP1 attributes used (torch 2.13): ``FullyShardedDataParallel._handle``,
``FlatParamHandle.flat_param``, ``FlatParamHandle._offload_params``,
``FlatParameter._fqns``, ``._shapes``, ``._shard_param_infos``, ``._local_shard``,
``._sharded_size``, ``._params``, ``_FSDPState._inter_node_pg`` (hybrid sharding), and for
``after_load`` (drop unsharded copies) ``FlatParamHandle.needs_unshard``,
``.uses_sharded_strategy`` and ``torch.distributed.fsdp._runtime_utils._reshard``.
Each is read through a helper that names the attribute if a torch release removes it.

Strategies: FULL_SHARD / SHARD_GRAD_OP (one owner per element); HYBRID_SHARD and
_HYBRID_SHARD_ZERO2 (shards replicated across ``_inter_node_pg``: every replica tracks
its whole shard, and the R replicas split the writing, inter-node rank i owning the i-th
1/R of the rank's shard elements, ``share_among_replicas``); NO_SHARD (every rank holds everything:
every rank tracks every parameter, so a swapped-in EMA exists on every rank, and
ownership is split into disjoint ``torch.chunk``-like 1/world slices of each
parameter, so snapshot writes are spread over all ranks instead of piling onto rank 0).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

from dist_ema.sharding.base import ShardLayout, ShardPiece, UnsupportedEngineError, even_split, split_among_replicas
from dist_ema.sharding.replicated import clean_fqn, persistent_buffers

__all__ = ["fsdp1_layout", "fsdp1_units", "is_flat_param", "reshard_all"]

_MISSING = object()
_HYBRID = (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2)


def _private(obj: Any, attr: str, what: str) -> Any:
    """Read a private FSDP1 attribute, failing with a message that names it if it is gone."""
    value = getattr(obj, attr, _MISSING)
    if value is _MISSING:
        raise UnsupportedEngineError(
            f"torch {torch.__version__} changed FSDP internals: {what} has no attribute {attr!r}; "
            "dist-ema's FSDP1 adapter was written against torch 2.13"
        )
    return value


def is_flat_param(p: torch.Tensor) -> bool:
    """True for FSDP1's ``FlatParameter`` (a plain ``nn.Parameter`` tagged ``_is_flat_param``)."""
    return bool(getattr(p, "_is_flat_param", False))


def fsdp1_units(model: nn.Module) -> list[tuple[str, FullyShardedDataParallel]]:
    """All FSDP1 units of ``model`` that manage parameters, as ``(module path, unit)``."""
    units = []
    for name, mod in model.named_modules():
        if isinstance(mod, FullyShardedDataParallel) and _private(mod, "_handle", "FullyShardedDataParallel"):
            units.append((name, mod))
    return units


def _local_shard(handle: Any, flat_param: torch.Tensor, where: str) -> torch.Tensor:
    """The sharded flat parameter's storage that the optimizer updates, as a 1-d tensor.

    After FSDP's lazy init (the first forward) it is ``flat_param._local_shard``. Before
    it, ``flat_param.data`` is the same storage (lazy init does
    ``_local_shard = flat_param.data``), except with CPU offload, where lazy init
    copies it into pinned memory; that case is refused.
    """
    local = getattr(flat_param, "_local_shard", None)
    if local is None:
        if _private(handle, "_offload_params", "FlatParamHandle"):
            raise UnsupportedEngineError(
                f"FSDP unit {where!r} offloads parameters to CPU and has not run a forward pass yet; "
                "FSDP moves the shard into pinned memory at its first forward, so create the EMA "
                "after the first forward pass"
            )
        sharded_size = _private(flat_param, "_sharded_size", "FlatParameter")
        if flat_param.data.numel() != torch.Size(sharded_size).numel():
            raise UnsupportedEngineError(
                f"FSDP unit {where!r} is unsharded right now (inside forward/backward or "
                "summon_full_params); build the layout outside of them"
            )
        local = flat_param.data
    local = local.detach()
    if local.dim() != 1:
        raise UnsupportedEngineError(
            f"torch {torch.__version__} changed FSDP internals: the local shard of FSDP unit "
            f"{where!r} is {local.dim()}-d, expected a 1-d flat tensor"
        )
    return local


def _refuse_clamped_hybrid(unit: FullyShardedDataParallel, where: str) -> None:
    """Refuse HYBRID_SHARD that FSDP1 silently turned into an unsynchronised NO_SHARD.

    With a shard group of one rank FSDP1 clamps HYBRID_SHARD to NO_SHARD over that
    one-rank group (warning "FSDP is switching to use `NO_SHARD`"), and then reduces
    gradients over the shard group only: the replicas across ``_inter_node_pg`` train
    independently and diverge (measured on torch 2.13, gloo). No EMA layout is right then.
    """
    inter = getattr(unit, "_inter_node_pg", None)
    if inter is not None and dist.get_world_size(inter) > 1:
        raise UnsupportedEngineError(
            f"FSDP unit {where!r} was created with a hybrid sharding strategy over a shard group of "
            f"1 rank; FSDP1 (torch {torch.__version__}) turned it into NO_SHARD and does not reduce "
            f"gradients across the {dist.get_world_size(inter)} replicas, so they diverge. Use a shard "
            "group of more than one rank, FULL_SHARD/NO_SHARD over all ranks, or DDP"
        )


def _owner_split(fqn: str, shape: tuple[int, ...], dtype: torch.dtype, start: int, src: torch.Tensor,
                 rank: int, world: int) -> list[ShardPiece]:
    """NO_SHARD: split a whole parameter into up to 3 pieces; only this rank's 1/world slice is owned."""
    numel = src.numel()
    a, b = even_split(numel, world, rank)
    out = []
    for lo, hi, owner in ((0, a, False), (a, b, True), (b, numel, False)):
        if hi > lo:
            out.append(ShardPiece(fqn, shape, dtype, start + lo, hi - lo, src[lo:hi], owner=owner))
    return out


def _share_hybrid(pieces: list[ShardPiece], replica_of: list[tuple[int, int] | None]) -> list[ShardPiece]:
    """Hybrid units: the replicas across ``_inter_node_pg`` split the ownership of their shards.

    Pieces of units with the same (inter-node rank, size) are split together (the replicas of
    this rank hold the same pieces in the same order), so each replica writes 1/R of the rank's
    hybrid-sharded elements; other pieces keep their ownership. The order of pieces is kept.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(replica_of):
        if key is not None and key[1] > 1:
            groups.setdefault(key, []).append(i)
    if not groups:
        return pieces
    split: dict[int, list[ShardPiece]] = {}
    for (replica, replicas), idx in groups.items():
        subs = split_among_replicas([pieces[i] for i in idx], replica, replicas)
        split.update(zip(idx, subs))
    return [q for i, p in enumerate(pieces) for q in split.get(i, [p])]


def fsdp1_layout(model: nn.Module, include_frozen: bool = True) -> ShardLayout:
    """List this rank's FSDP1 shards as flat-range pieces.

    Args:
        model: a model containing ``FullyShardedDataParallel`` units (usually the root is
            one). Every tracked parameter must be managed by some FSDP unit.
        include_frozen: also track parameters with ``requires_grad=False``.

    Returns:
        ``ShardLayout`` with engine ``"fsdp1"``; ``process_group`` is the (first) unit's
        shard group. Call it outside forward/backward and ``summon_full_params``.
    """
    units = fsdp1_units(model)
    if not units:
        raise UnsupportedEngineError(
            f"fsdp1_layout: {type(model).__name__} contains no FullyShardedDataParallel unit "
            "with parameters"
        )
    pieces: list[ShardPiece] = []
    # hybrid strategies: (inter-node rank, inter-node size) of each piece's unit, or None
    replica_of: list[tuple[int, int] | None] = []
    params: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    managed: set[str] = set()
    process_group = None
    for unit_name, unit in units:
        handle = _private(unit, "_handle", "FullyShardedDataParallel")
        flat_param = _private(handle, "flat_param", "FlatParamHandle")
        fqns = _private(flat_param, "_fqns", "FlatParameter")
        shapes = _private(flat_param, "_shapes", "FlatParameter")
        infos = _private(flat_param, "_shard_param_infos", "FlatParameter")
        orig_params = getattr(flat_param, "_params", None)  # None for use_orig_params=False
        if not len(fqns) == len(shapes) == len(infos):
            raise UnsupportedEngineError(
                f"torch {torch.__version__} changed FSDP internals: FSDP unit {unit_name!r} has "
                f"{len(fqns)} _fqns, {len(shapes)} _shapes and {len(infos)} _shard_param_infos"
            )
        strategy = unit.sharding_strategy
        group = unit.process_group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        replica = None
        if strategy in _HYBRID:
            inter = _private(unit, "_inter_node_pg", "FullyShardedDataParallel (hybrid sharding)")
            replica = (dist.get_rank(inter), dist.get_world_size(inter))
        elif strategy == ShardingStrategy.NO_SHARD and world == 1:
            _refuse_clamped_hybrid(unit, unit_name)
        if process_group is None:
            process_group = group
        local = _local_shard(handle, flat_param, unit_name)
        for i, (rel_name, shape, info) in enumerate(zip(fqns, shapes, infos)):
            fqn = clean_fqn(f"{unit_name}.{rel_name}" if unit_name else rel_name)
            orig = orig_params[i] if orig_params is not None else flat_param
            requires_grad = orig.requires_grad
            managed.add(fqn)
            if not (requires_grad or include_frozen):
                continue
            shape = tuple(shape)
            params[fqn] = (shape, local.dtype)
            if not info.in_shard:
                continue
            start, end_incl = info.intra_param_start_idx, info.intra_param_end_idx
            numel = end_incl - start + 1
            if numel != info.numel_in_shard or info.offset_in_shard + numel > local.numel():
                raise UnsupportedEngineError(
                    f"torch {torch.__version__} changed FSDP internals: shard info of {fqn!r} "
                    f"({info}) does not fit the local shard of {local.numel()} elements"
                )
            src = local[info.offset_in_shard : info.offset_in_shard + numel]
            if strategy == ShardingStrategy.NO_SHARD:
                split = _owner_split(fqn, shape, local.dtype, start, src, rank, world)
                pieces.extend(split)
                replica_of.extend([None] * len(split))
            elif numel > 0:
                pieces.append(ShardPiece(fqn, shape, local.dtype, start, numel, src))
                replica_of.append(replica)

    pieces = _share_hybrid(pieces, replica_of)
    for raw_name, p in model.named_parameters():
        if is_flat_param(p) or not (p.requires_grad or include_frozen):
            continue
        if clean_fqn(raw_name) not in managed:
            raise UnsupportedEngineError(
                f"parameter {clean_fqn(raw_name)!r} is not managed by any FSDP unit (outside FSDP or "
                "in ignored_modules); wrap the root module with FullyShardedDataParallel"
                + ("" if p.requires_grad else " or pass include_frozen=False")
            )
    return ShardLayout(
        engine="fsdp1",
        pieces=pieces,
        params=params,
        buffers=persistent_buffers(model),
        process_group=process_group,
        refresh=functools.partial(fsdp1_layout, model, include_frozen),
        after_load=functools.partial(reshard_all, [unit for _, unit in units]),
    )


def reshard_all(units: list[FullyShardedDataParallel]) -> None:
    """Free every unit's unsharded flat parameter, so the next forward all-gathers the shards.

    FSDP1 keeps the root unit's unsharded flat parameter after forward (for backward),
    and every unit's under SHARD_GRAD_OP / _HYBRID_SHARD_ZERO2; its next forward then
    skips the all-gather (``FlatParamHandle.needs_unshard()`` is False) and computes
    with that copy, so writes to ``_local_shard`` are not seen until a backward reshards.
    This runs FSDP's own post-forward reshard with freeing
    (``torch.distributed.fsdp._runtime_utils._reshard``), which points the flat parameter
    (and, with ``use_orig_params=True``, the original parameters) back at the shard and
    copies nothing back. NO_SHARD units compute with the flat parameter itself: nothing
    to drop. Units inside forward/backward or ``summon_full_params`` are left alone.
    """
    from torch.distributed.fsdp import _runtime_utils
    from torch.distributed.fsdp._common_utils import TrainingState

    reshard = _private(_runtime_utils, "_reshard", "torch.distributed.fsdp._runtime_utils")
    for unit in units:
        handle = _private(unit, "_handle", "FullyShardedDataParallel")
        if handle is None or not _private(handle, "uses_sharded_strategy", "FlatParamHandle"):
            continue
        if _private(unit, "training_state", "FullyShardedDataParallel") != TrainingState.IDLE:
            continue
        if getattr(handle.flat_param, "_full_param_padded", None) is None:
            continue  # FSDP's lazy init (first forward) has not allocated an unsharded copy yet
        if _private(handle, "needs_unshard", "FlatParamHandle")():
            continue  # already sharded: the next forward all-gathers the shards
        reshard(unit, handle, True)
