"""Functions run on every rank of a gloo job (tests/dist_harness.run_workers): benchmarks 2 and 3.

Each writes ``rank<r>.json`` into ``out_dir``; the benchmark module reads and reports them.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

SIGMA_RELS = (0.05, 0.10)


def _fsdp2(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


def _weights(gammas, t: float) -> list[float]:
    from dist_ema import phema

    return [1.0 - float(phema.power_beta(g, t, 1.0)) for g in gammas]


def _dump(out_dir: str, rank: int, obj: dict) -> None:
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(obj))


def sharded_update(rank: int, world: int, out_dir: str, layers: int, width: int, ff: int, rounds: int,
                   threads: int = 1) -> None:
    """Benchmark 2: per-rank update time under FSDP2 vs the single-process full model and the local floor."""
    torch.set_num_threads(threads)
    from bench.models import encoder
    from dist_ema import PostHocEMA, phema
    from dist_ema.kernels import FusedUpdate
    from dist_ema.sharding.base import ShardLayout, ShardPiece

    gammas = [float(phema.sigma_rel_to_gamma(s)) for s in SIGMA_RELS]
    model = _fsdp2(encoder(layers, width, ff))
    ema = PostHocEMA(model, sigma_rels=SIGMA_RELS)
    local = [p.source for p in ema.pieces]
    floor_emas = [[s.clone() for s in local] for _ in SIGMA_RELS]
    fused = FusedUpdate([p.views for p in ema.profiles], local)
    n = {"t": 1.0}

    def floor() -> None:
        n["t"] += 1.0
        for e, w in zip(floor_emas, _weights(gammas, n["t"])):
            torch._foreach_lerp_(e, local, w)

    def fused_step() -> None:
        fused(_weights(gammas, n["t"] + 1.0))

    fused_step()  # compile
    dist.barrier()

    # the single-process full model, on rank 0 only (1 thread, like every rank): a PostHocEMA over
    # the unsharded model with a one-rank layout (every parameter one piece)
    full_update = None
    if rank == 0:
        full = encoder(layers, width, ff)
        pieces = [ShardPiece(f, tuple(p.shape), p.dtype, 0, p.numel(), p.detach().view(-1))
                  for f, p in full.named_parameters()]
        lay = ShardLayout("single", pieces, {f: (tuple(p.shape), p.dtype) for f, p in full.named_parameters()})
        full_ema = PostHocEMA(full, sigma_rels=SIGMA_RELS, layout=lay)
        full_update = full_ema.update

    names = ["floor", "dist-ema", "fused"]
    fns = {"floor": floor, "dist-ema": ema.update, "fused": fused_step}
    conc = {k: [] for k in names}  # all ranks at once (ranks share this machine's cores and memory)
    alone = {k: [] for k in ("dist-ema",)}  # one rank at a time (like ranks on separate devices)
    full_t = []
    for r in range(rounds + 1):
        for k in names:
            dist.barrier()
            t0 = time.perf_counter()
            fns[k]()
            dt = time.perf_counter() - t0
            if r:
                conc[k].append(dt)
        for who in range(world):
            dist.barrier()
            if rank == who:
                t0 = time.perf_counter()
                ema.update()
                dt = time.perf_counter() - t0
                if r:
                    alone["dist-ema"].append(dt)
        dist.barrier()
        if rank == 0:
            t0 = time.perf_counter()
            full_update()
            dt = time.perf_counter() - t0
            if r:
                full_t.append(dt)
        dist.barrier()
    _dump(out_dir, rank, {
        "local_numel": sum(s.numel() for s in local), "full_numel": sum(math.prod(s) for s, _ in
                                                                          ema.layout.params.values()),
        "pieces": len(local), "concurrent": conc, "alone": alone, "full": full_t,
        "fused_mode": fused.mode, "fused_compiled_runs": fused.compiled_runs,
    })


def train_overhead(rank: int, world: int, out_dir: str, layers: int, width: int, ff: int, batch: int, seq: int,
                   steps: int, blocks: int, snapshot_every: int, store: str, threads: int = 1,
                   profile: bool = False) -> None:
    """Benchmark 3: FSDP2 training step time with dist-ema (update every step, snapshot every N) vs without.

    Blocks of ``steps`` steps alternate: without EMA, with EMA (A B A B ...), so load changes on the
    machine hit both alike; the EMA keeps its state across its blocks.
    """
    torch.set_num_threads(threads)
    from bench.models import encoder
    from dist_ema import PostHocEMA

    model = _fsdp2(encoder(layers, width, ff, seed=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(batch, seq, width, generator=g)
    y = torch.randn(batch, seq, width, generator=g)

    def train_step() -> None:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        train_step()
    ema = PostHocEMA(model, sigma_rels=SIGMA_RELS, store=store, snapshot_every=snapshot_every)
    upd_t: list[float] = []
    prof_lines: list[str] = []

    def ema_step() -> None:
        train_step()
        t0 = time.perf_counter()
        ema.update()
        upd_t.append(time.perf_counter() - t0)

    from bench.common import cpu_seconds

    writer = ema.snapshots.writer
    wpid = writer._proc.pid if getattr(writer, "_proc", None) is not None else None
    w0 = None
    block_t: dict[str, list[float]] = {"without": [], "with": []}
    for b in range(2 * blocks + 2):
        if b == 2 and wpid is not None:
            w0 = cpu_seconds(wpid)  # steady state: the writer's start-up (imports) is not counted
        kind = "without" if b % 2 == 0 else "with"
        fn = train_step if kind == "without" else ema_step
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        dist.barrier()
        if b >= 2:  # the first pair warms up (allocator, the writer process, first snapshot)
            block_t[kind].append((time.perf_counter() - t0) / steps)
    w1 = cpu_seconds(wpid) if wpid is not None else None
    writer_cpu = w1 - w0 if w0 is not None and w1 is not None else None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprof

        with tprof(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                ema_step()
        from bench.common import profile_rows

        prof_lines = profile_rows(prof, rows=6, always=("foreach_lerp", "copy_"))
    stalls = list(ema.snapshots.stall_seconds)
    ema.close()
    snaps = sorted(p.name for p in Path(store).joinpath("snapshots").iterdir() if p.name.startswith("step-"))
    objects = None
    if snaps and rank == 0:
        objects = sum(1 for _, _, files in os.walk(Path(store, "snapshots", snaps[0])) for _ in files)
    _dump(out_dir, rank, {
        "blocks": block_t, "update_s": upd_t, "stall_s": stalls, "snapshots": len(snaps),
        "objects_first_snapshot": objects, "owned_numel": ema.owned_numel, "profile": prof_lines,
        "bytes_written": ema.snapshots.bytes_written, "writer_cpu_s": writer_cpu,
        "steps_with_ema": blocks * steps,
        "layout": {"params": [[f, list(s), d] for f, s, d in ema.snapshots.layout.params],
                   "ranks": [json.loads(ema.snapshots.layout.rank_json(r))["pieces"]  # the store's own form
                             for r in range(len(ema.snapshots.layout.ranks))]} if rank == 0 else None,
        "inner_chunk_bytes": ema.store_config.inner_chunk_bytes,
    })
