"""DeepSpeed ZeRO stage 1, 2 and 3 adapters: list a rank's own shards of a ``DeepSpeedEngine``.

Also under ZeRO-1 ``PipelineEngine`` and ZeRO-1/2 AutoTP tensor parallelism (below).

What each rank tracks (``ShardPiece.source``) and where the forward pass reads the
weights (``ShardPiece.load_target``):

ZeRO-1/2 (``engine.optimizer`` is ``DeepSpeedZeroOptimizer``)
    The model weights (bf16/fp16/fp32 "working" weights) are full on every rank and are
    views into one flat buffer per param group, ``optimizer.bit16_groups_flat[g]``. That
    buffer is split into ``world`` equal partitions over the data-parallel group; rank r
    owns partition r and keeps its fp32 master copy in
    ``optimizer.single_partition_of_fp32_groups[g]`` (always a separate tensor, updated
    in place by the wrapped torch optimizer). A param can straddle partitions, so a rank
    holds a flat range of some params and nothing of others.

    * source: ``p._hp_mapping.hp_fragment`` (a view into the fp32 partition), its range
      in the param ``p._hp_mapping.lp_fragment_address.start/.numel``. At start-up this
      mapping is cross-checked against one computed from the buffers (below); any
      disagreement raises :class:`UnsupportedEngineError`.
    * ``round_robin_gradients: true``: DeepSpeed 0.19.8 reorders the params inside the
      flat buffer but builds ``_hp_mapping`` in the original order, so ``_hp_mapping``
      (and ``safe_get_full_fp32_param``) point at the wrong elements. The adapter then
      uses the buffer mapping alone: every param is a view into ``bit16_groups_flat[g]``
      at offset ``(p.data_ptr() - flat.data_ptr()) // element_size``; partition size is
      ``flat.numel() // world``; rank r's fp32 partition covers flat
      ``[r*size, (r+1)*size)``. (Tests check it bit-exactly against the working weights.)
    * load_target: ``p.data.view(-1)[start:start+numel]``, which lies in this rank's
      partition of the working buffer. Because every rank holds the *full* working
      weights, ``after_load`` all-gathers the working buffer's partitions so that each
      rank sees the ranges written by the others.

ZeRO-3 (``engine.optimizer`` is ``DeepSpeedZeroOptimizer_Stage3``)
    Every param is partitioned: ``P = p.ds_tensor.ds_numel`` (padded partition size),
    rank r holds flat ``[r*P, min((r+1)*P, p.ds_numel))`` of the global tensor of shape
    ``p.ds_shape``.

    * source: ``deepspeed.utils.safe_get_local_fp32_param(p)[:n]`` when it is a view of
      ``optimizer.fp32_partitioned_groups_flat[g]`` (it is on CPU and without offload);
      otherwise (it may be a copy, e.g. optimizer offload on GPU) the same range taken
      directly: ``fp32_partitioned_groups_flat[g].narrow(0, off, n)`` with
      ``g, off, _ = optimizer.grad_position[optimizer.get_param_id(p)]``.
    * load_target: ``p.ds_tensor[:n]`` (working weights, separate from the master even
      in fp32). Params below ``stage3_param_persistence_threshold`` stay gathered between
      steps (``optimizer.persistent_parameters``); ``after_load`` releases and re-gathers
      them (``optimizer.checkpoint_event_prologue/epilogue()``, what the engine does around
      a checkpoint load) so the forward pass sees what was written.

Frozen params (``requires_grad=False``) and params the optimizer does not manage have no
fp32 master. With ``include_frozen=False`` they are skipped. With ``include_frozen=True``:
under ZeRO-1/2 they are full on every rank, so they are split like a replicated param
(rank r owns the ``torch.chunk``-style slice ``[r*c, min((r+1)*c, numel))``, ``c =
ceil(numel / world)``, source = a view of the param itself, ``after_load`` all-gathers
them); under ZeRO-3 they are partitioned like any other param and the source is the
``ds_tensor`` slice itself (``load_target`` None).

Pipeline parallelism (``PipelineEngine``, ZeRO-1; DeepSpeed allows no higher stage)
    ``engine.module`` is the rank's stage of the ``PipelineModule``: its layers keep their global
    indices ("1.weight", "4.bias"), layers built from a ``TiedLayerSpec`` sit once under
    "tied_modules.<key>.". ZeRO-1 partitions each stage over that stage's data-parallel group
    (``engine.grid``'s, the optimizer's ``dp_process_group``), exactly as above. Each rank's
    ``params`` lists its stage's parameters; the layout check takes their union. A weight tied
    across stages (an embedding shared with the head) is held and trained identically by every
    stage that uses it (DeepSpeed all-reduces its gradient over the tie group): it is tracked on
    all of them, owned (written) by the first, the stage DeepSpeed itself counts it on (the
    others carry ``ds_pipe_replicated``).

AutoTP tensor parallelism (``"tensor_parallel": {"autotp_size": N}``, ZeRO-1/2)
    The split layers of ``deepspeed.module_inject.layers`` hold a slice of each weight they split
    and record it on the parameter (``ds_autotp_universal_checkpoint_meta``: ``logical_shape``,
    ``partition_dim``, ``partition_sizes``). A slice is an N-d box of the global tensor
    (``ShardPiece.box``): tensor-parallel rank t holds ``partition_sizes[t]`` indices from
    ``sum(partition_sizes[:t])`` along ``partition_dim``. ZeRO partitions the slices over the
    data-parallel group as above, so a piece is a flat range of its box. Parameters AutoTP did not
    split (norms, heads, the row-parallel bias) are whole on every tensor-parallel rank; the
    replicas split the writing (``checks.verify_layout``). Fused sub-parameter splits and ZeRO-3
    with AutoTP are refused. Model parallelism through a user ``mpu`` (Megatron style) is refused:
    DeepSpeed records neither the dimension nor the offset of the slices.

Skipped steps: :func:`deepspeed_step_was_applied` tells the tracker whether the latest
``engine.step()`` changed the weights (False on non-boundary gradient-accumulation
micro-steps and on fp16 overflow-skipped steps).

Anything this module does not understand (another stage, optimizer class, offload to
NVMe, ZeRO++ hpZ/quantized weights, MoE, undescribed model parallelism, a missing private
attribute) raises :class:`UnsupportedEngineError` naming the DeepSpeed version and the
option or attribute, rather than listing possibly wrong shards.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dist_ema.sharding.base import (
    ShardLayout,
    ShardPiece,
    UnsupportedEngineError,
    check_pieces_local,
    even_chunk,
    even_split,
)

__all__ = ["is_deepspeed_engine", "deepspeed_layout", "deepspeed_step_was_applied"]

log = logging.getLogger("dist_ema")

_ENGINE_NAMES = {1: "zero1", 2: "zero2", 3: "zero3"}


# ---------------------------------------------------------------------------------------
# small helpers around DeepSpeed internals
# ---------------------------------------------------------------------------------------


def _ds_version() -> str:
    ds = sys.modules.get("deepspeed")
    return str(getattr(ds, "__version__", "unknown"))


def _unsupported(what: str) -> UnsupportedEngineError:
    return UnsupportedEngineError(f"dist_ema DeepSpeed adapter (DeepSpeed {_ds_version()}): {what}")


def _attr(obj: Any, name: str, where: str) -> Any:
    """``getattr(obj, name)`` with a clear error naming the DeepSpeed version when missing.

    The ZeRO internals used here are private; a DeepSpeed release that renames one must
    fail loudly at start-up instead of producing wrong shards.
    """
    try:
        return getattr(obj, name)
    except AttributeError:
        raise _unsupported(
            f"{where} has no attribute {name!r}; this DeepSpeed version is not supported "
            f"(tested with 0.19.8)"
        ) from None


def _call(obj: Any, name: str, where: str) -> Any:
    fn = _attr(obj, name, where)
    if not callable(fn):
        raise _unsupported(f"{where}.{name} is not callable")
    return fn()


def _group_rank_size(group: Any) -> tuple[int, int]:
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def is_deepspeed_engine(obj: object) -> bool:
    """True when ``obj`` is a ``deepspeed.DeepSpeedEngine`` (or subclass).

    Never imports DeepSpeed: if it is not in ``sys.modules`` nobody can have built an
    engine, so the answer is False without paying DeepSpeed's import time.
    """
    mod = sys.modules.get("deepspeed.runtime.engine")
    if mod is None:
        return False
    cls = getattr(mod, "DeepSpeedEngine", None)
    return cls is not None and isinstance(obj, cls)


def deepspeed_step_was_applied(engine: Any) -> bool:
    """Whether the latest ``engine.step()`` updated the parameters.

    Call it right after ``engine.step()``; the EMA must be updated only when it returns
    True. It is ``engine.was_step_applied()``, which DeepSpeed resets to False at the start
    of every ``step()`` and sets to ``not optimizer.overflow`` only when the step reaches a
    gradient-accumulation boundary and runs the optimizer. So it is False both on
    non-boundary micro-steps (``gradient_accumulation_steps > 1``) and on fp16 steps
    skipped for a loss-scale overflow.

    ``engine.is_gradient_accumulation_boundary()`` is deliberately not used: after
    ``step()`` returns, DeepSpeed has already advanced its micro-step counter, so it
    describes the *next* micro-step, not the one just taken.

    Example:
        >>> engine.backward(loss); engine.step()
        >>> if deepspeed_step_was_applied(engine):
        ...     ema.update()
    """
    fn = getattr(engine, "was_step_applied", None)
    if not callable(fn):
        raise _unsupported(
            f"{type(engine).__name__} has no was_step_applied(); cannot tell applied optimizer steps "
            f"from skipped ones"
        )
    return bool(fn())


# ---------------------------------------------------------------------------------------
# configuration checks
# ---------------------------------------------------------------------------------------


def _zero_config(engine: Any) -> Any:
    config = _attr(engine, "_config", "DeepSpeedEngine")
    return _attr(config, "zero_config", "DeepSpeedEngine._config")


def _offload_device(offload_cfg: Any) -> str:
    if offload_cfg is None:
        return "none"
    device = getattr(offload_cfg, "device", "none")
    return str(getattr(device, "value", device))


def _check_engine_config(engine: Any, stage: int) -> None:
    """Refuse configurations whose shard layout this adapter has not verified."""
    if getattr(engine, "has_moe_layers", False):
        raise _unsupported("MoE layers (expert data-parallel groups) are not supported")
    zc = _zero_config(engine)
    off_opt = _offload_device(getattr(zc, "offload_optimizer", None))
    off_param = _offload_device(getattr(zc, "offload_param", None))
    if off_opt == "nvme" or off_param == "nvme":
        raise _unsupported(
            "zero_optimization.offload_optimizer/offload_param device 'nvme' is not supported: the fp32 "
            "master is swapped out to disk between steps, so it has no stable in-memory view; use device "
            "'cpu' or 'none'"
        )
    if off_opt not in ("none", "cpu") or off_param not in ("none", "cpu"):
        raise _unsupported(f"offload device {off_opt!r}/{off_param!r} is not supported (use 'cpu' or 'none')")
    opt_cfg = getattr(zc, "offload_optimizer", None)
    ratio = getattr(opt_cfg, "ratio", 1.0) if opt_cfg is not None else 1.0
    if ratio is not None and float(ratio) != 1.0:
        raise _unsupported(
            f"zero_optimization.offload_optimizer.ratio={ratio} (partial offload) is not supported"
        )
    if getattr(opt_cfg, "super_offload", False):
        raise _unsupported("zero_optimization.offload_optimizer.super_offload is not supported")
    if stage == 3:
        hpz = getattr(zc, "zero_hpz_partition_size", 1) or 1
        if int(hpz) > 1:
            raise _unsupported(
                f"zero_optimization.zero_hpz_partition_size={hpz} (ZeRO++ hpZ) is not supported; set it to 1"
            )
        for opt in ("zero_quantized_weights", "zero_quantized_nontrainable_weights"):
            if getattr(zc, opt, False):
                raise _unsupported(
                    f"zero_optimization.{opt}=true (ZeRO++ quantized weights) is not supported"
                )
        if int(getattr(zc, "mics_shard_size", -1) or -1) > 0:
            raise _unsupported("zero_optimization.mics_shard_size (MiCS) is not supported")


@dataclass(frozen=True)
class _Parallel:
    """How the world is split besides ZeRO's data-parallel group.

    ``kind`` is "dp" (every rank in one data-parallel group), "pipe" (``PipelineEngine``: a
    stage's ranks form the data-parallel group, each stage holds its own layers) or "autotp"
    (AutoTP tensor parallel: ``tp_world`` ranks hold slices of the split weights).
    """

    kind: str
    tp_rank: int = 0
    tp_world: int = 1


def _model_parallel_world(mpu: Any) -> int:
    """The tensor/model-parallel world size an ``mpu`` reports (Megatron-style names, as DeepSpeed reads them)."""
    for name in ("get_tensor_model_parallel_world_size", "get_model_parallel_world_size",
                 "get_slice_parallel_world_size"):
        fn = getattr(mpu, name, None)
        if callable(fn):
            return int(fn())
    return 1


def _autotp_size(engine: Any) -> int:
    fn = getattr(engine, "autotp_size", None)
    return int(fn()) if callable(fn) else 1


def _parallelism(engine: Any, stage: int, dp_group: Any) -> _Parallel:
    """Which parallelism surrounds the data-parallel group; refuse what the adapter cannot describe.

    Accepted: plain data parallelism (the data-parallel group is the world), ``PipelineEngine``
    with ZeRO-1 (``world = stages x data-parallel ranks``, no tensor slicing inside a stage) and
    AutoTP (``"tensor_parallel": {"autotp_size": N}``) with ZeRO-1/2, whose split weights record
    their split (see :func:`_tp_box`). Any other ``engine.mpu`` is model parallelism DeepSpeed
    does not describe: a rank's parameters are slices whose dimension and offset nobody records.
    """
    world, dp_world = dist.get_world_size(), dist.get_world_size(group=dp_group)
    mpu = getattr(engine, "mpu", None)
    if type(engine).__name__ == "PipelineEngine":
        grid = _attr(engine, "grid", "PipelineEngine")
        stages = int(_attr(grid, "pipe_parallel_size", "PipelineEngine.grid"))
        sliced = int(_call(grid, "get_slice_parallel_world_size", "PipelineEngine.grid"))
        if sliced != 1:
            raise _unsupported(
                f"pipeline parallelism with {sliced}-way model parallelism inside a stage is not supported: "
                "DeepSpeed does not record how the stage's parameters are sliced"
            )
        if stages * dp_world != world:
            raise _unsupported(
                f"PipelineEngine: {stages} stages x {dp_world} data-parallel ranks != world size {world}"
            )
        return _Parallel("pipe")
    tp = _autotp_size(engine)
    if tp > 1:
        if stage == 3:
            raise _unsupported(
                "AutoTP tensor parallel with ZeRO stage 3 is not supported (its shard layout is not "
                "verified); use ZeRO stage 1 or 2 with tensor_parallel.autotp_size"
            )
        tp_rank = int(_call(mpu, "get_tensor_model_parallel_rank", "engine.mpu (AutoTP)"))
        tp_world = int(_call(mpu, "get_tensor_model_parallel_world_size", "engine.mpu (AutoTP)"))
        if tp_world != tp or tp * dp_world != world:
            raise _unsupported(
                f"AutoTP: tensor-parallel world {tp_world} (autotp_size {tp}) x {dp_world} data-parallel "
                f"ranks != world size {world} (sequence parallelism is not supported)"
            )
        return _Parallel("autotp", tp_rank, tp_world)
    if mpu is not None:
        raise _unsupported(
            f"model parallelism through engine.mpu ({type(mpu).__name__}, {_model_parallel_world(mpu)}-way model "
            "parallel) is not supported: DeepSpeed records neither the dimension nor the offset of each rank's "
            "slice of a parameter, so its global shape and place are unknown; use AutoTP "
            "(\"tensor_parallel\": {\"autotp_size\": N}), whose split layers record them, or FSDP2 with DTensor "
            "tensor parallel"
        )
    if dp_world != world:
        raise _unsupported(
            f"the data-parallel group has {dp_world} ranks but the world has {world}: sequence/tensor/pipeline "
            f"parallelism other than PipelineEngine and AutoTP is not supported"
        )
    return _Parallel("dp")


def _tp_box(p: torch.nn.Parameter, name: str, par: _Parallel
            ) -> tuple[tuple[int, ...], tuple[tuple[int, ...], tuple[int, ...]] | None]:
    """``(global_shape, box)`` of a parameter: its AutoTP slice as an N-d box, or ``(shape, None)``.

    AutoTP's split layers (``deepspeed.module_inject.layers``) record on every parameter they
    touch ``p.ds_autotp_universal_checkpoint_meta``: ``logical_shape`` (the global shape),
    ``partition_dim`` and ``partition_sizes`` (every tensor-parallel rank's extent along it), or
    ``replicated`` (the row-parallel bias). Rank ``tp_rank`` holds ``partition_sizes[tp_rank]``
    indices from ``sum(partition_sizes[:tp_rank])`` along ``partition_dim`` and everything along
    the other dimensions. Parameters AutoTP left alone (norms, heads) are whole on every
    tensor-parallel rank. Fused sub-parameter splits (qkv, gate_up) are refused.
    """
    shape = tuple(p.shape)
    if par.kind != "autotp":
        return shape, None
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META

    meta = getattr(p, DS_AUTOTP_UC_META, None)
    if not meta or meta.get("replicated"):
        return shape, None
    dim, sizes, logical = meta.get("partition_dim"), meta.get("partition_sizes"), meta.get("logical_shape")
    if meta.get("sub_param_sizes") or meta.get("sub_param_shard_widths") or meta.get("sub_param_shape"):
        raise _unsupported(
            f"AutoTP parameter {name!r} is split per fused sub-parameter ({meta.get('partition_type')}); "
            "only contiguous splits along one dimension are supported"
        )
    if dim is None or not sizes or not logical or len(sizes) != par.tp_world:
        raise _unsupported(
            f"AutoTP parameter {name!r} records no usable split (partition_dim={dim}, partition_sizes={sizes}, "
            f"logical_shape={logical}) for {par.tp_world} tensor-parallel ranks"
        )
    logical = tuple(int(d) for d in logical)
    want = tuple(int(sizes[par.tp_rank]) if d == dim else n for d, n in enumerate(logical))
    if want != shape or sum(int(s) for s in sizes) != logical[dim]:
        raise _unsupported(
            f"AutoTP parameter {name!r}: local shape {shape} is not tensor-parallel rank {par.tp_rank}'s slice "
            f"{want} of {logical} along dim {dim} (partition_sizes {tuple(sizes)})"
        )
    starts = tuple(sum(int(s) for s in sizes[:par.tp_rank]) if d == dim else 0 for d in range(len(logical)))
    return logical, (starts, shape)


def _check_optimizer_class(engine: Any, stage: int) -> Any:
    """Return ``engine.optimizer`` if it is exactly the ZeRO optimizer class the layout assumes."""
    opt = getattr(engine, "optimizer", None)
    if opt is None:
        raise _unsupported(
            "the engine has no optimizer: pass one to deepspeed.initialize (the EMA tracks the optimizer's "
            "fp32 master weights)"
        )
    if stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        expected = DeepSpeedZeroOptimizer
    else:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

        expected = DeepSpeedZeroOptimizer_Stage3
    if type(opt) is not expected:
        hint = ""
        if type(opt).__name__ == "BF16_Optimizer":
            hint = (
                " (DeepSpeed picks BF16_Optimizer for bf16 + ZeRO stage 1 + data_types.grad_accum_dtype="
                "fp32; drop grad_accum_dtype or use ZeRO stage 2)"
            )
        raise _unsupported(
            f"ZeRO stage {stage} engine uses optimizer class {type(opt).__name__}, expected "
            f"{expected.__name__}{hint}"
        )
    return opt


# ---------------------------------------------------------------------------------------
# ZeRO-1/2
# ---------------------------------------------------------------------------------------


def _buffer_mapping_zero12(
    opt: Any, g: int, rank: int, world: int
) -> dict[int, tuple[int, int, torch.Tensor]]:
    """``{id(param): (flat_start_in_param, numel, fp32_view)}`` computed from ZeRO-1/2 buffers.

    Independent of ``_hp_mapping``: a param's offset in the flat working buffer is read
    from its storage address; this rank's fp32 partition covers flat
    ``[rank*size, (rank+1)*size)``. Params without elements in this partition are absent.
    """
    flat = _attr(opt, "bit16_groups_flat", "DeepSpeedZeroOptimizer")[g]
    fp32 = _attr(opt, "single_partition_of_fp32_groups", "DeepSpeedZeroOptimizer")[g]
    ordered = _attr(opt, "round_robin_bit16_groups", "DeepSpeedZeroOptimizer")[g]
    if flat.numel() % world:
        raise _unsupported(
            f"bit16_groups_flat[{g}] ({flat.numel()} elements) is not split evenly over {world} ranks"
        )
    size = flat.numel() // world
    if fp32.dim() != 1 or fp32.numel() != size:
        raise _unsupported(
            f"single_partition_of_fp32_groups[{g}] has {fp32.numel()} elements, expected the partition size "
            f"{size} (= bit16_groups_flat[{g}].numel() // {world})"
        )
    lo_part, hi_part = rank * size, (rank + 1) * size
    out: dict[int, tuple[int, int, torch.Tensor]] = {}
    for p in ordered:
        if not _same_storage(p.data, flat):
            raise _unsupported(
                f"a parameter of param group {g} is not a view into bit16_groups_flat[{g}]; cannot locate "
                f"its shard"
            )
        off = (p.data_ptr() - flat.data_ptr()) // p.element_size()
        lo, hi = max(off, lo_part), min(off + p.numel(), hi_part)
        if lo < hi:
            out[id(p)] = (lo - off, hi - lo, fp32.narrow(0, lo - lo_part, hi - lo))
    return out


def _layout_zero12(engine: Any, include_frozen: bool, stage: int) -> ShardLayout:
    opt = _check_optimizer_class(engine, stage)
    dp_group = _attr(opt, "dp_process_group", "DeepSpeedZeroOptimizer")
    _check_engine_config(engine, stage)
    par = _parallelism(engine, stage, dp_group)
    rank, world = _group_rank_size(dp_group)
    groups = _attr(opt, "bit16_groups", "DeepSpeedZeroOptimizer")
    real_groups = _attr(opt, "real_dp_process_group", "DeepSpeedZeroOptimizer")
    round_robin = bool(_attr(opt, "round_robin_gradients", "DeepSpeedZeroOptimizer"))
    fp32_parts = _attr(opt, "single_partition_of_fp32_groups", "DeepSpeedZeroOptimizer")

    group_of: dict[int, int] = {}
    mapping: dict[int, tuple[int, int, torch.Tensor]] = {}
    for g, params in enumerate(groups):
        if real_groups[g] is not dp_group:
            raise _unsupported(
                f"param group {g} is partitioned over real_dp_process_group[{g}], not the data-parallel "
                f"group (MoE expert groups are not supported)"
            )
        for p in params:
            group_of[id(p)] = g
        mapping.update(_buffer_mapping_zero12(opt, g, rank, world))

    if not round_robin:
        # Cross-check the documented per-param mapping against the buffer mapping once.
        for g, params in enumerate(groups):
            for p in params:
                hm = _attr(p, "_hp_mapping", "a ZeRO-1/2 parameter")
                got = None
                if hm is not None:
                    addr = _attr(hm, "lp_fragment_address", "_hp_mapping")
                    frag = _attr(hm, "hp_fragment", "_hp_mapping")
                    if not _same_storage(frag, fp32_parts[g]):
                        raise _unsupported(
                            "_hp_mapping.hp_fragment is not a view of single_partition_of_fp32_groups"
                        )
                    got = (int(addr.start), int(addr.numel), frag.data_ptr())
                want = mapping.get(id(p))
                want_key = None if want is None else (want[0], want[1], want[2].data_ptr())
                if got != want_key:
                    raise _unsupported(
                        f"_hp_mapping of a param in group {g} ({got}) disagrees with the layout of "
                        f"bit16_groups_flat ({want_key})"
                    )
                if hm is not None:
                    mapping[id(p)] = (int(hm.lp_fragment_address.start), int(hm.lp_fragment_address.numel),
                                      hm.hp_fragment)

    pieces: list[ShardPiece] = []
    params: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    frozen: list[torch.nn.Parameter] = []
    for name, p in engine.module.named_parameters():
        managed = id(p) in group_of
        if not managed and not (include_frozen or p.requires_grad):
            continue
        shape, box = _tp_box(p, name, par)
        params[name] = (shape, p.dtype)
        # a weight tied across pipeline stages: every stage holding it trains an identical copy;
        # DeepSpeed counts it once, on the first of them (the others are marked ds_pipe_replicated)
        owner = not (par.kind == "pipe" and getattr(p, "ds_pipe_replicated", False))
        if managed:
            hit = mapping.get(id(p))
            if hit is None:
                continue
            start, n, src = hit
            pieces.append(ShardPiece(
                fqn=name, global_shape=shape, dtype=p.dtype, flat_start=start, numel=n, source=src,
                owner=owner, load_target=p.data.view(-1).narrow(0, start, n), box=box,
            ))
        else:
            # Frozen (or not handed to the optimizer): full on every rank, no fp32 master.
            frozen.append(p)
            start, end = even_split(p.numel(), world, rank)
            if end > start:
                pieces.append(ShardPiece(
                    fqn=name, global_shape=shape, dtype=p.dtype, flat_start=start, numel=end - start,
                    source=p.data.view(-1).narrow(0, start, end - start), owner=owner, load_target=None, box=box,
                ))

    def after_load() -> None:
        """Re-sync the full working weights on every rank from each rank's written ranges."""
        flats = _attr(opt, "bit16_groups_flat", "DeepSpeedZeroOptimizer")
        with torch.no_grad():
            for flat in flats:
                size = flat.numel() // world
                dist.all_gather_into_tensor(flat, flat.narrow(0, rank * size, size).clone(), group=dp_group)
            for p in frozen:
                chunk = even_chunk(p.numel(), world)
                if chunk == 0:
                    continue
                flat_p = p.data.view(-1)
                mine = torch.zeros(chunk, dtype=p.dtype, device=p.device)
                s, e = even_split(p.numel(), world, rank)
                mine[: e - s] = flat_p[s:e]
                full = torch.empty(chunk * world, dtype=p.dtype, device=p.device)
                dist.all_gather_into_tensor(full, mine, group=dp_group)
                flat_p.copy_(full[: p.numel()])

    return _finish(engine, _ENGINE_NAMES[stage], pieces, params, dp_group, include_frozen, after_load)


# ---------------------------------------------------------------------------------------
# ZeRO-3
# ---------------------------------------------------------------------------------------


def _fp32_source_zero3(opt: Any, p: torch.nn.Parameter, n: int) -> torch.Tensor:
    """This rank's fp32 master range of a trainable ZeRO-3 param, as a persistent view."""
    from deepspeed.utils import safe_get_local_fp32_param

    grad_position = _attr(opt, "grad_position", "DeepSpeedZeroOptimizer_Stage3")
    flats = _attr(opt, "fp32_partitioned_groups_flat", "DeepSpeedZeroOptimizer_Stage3")
    pid = _attr(opt, "get_param_id", "DeepSpeedZeroOptimizer_Stage3")(p)
    if pid not in grad_position:
        raise _unsupported("a trainable ZeRO-3 param has no entry in optimizer.grad_position")
    g, off, _ = grad_position[pid]
    direct = flats[g].narrow(0, off, n)
    public = safe_get_local_fp32_param(p)
    if public is not None and public.numel() >= n and _same_storage(public, flats[g]) \
            and public.data_ptr() == direct.data_ptr():
        return public.view(-1).narrow(0, 0, n)
    return direct


def _layout_zero3(engine: Any, include_frozen: bool) -> ShardLayout:
    opt = _check_optimizer_class(engine, 3)
    dp_group = _attr(opt, "dp_process_group", "DeepSpeedZeroOptimizer_Stage3")
    _check_engine_config(engine, 3)
    if _parallelism(engine, 3, dp_group).kind != "dp":
        raise _unsupported("ZeRO stage 3 with pipeline or tensor parallelism is not supported")
    trainable = {id(p) for group in _attr(opt, "fp16_groups", "DeepSpeedZeroOptimizer_Stage3") for p in group}

    pieces: list[ShardPiece] = []
    params: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, p in engine.module.named_parameters():
        managed = id(p) in trainable
        if not managed and not (include_frozen or p.requires_grad):
            continue
        ds_tensor = _attr(p, "ds_tensor", "a ZeRO-3 parameter")
        total = int(_attr(p, "ds_numel", "a ZeRO-3 parameter"))
        shape = tuple(_attr(p, "ds_shape", "a ZeRO-3 parameter"))
        if math.prod(shape) != total:
            raise _unsupported(f"param {name!r}: ds_shape {shape} does not match ds_numel {total}")
        part = int(_attr(ds_tensor, "ds_numel", "ZeRO-3 ds_tensor"))
        group = getattr(p, "ds_process_group", dp_group)
        rank, world = _group_rank_size(group)
        if world != dist.get_world_size(group=dp_group):
            raise _unsupported(
                f"param {name!r} is partitioned over a group other than the data-parallel group"
            )
        if part * world < total or ds_tensor.numel() < part:
            raise _unsupported(
                f"param {name!r}: partition size {part} x {world} ranks does not cover its {total} elements"
            )
        params[name] = (shape, p.dtype)
        start = rank * part
        n = min(part, total - start)
        if n <= 0:
            continue
        target = ds_tensor.view(-1).narrow(0, 0, n)
        if managed:
            pieces.append(ShardPiece(
                fqn=name, global_shape=shape, dtype=p.dtype, flat_start=start, numel=n,
                source=_fp32_source_zero3(opt, p, n), owner=True, load_target=target,
            ))
        else:
            pieces.append(ShardPiece(
                fqn=name, global_shape=shape, dtype=p.dtype, flat_start=start, numel=n,
                source=target, owner=True, load_target=None,
            ))

    def after_load() -> None:
        """Re-gather the params that ZeRO-3 keeps gathered between steps (persistent ones).

        ``all_gather`` skips params that are already gathered, so release them first. This
        is the pair of calls the engine makes around a checkpoint load: the prologue frees
        the gathered copies (``ds_tensor`` stays authoritative, nothing is copied back), the
        epilogue re-gathers the persistent params from the (written) partitions.
        """
        _call(opt, "checkpoint_event_prologue", "DeepSpeedZeroOptimizer_Stage3")
        _call(opt, "checkpoint_event_epilogue", "DeepSpeedZeroOptimizer_Stage3")

    return _finish(engine, "zero3", pieces, params, dp_group, include_frozen, after_load)


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------


def _finish(
    engine: Any,
    name: str,
    pieces: list[ShardPiece],
    params: dict[str, tuple[tuple[int, ...], torch.dtype]],
    dp_group: Any,
    include_frozen: bool,
    after_load: Callable[[], None],
) -> ShardLayout:
    check_pieces_local(pieces)
    log.debug("deepspeed_layout: %s, %d pieces, %d elements on this rank", name, len(pieces),
              sum(p.numel for p in pieces))
    return ShardLayout(
        engine=name,
        pieces=pieces,
        params=params,
        buffers=dict(engine.module.named_buffers()),
        process_group=dp_group,
        refresh=lambda: deepspeed_layout(engine, include_frozen=include_frozen),
        after_load=after_load,
        step_applied=functools.partial(deepspeed_step_was_applied, engine),
    )


def deepspeed_layout(engine: Any, include_frozen: bool = True) -> ShardLayout:
    """List this rank's shards of a ZeRO stage 1/2/3 ``DeepSpeedEngine``, ``PipelineEngine`` or AutoTP engine.

    Args:
        engine: the engine returned by ``deepspeed.initialize`` (with an optimizer).
        include_frozen: also track params with ``requires_grad=False`` (they have no fp32
            master; see the module docstring for how they are split).

    Returns:
        A :class:`ShardLayout` with engine name "zero1", "zero2" or "zero3".

    Raises:
        UnsupportedEngineError: not a DeepSpeed engine, ZeRO disabled (stage 0), or a
            configuration/version whose layout is not verified.

    Example:
        >>> engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        >>> layout = deepspeed_layout(engine)
        >>> [(p.fqn, p.flat_start, p.numel) for p in layout.pieces]
    """
    if not is_deepspeed_engine(engine):
        raise UnsupportedEngineError(f"expected a deepspeed.DeepSpeedEngine, got {type(engine).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise _unsupported("torch.distributed is not initialized")
    stage = int(_call(engine, "zero_optimization_stage", "DeepSpeedEngine"))
    if stage in (1, 2):
        return _layout_zero12(engine, include_frozen, stage)
    if stage == 3:
        return _layout_zero3(engine, include_frozen)
    raise _unsupported(
        f"ZeRO stage {stage} is not supported: enable zero_optimization.stage 1, 2 or 3 "
        f"(with stage 0 every rank holds full weights; wrap the plain model instead)"
    )
