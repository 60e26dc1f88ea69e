"""verify_layout: gaps, overlaps, mismatched params and local errors raise the same error on every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_ema.sharding.base import ShardLayout, ShardPiece, UnsupportedEngineError
from dist_ema.sharding.checks import ShardCoverageError, verify_layout
from dist_ema.sharding.replicated import even_split, replicated_layout
from tests.dist_harness import run_workers

SHAPES = {"a.weight": (5, 3), "b.bias": (4,)}


def _layout(rank: int, ws: int) -> ShardLayout:
    """A hand-made layout: each rank owns its even 1/ws slice of every parameter."""
    pieces = []
    for fqn, shape in SHAPES.items():
        numel = torch.Size(shape).numel()
        a, b = even_split(numel, ws, rank)
        if b > a:
            pieces.append(ShardPiece(fqn, shape, torch.float32, a, b - a, torch.zeros(b - a)))
    params = {fqn: (shape, torch.float32) for fqn, shape in SHAPES.items()}
    return ShardLayout(engine="test", pieces=pieces, params=params)


def _replace(layout: ShardLayout, fqn: str, **changes) -> None:
    for i, p in enumerate(layout.pieces):
        if p.fqn == fqn:
            numel = changes.get("numel", p.numel)
            fields = dict(fqn=p.fqn, global_shape=p.global_shape, dtype=p.dtype, flat_start=p.flat_start,
                          numel=numel, source=torch.zeros(numel), owner=p.owner)
            fields.update(changes)
            layout.pieces[i] = ShardPiece(**fields)


def worker_scenario(rank: int, ws: int, out_dir: str, scenario: str) -> None:
    layout = _layout(rank, ws)
    if scenario == "gap" and rank == 1:
        layout.pieces = [p for p in layout.pieces if p.fqn != "a.weight"]
    elif scenario == "overlap" and rank == 1:
        p = next(p for p in layout.pieces if p.fqn == "a.weight")
        _replace(layout, "a.weight", flat_start=p.flat_start - 2, numel=p.numel + 2)
    elif scenario == "non_owner_gap" and rank == 0:
        _replace(layout, "b.bias", owner=False)  # a replica that owns nothing leaves a gap
    elif scenario == "params" and rank == ws - 1:
        layout.params["b.bias"] = ((2, 2), torch.float32)
        _replace(layout, "b.bias", global_shape=(2, 2))
    elif scenario == "local" and rank == ws - 1:
        layout.pieces.append(ShardPiece("ghost", (3,), torch.float32, 0, 3, torch.zeros(3)))
    elif scenario == "bad_source" and rank == 0:
        _replace(layout, "b.bias", source=torch.zeros(1, 2))
    message = None
    try:
        verify_layout(layout)
    except ShardCoverageError as exc:
        message = str(exc)
    if scenario == "ok":
        # a subgroup whose first rank is not global rank 0; layout split over that group
        group = dist.new_group([1, 2]) if ws == 3 else None
        if group is not None and rank in (1, 2):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
            sub = replicated_layout(model, process_group=group)
            verify_layout(sub, group=group)
            sub.pieces = sub.pieces[:-1] if rank == 2 else sub.pieces
            with pytest.raises(ShardCoverageError, match="owned by no rank"):
                verify_layout(sub, group=group)
    # a collective after the check: every rank got here, none is stuck in verify_layout
    dist.barrier()
    Path(out_dir, f"msg{rank}.json").write_text(json.dumps(message))


def _messages(tmp_path: Path, ws: int) -> list[str | None]:
    return [json.loads((tmp_path / f"msg{r}.json").read_text()) for r in range(ws)]


@pytest.mark.dist
@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "scenario,ws,expected",
    [
        ("ok", 3, None),
        ("gap", 2, "parameter 'a.weight' (shape (5, 3), 15 elements): elements [8, 15) are owned by no rank"),
        ("gap", 3, "parameter 'a.weight' (shape (5, 3), 15 elements): elements [5, 10) are owned by no rank"),
        ("overlap", 3, "parameter 'a.weight' (shape (5, 3), 15 elements): elements [3, 5) are owned by both "
                       "rank 0 and rank 1"),
        ("non_owner_gap", 3, "parameter 'b.bias' (shape (4,), 4 elements): elements [0, 2) are owned "
                             "by no rank"),
        ("params", 3, "ranks disagree on the tracked parameters:\n  parameter 'b.bias' is "
                      "((4,), 'torch.float32') on rank 0 but ((2, 2), 'torch.float32') on rank 2"),
        ("local", 2, "rank 1: piece of 'ghost' names a parameter missing from layout.params"),
        ("bad_source", 3, "rank 0: ValueError: shard piece of 'b.bias': source must be a 1-d view of 2"),
    ],
)
def test_verify_layout_raises_on_every_rank(
    tmp_path: Path, scenario: str, ws: int, expected: str | None
) -> None:
    spec = "tests.test_sharding_checks:worker_scenario"
    run_workers(spec, ws, tmp_path, {"scenario": scenario}, timeout=80)
    messages = _messages(tmp_path, ws)
    assert len(set(messages)) == 1, messages  # the very same error on every rank
    if expected is None:
        assert messages[0] is None
        return
    assert messages[0] is not None and expected in messages[0], messages[0]


def test_single_process_coverage() -> None:
    layout = _layout(0, 1)
    verify_layout(layout)  # no process group: checks this rank alone
    layout.pieces[0] = ShardPiece("a.weight", (5, 3), torch.float32, 0, 10, torch.zeros(10))
    with pytest.raises(ShardCoverageError, match=r"'a.weight'.*\[10, 15\) are owned by no rank"):
        verify_layout(layout)
    layout = _layout(0, 1)
    layout.pieces.append(ShardPiece("b.bias", (4,), torch.float32, 1, 2, torch.zeros(2)))
    with pytest.raises(ShardCoverageError, match=r"'b.bias'.*\[1, 3\) are owned by both rank 0 and rank 0"):
        verify_layout(layout)
    layout = _layout(0, 1)
    layout.params["a.weight"] = ((15,), torch.float32)
    with pytest.raises(ShardCoverageError, match=r"global shape \(5, 3\).*layout.params says \(15,\)"):
        verify_layout(layout)
    assert issubclass(ShardCoverageError, UnsupportedEngineError)


def test_many_problems_are_summarised() -> None:
    params = {f"p{i}": ((2,), torch.float32) for i in range(8)}
    layout = ShardLayout(engine="test", pieces=[], params=params)
    with pytest.raises(ShardCoverageError, match=r"and 3 more") as info:
        verify_layout(layout)
    assert "'p0'" in str(info.value) and "'p7'" not in str(info.value)
