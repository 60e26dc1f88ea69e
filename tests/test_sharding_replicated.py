"""Replicated (plain / DDP) adapter on real gloo process groups, plus helpers the FSDP tests share.

Every worker trains a tiny model with real AdamW steps, then gathers (fqn, flat_start,
values) of every rank's pieces and checks they rebuild every full parameter bit-exactly
against a reference obtained independently of the adapter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_ema.sharding.base import ShardLayout, UnsupportedEngineError
from dist_ema.sharding.checks import verify_layout
from dist_ema.sharding.detect import make_layout
from dist_ema.sharding.replicated import even_split, replicated_layout
from tests.dist_harness import run_workers

# ----------------------------------------------------------------------------- shared helpers


class TinyNet(nn.Module):
    """Sizes chosen so 3 ranks get uneven shards and empty pieces (rows 7, 5, 2, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)          # 7 rows: 3/3/1 on 3 ranks
        self.l1 = nn.Linear(4, 5)              # 5 rows: 2/2/1
        self.norm = nn.LayerNorm(5)
        self.l2 = nn.Linear(5, 2, bias=False)  # 2 rows: 1/1/0 (empty on rank 2)
        self.frozen = nn.Linear(2, 2)          # frozen parameters
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(2, 1)            # 1 row: only rank 0 holds it
        self.register_buffer("scale", torch.full((1,), 0.5))
        self.register_buffer("cache", torch.zeros(3), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.nn.functional.gelu(self.l1(self.emb(idx))))
        h = self.l2(h)
        h = h + self.frozen(h)
        return self.head(h).squeeze(-1) * self.scale


TRAINABLE = ["emb.weight", "l1.weight", "l1.bias", "norm.weight", "norm.bias", "l2.weight",
             "head.weight", "head.bias"]
FROZEN = ["frozen.weight", "frozen.bias"]


def build_model() -> TinyNet:
    torch.manual_seed(1234)  # identical initial weights on every rank
    return TinyNet()


