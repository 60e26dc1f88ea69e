"""FSDP2 and FSDP1 adapters on real gloo process groups with real AdamW steps.

Each worker lists the layout BEFORE the first forward, trains, then checks that the
views listed then (same data_ptr) hold the updated values and that the pieces of all
ranks rebuild the full parameters (gathered independently: ``full_tensor()`` for
FSDP2, a FULL_STATE_DICT for FSDP1) bit-exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dist_ema.sharding.base import UnsupportedEngineError
from dist_ema.sharding.checks import verify_layout
from dist_ema.sharding.detect import make_layout
from dist_ema.sharding.replicated import clean_fqn
from tests.dist_harness import run_workers
from tests.test_sharding_replicated import (
    FROZEN,
    TRAINABLE,
    build_model,
    check_live_views,
    check_rebuild,
    piece_meta,
    read_results,
    snapshot_sources,
    train,
    write_result,
)

pytestmark = pytest.mark.dist

ALL_PARAMS = sorted(TRAINABLE + FROZEN)

# ----------------------------------------------------------------------------- FSDP2


def _fully_shard_tiny(model: nn.Module, **kwargs) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for mod in (model.l1, model.l2, model.frozen, model.head):
        fully_shard(mod, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _fsdp2_reference(model: nn.Module) -> dict[str, torch.Tensor]:
    # full_tensor() is a collective: same order on every rank
    return {clean_fqn(n): p.full_tensor() for n, p in model.named_parameters()}


def worker_fsdp2(rank: int, ws: int, out_dir: str, mode: str, mesh_shape: list[int] | None = None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    kwargs: dict = {}
    if mode == "mp":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    if mesh_shape is not None:
        kwargs["mesh"] = init_device_mesh("cpu", tuple(mesh_shape), mesh_dim_names=("replicate", "shard"))
    model = build_model()
    target: nn.Module = model
    if mode == "wrapped":  # activation checkpointing + torch.compile add name prefixes
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        model.l1 = checkpoint_wrapper(model.l1)
    model = _fully_shard_tiny(model, **kwargs)
    if mode == "wrapped":
        target = torch.compile(model)  # only wrapped (names get "_orig_mod."), never run
        assert any("_orig_mod.l1._checkpoint_wrapped_module" in n for n, _ in target.named_parameters())
    layout0 = verify_layout(make_layout(target))  # the check splits the writing of replicas (HSDP)
    assert layout0.engine == "fsdp2"
    assert all(p.source.dtype == torch.float32 for p in layout0.pieces)
    snap = snapshot_sources(layout0)
    train(model, rank)
    layout1 = layout0.refresh()
    check_live_views(layout0, snap, layout1, mode)
    summary = check_rebuild(layout0, _fsdp2_reference(model), mode)
    verify_layout(layout1)
    assert sorted(layout0.buffers) == ["scale"]
    trainable = make_layout(target, include_frozen=False)
    assert sorted(trainable.params) == sorted(TRAINABLE)
    write_result(out_dir, rank, {"pieces": [list(m) for m in piece_meta(layout0)], **summary})


def worker_fsdp2_unsupported(rank: int, ws: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Shard

    # Shard(1) is a column block of each weight: described as N-d boxes, covered exactly once
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    fully_shard(model, shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 else None)
    layout = verify_layout(make_layout(model))
    boxes = {p.fqn: p.box for p in layout.pieces}
    assert boxes["0.weight"] == ((0, 2 * rank), (4, 2)) and boxes["0.bias"] is None, boxes

    # a pending reduction is not a shard of the parameter
    mesh = init_device_mesh("cpu", (ws,))
    model = nn.Linear(4, 4)
    model.weight = nn.Parameter(DTensor.from_local(torch.ones(4, 4), mesh, [Partial()]))
    model.bias = nn.Parameter(DTensor.from_local(torch.ones(4), mesh, [Partial()]))
    with pytest.raises(UnsupportedEngineError) as info:
        make_layout(model)
    msg = str(info.value)
    assert "'weight'" in msg and "Partial" in msg, msg

    # a model where only a block is sharded: the root's parameters are plain tensors
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    fully_shard(model[0])
    with pytest.raises(UnsupportedEngineError, match=r"'1.weight' is not sharded by FSDP2"):
        make_layout(model)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ws", [2, 3])
@pytest.mark.parametrize("mode", ["plain", "mp", "wrapped"])
def test_fsdp2_rebuilds_params(tmp_path: Path, ws: int, mode: str) -> None:
    run_workers("tests.test_sharding_fsdp:worker_fsdp2", ws, tmp_path, {"mode": mode})
    results = read_results(tmp_path, ws)
    if ws == 3:
        empty = results[0]["empty_ranks"]
        assert empty["l2.weight"] == [2]          # 2 rows on 3 ranks
        assert empty["head.weight"] == [1, 2]     # 1 row on 3 ranks
        emb = [[m for m in r["pieces"] if m[0] == "emb.weight"] for r in results]
        assert [e[0][1:3] for e in emb] == [[0, 12], [12, 12], [24, 4]]  # rows 3/3/1 of width 4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ws,mesh_shape", [(2, [2, 1]), (2, [1, 2]), (4, [2, 2])])
def test_fsdp2_hsdp(tmp_path: Path, ws: int, mesh_shape: list[int]) -> None:
    kwargs = {"mode": "hsdp", "mesh_shape": mesh_shape}
    run_workers("tests.test_sharding_fsdp:worker_fsdp2", ws, tmp_path, kwargs)
    _check_replicas_share(read_results(tmp_path, ws), mesh_shape)


def _held(pieces: list) -> list[tuple[str, int, int]]:
    """The (fqn, start, end) ranges a rank holds, adjacent pieces merged."""
    out: list[list] = []
    for fqn, start, numel, _owner in sorted(pieces, key=lambda m: (m[0], m[1])):
        if out and out[-1][0] == fqn and out[-1][2] == start:
            out[-1][2] = start + numel
        else:
            out.append([fqn, start, start + numel])
    return [tuple(x) for x in out]


def _check_replicas_share(results: list[dict], mesh_shape: list[int]) -> None:
    """Replicas hold the same elements and split owning them: 1/replicas each, at most one element apart."""
    replicas, shard = mesh_shape
    for c in range(shard):
        group = [results[r * shard + c]["pieces"] for r in range(replicas)]
        assert all(_held(g) == _held(group[0]) for g in group), c
        owned = [sum(m[2] for m in g if m[3]) for g in group]
        held = sum(m[2] for m in group[0])
        assert sum(owned) == held and max(owned) - min(owned) <= 1, (c, owned, held)


@pytest.mark.timeout(120)
def test_fsdp2_unsupported_placements(tmp_path: Path) -> None:
    run_workers("tests.test_sharding_fsdp:worker_fsdp2_unsupported", 2, tmp_path)


# ----------------------------------------------------------------------------- FSDP1


def _fsdp1_wrap(model: nn.Module, mode: str, mesh_shape: list[int] | None = None) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    kwargs: dict = dict(
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
        device_id=torch.device("cpu"),  # FSDP1 refuses CPU unless told explicitly
        use_orig_params=mode != "flat",
    )
    if mode == "no_shard":
        kwargs["sharding_strategy"] = ShardingStrategy.NO_SHARD
    if mode == "shard_grad_op":
        kwargs["sharding_strategy"] = ShardingStrategy.SHARD_GRAD_OP
    if mode == "mp":
        kwargs["mixed_precision"] = MixedPrecision(param_dtype=torch.bfloat16)
    if mode == "hybrid":
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["sharding_strategy"] = ShardingStrategy.HYBRID_SHARD
        names = ("replicate", "shard")
        kwargs["device_mesh"] = init_device_mesh("cpu", tuple(mesh_shape), mesh_dim_names=names)
    return FSDP(model, **kwargs)


def _fsdp1_reference(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg):
        sd = model.state_dict()
    return {k: v.clone() for k, v in sd.items() if k in ALL_PARAMS}


def worker_fsdp1(rank: int, ws: int, out_dir: str, mode: str, mesh_shape: list[int] | None = None) -> None:
    model = _fsdp1_wrap(build_model(), mode, mesh_shape)
    layout0 = make_layout(model)  # before the first forward: _local_shard does not exist yet
    assert layout0.engine == "fsdp1"
    assert all(p.source.dtype == torch.float32 for p in layout0.pieces)
    snap = snapshot_sources(layout0)
    verify_layout(layout0)
    train(model, rank)
    layout1 = layout0.refresh()  # after it: listed from _local_shard
    check_live_views(layout0, snap, layout1, mode)
    assert all(p.source.dtype == torch.float32 for p in layout1.pieces)
    summary = check_rebuild(layout0, _fsdp1_reference(model), mode)
    verify_layout(layout1)
    assert sorted(layout0.buffers) == ["scale"]
    trainable = make_layout(model, include_frozen=False)
    assert sorted(trainable.params) == sorted(TRAINABLE)
    assert {p.fqn for p in trainable.pieces} <= set(TRAINABLE)
    write_result(out_dir, rank, {"pieces": [list(m) for m in piece_meta(layout0)], **summary})


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ws", [2, 3])
@pytest.mark.parametrize("mode", ["orig", "flat", "mp", "no_shard", "shard_grad_op"])
def test_fsdp1_rebuilds_params(tmp_path: Path, ws: int, mode: str) -> None:
    run_workers("tests.test_sharding_fsdp:worker_fsdp1", ws, tmp_path, {"mode": mode})
    results = read_results(tmp_path, ws)
    if mode == "no_shard":
        # every rank tracks everything; ownership is split into torch.chunk-like slices
        for r, res in enumerate(results):
            held = {}
            for fqn, _start, numel, _owner in res["pieces"]:
                held[fqn] = held.get(fqn, 0) + numel
            assert sorted(held) == ALL_PARAMS
            owned = [m for m in res["pieces"] if m[0] == "emb.weight" and m[3]]
            chunk = -(-28 // ws)
            assert [m[1:3] for m in owned] == [[r * chunk, min(chunk, 28 - r * chunk)]]


def worker_fsdp1_hybrid_clamped(rank: int, ws: int, out_dir: str) -> None:
    model = _fsdp1_wrap(build_model(), "hybrid", [2, 1])
    with pytest.raises(UnsupportedEngineError, match="turned it into NO_SHARD"):
        make_layout(model)


@pytest.mark.timeout(120)
def test_fsdp1_hybrid_with_one_rank_shards_is_refused(tmp_path: Path) -> None:
    # FSDP1 clamps HYBRID_SHARD over a 1-rank shard group to NO_SHARD and then never
    # reduces gradients across the replicas: they diverge. The adapter says so.
    run_workers("tests.test_sharding_fsdp:worker_fsdp1_hybrid_clamped", 2, tmp_path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ws,mesh_shape", [(2, [1, 2]), (4, [2, 2])])
def test_fsdp1_hybrid_shard(tmp_path: Path, ws: int, mesh_shape: list[int]) -> None:
    kwargs = {"mode": "hybrid", "mesh_shape": mesh_shape}
    run_workers("tests.test_sharding_fsdp:worker_fsdp1", ws, tmp_path, kwargs)
    _check_replicas_share(read_results(tmp_path, ws), mesh_shape)


def worker_fsdp1_offload(rank: int, ws: int, out_dir: str) -> None:
    from torch.distributed.fsdp import CPUOffload
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # FSDP copies the shard into pinned memory at its first forward (which needs an
    # accelerator, so training itself cannot run here): listing before it is refused.
    model = FSDP(build_model(), device_id=torch.device("cpu"), use_orig_params=True,
                 cpu_offload=CPUOffload(offload_params=True))
    with pytest.raises(UnsupportedEngineError, match="after the first forward pass"):
        make_layout(model)


@pytest.mark.timeout(120)
def test_fsdp1_cpu_offload_before_first_forward_is_refused(tmp_path: Path) -> None:
    run_workers("tests.test_sharding_fsdp:worker_fsdp1_offload", 2, tmp_path)


# ----------------------------------------------------------------------------- detection


def worker_mixed_engines(rank: int, ws: int, out_dir: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    fully_shard(model[0])
    model[1] = FSDP(model[1], device_id=torch.device("cpu"))
    with pytest.raises(UnsupportedEngineError, match="mixes FSDP1") as info:
        make_layout(model)
    assert "'1'" in str(info.value) and "'0'" in str(info.value), str(info.value)


@pytest.mark.timeout(120)
def test_detect_refuses_fsdp1_fsdp2_mix(tmp_path: Path) -> None:
    run_workers("tests.test_sharding_fsdp:worker_mixed_engines", 2, tmp_path)