def train(model: nn.Module, rank: int, steps: int = 2) -> None:
    """Real AdamW steps with a real backward; each rank sees different data."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        idx = torch.randint(0, 7, (3, 4), generator=gen)
        target = torch.randn(3, 4, generator=gen)
        loss = ((model(idx).float() - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def piece_meta(layout: ShardLayout) -> list[tuple[str, int, int, bool]]:
    return [(p.fqn, p.flat_start, p.numel, p.owner) for p in layout.pieces]


def snapshot_sources(layout: ShardLayout) -> dict:
    return {"ptrs": [p.source.data_ptr() for p in layout.pieces],
            "values": [p.source.detach().clone() for p in layout.pieces]}


def check_rebuild(layout: ShardLayout, reference: dict[str, torch.Tensor], label: str,
                  group: object | None = None) -> dict:
    """Gather every rank's pieces and check they rebuild ``reference`` bit-exactly.

    Every piece (owner or replica) must equal its range of the reference; owner pieces
    must cover each element exactly once. Returns a summary for the test to inspect.
    """
    ws = dist.get_world_size(group) if dist.is_initialized() else 1
    mine = [(p.fqn, p.flat_start, p.numel, p.owner, p.source.detach().clone()) for p in layout.pieces]
    gathered: list = [None] * ws
    if dist.is_initialized():
        dist.all_gather_object(gathered, mine, group=group)
    else:
        gathered = [mine]
    assert set(layout.params) == set(reference), (label, sorted(layout.params), sorted(reference))
    empty_ranks: dict[str, list[int]] = {}
    for fqn, (shape, dtype) in layout.params.items():
        ref = reference[fqn].detach()
        assert tuple(ref.shape) == tuple(shape), (label, fqn, ref.shape, shape)
        assert ref.dtype == dtype, (label, fqn, ref.dtype, dtype)
        flat_ref = ref.reshape(-1)
        rebuilt = torch.zeros_like(flat_ref)
        count = torch.zeros(flat_ref.numel(), dtype=torch.int64)
        for rank, pieces in enumerate(gathered):
            held = False
            for f, start, n, owner, vals in pieces:
                if f != fqn:
                    continue
                held = True
                assert vals.dtype == ref.dtype, (label, fqn, vals.dtype)
                assert torch.equal(vals, flat_ref[start:start + n]), (label, fqn, rank, start, n)
                if owner:
                    rebuilt[start:start + n] = vals
                    count[start:start + n] += 1
            if not held:
                empty_ranks.setdefault(fqn, []).append(rank)
        assert bool((count == 1).all()), (label, fqn, count.tolist())
        assert torch.equal(rebuilt, flat_ref), (label, fqn)
    return {"empty_ranks": empty_ranks}


def check_live_views(before: ShardLayout, snap: dict, after: ShardLayout, label: str) -> None:
    """The views listed before training are the storage the optimizer updated."""
    assert piece_meta(before) == piece_meta(after), label
    assert snap["ptrs"] == [p.source.data_ptr() for p in after.pieces], label
    for p, q in zip(before.pieces, after.pieces):
        assert torch.equal(p.source, q.source), (label, p.fqn)
    changed = {p.fqn for p, old in zip(before.pieces, snap["values"]) if not torch.equal(p.source, old)}
    trainable_held = {p.fqn for p in before.pieces if p.fqn in TRAINABLE}
    assert changed == trainable_held, (label, changed, trainable_held)


def write_result(out_dir: str, rank: int, result: dict) -> None:
    Path(out_dir, f"result{rank}.json").write_text(json.dumps(result))


def read_results(out_dir: Path, ws: int) -> list[dict]:
    return [json.loads((out_dir / f"result{r}.json").read_text()) for r in range(ws)]


# ----------------------------------------------------------------------------- workers


def worker_replicated(rank: int, ws: int, out_dir: str, ddp: bool) -> None:
    model = build_model()
    wrapped: nn.Module = nn.parallel.DistributedDataParallel(model) if ddp else model
    layout0 = make_layout(wrapped)
    assert layout0.engine == "replicated"
    snap = snapshot_sources(layout0)
    verify_layout(layout0)
    if ddp:
        train(wrapped, rank)
    else:  # plain module: replicas stay identical only when all ranks step identically
        train(wrapped, 0)
    layout1 = layout0.refresh()
    check_live_views(layout0, snap, layout1, f"ddp={ddp}")
    reference = {n: p for n, p in model.named_parameters()}
    summary = check_rebuild(layout0, reference, f"ddp={ddp}")
    verify_layout(layout1)
    sizes = {p.fqn: p.numel for p in layout0.pieces}
    for fqn, p in reference.items():  # torch.chunk-like split of the flattened parameter
        a, b = even_split(p.numel(), ws, rank)
        assert sizes.get(fqn, 0) == b - a, (fqn, sizes.get(fqn), a, b)
    assert sorted(layout0.buffers) == ["scale"]
    assert layout0.buffers["scale"].data_ptr() == model.scale.data_ptr()
    # include_frozen=False drops the frozen parameters from pieces and params
    trainable = make_layout(wrapped, include_frozen=False)
    assert sorted(trainable.params) == sorted(TRAINABLE)
    assert all(p.fqn in TRAINABLE for p in trainable.pieces)
    write_result(out_dir, rank, {"pieces": [list(m) for m in piece_meta(layout0)], **summary})


# ----------------------------------------------------------------------------- tests


@pytest.mark.dist
@pytest.mark.timeout(120)
@pytest.mark.parametrize("ws", [2, 3])
@pytest.mark.parametrize("ddp", [True, False], ids=["ddp", "plain"])
def test_replicated_rebuilds_params(tmp_path: Path, ws: int, ddp: bool) -> None:
    run_workers("tests.test_sharding_replicated:worker_replicated", ws, tmp_path, {"ddp": ddp})
    results = read_results(tmp_path, ws)
    if ws == 3:
        # head.bias has 1 element: ranks 1 and 2 hold nothing of it
        assert results[0]["empty_ranks"]["head.bias"] == [1, 2]
    owners = [sum(1 for m in r["pieces"] if m[0] == "emb.weight") for r in results]
    assert owners == [1] * ws


@pytest.mark.timeout(60)
def test_replicated_single_process_owns_everything() -> None:
    model = build_model()
    layout = replicated_layout(model)
    assert layout.engine == "replicated" and layout.process_group is None
    assert [(p.fqn, p.flat_start, p.numel) for p in layout.pieces] == [
        (n, 0, p.numel()) for n, p in model.named_parameters()
    ]
    snap = snapshot_sources(layout)
    train(model, 0)
    check_live_views(layout, snap, layout.refresh(), "single")
    check_rebuild(layout, dict(model.named_parameters()), "single")
    verify_layout(layout)
    assert make_layout(model).engine == "replicated"


def test_even_split_matches_torch_chunk() -> None:
    for numel in range(0, 12):
        for ws in range(1, 6):
            chunks = torch.arange(numel).chunk(ws) if numel else ()
            for r in range(ws):
                a, b = even_split(numel, ws, r)
                expect = chunks[r].tolist() if r < len(chunks) else []
                assert list(range(a, b)) == expect, (numel, ws, r)
    with pytest.raises(ValueError, match="invalid rank"):
        even_split(4, 2, 2)


def test_one_even_split_for_every_adapter() -> None:
    """FSDP2 rows, FSDP1 / DDP / ZeRO ranges: all torch.chunk splits come from sharding.base."""
    from dist_ema.sharding import base, fsdp1, replicated
    from dist_ema.sharding.base import even_chunk

    assert replicated.even_split is base.even_split and fsdp1.even_split is base.even_split
    for dim0 in range(0, 12):
        for ws in range(1, 6):
            chunks = torch.arange(dim0).chunk(ws) if dim0 else ()
            assert even_chunk(dim0, ws) == (len(chunks[0]) if chunks else 0), (dim0, ws)
            for r in range(ws):
                rows = chunks[r].tolist() if r < len(chunks) else []
                start, end = base.even_split(dim0, ws, r)
                assert list(range(start, end)) == rows, (dim0, ws, r)
    assert even_chunk(2**60 + 1, 3) == (2**60 + 1 + 2) // 3  # exact for any size (no float division)


def test_non_contiguous_parameter_is_refused() -> None:
    model = nn.Linear(3, 4)
    model.weight = nn.Parameter(torch.randn(3, 4).t())
    with pytest.raises(UnsupportedEngineError, match="not contiguous"):
        replicated_layout(model)


def test_detect_rejects_non_modules_and_bare_deepspeed_modules() -> None:
    with pytest.raises(UnsupportedEngineError, match="pass an nn.Module"):
        make_layout(object())
    model = nn.Linear(2, 2)
    model.weight.ds_id = 0  # what DeepSpeed ZeRO-3 attaches to the params of engine.module
    with pytest.raises(UnsupportedEngineError, match="pass the DeepSpeed engine"):
        make_layout(model)


@pytest.mark.dist
def test_detect_does_not_import_deepspeed() -> None:
    import subprocess
    import sys

    code = ("import sys; from dist_ema.sharding.detect import make_layout; import torch; "
            "make_layout(torch.nn.Linear(2, 2)); print('deepspeed' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"
