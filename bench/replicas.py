"""Replicas share the snapshot writing: FSDP2 HSDP on 4 CPU gloo ranks (2 replicas x 2 shards).

    python bench/replicas.py [--rounds 9] [--width 512] [--layers 4]

One model, two EMAs tracking it in the same run, each with its own store and writer process:

- "shared" (what dist-ema does): the 2 replicas of each shard write 1/2 of its bytes each;
- "replica0" (the baseline, the old rule): replicate coordinate 0 writes its whole shard and
  the other replica writes nothing (the same layout with ``owner`` set on replica 0 only).

Per round (one optimizer step, both EMAs updated) each EMA takes one snapshot and waits until
it is committed (``snapshot()`` then ``flush()``, between barriers), in alternating order. The
figures: bytes written per rank per snapshot (from the writer's own accounting) and the
snapshot time (slowest rank, staging + write + commit), medians of interleaved rounds, and the
paired per-round ratio shared / replica0. Results: ``bench/results/replicas.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIGMA_RELS = (0.05, 0.10)


def worker(rank: int, world: int, out_dir: str, width: int, layers: int, rounds: int) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dist_ema import PostHocEMA
    from dist_ema.sharding.checks import verify_layout
    from dist_ema.sharding.detect import make_layout

    torch.set_num_threads(1)
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    shared_layout = make_layout(model)
    base_layout = make_layout(model)
    replica = mesh.get_local_rank(0)
    base_layout.pieces = [replace(p, owner=replica == 0) for p in base_layout.pieces]
    base_layout.refresh = None  # the model never reloads here
    verify_layout(base_layout)  # the baseline covers every element exactly once too
    emas = {
        "shared": PostHocEMA(model, sigma_rels=SIGMA_RELS, store=f"{out_dir}/shared", layout=shared_layout),
        "replica0": PostHocEMA(model, sigma_rels=SIGMA_RELS, store=f"{out_dir}/replica0", layout=base_layout),
    }
    x = torch.randn(8, width)
    seconds: dict[str, list[float]] = {k: [] for k in emas}
    nbytes: dict[str, list[int]] = {k: [] for k in emas}
    for r in range(rounds + 1):  # round 0 warms up (writer start, zarr imports)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        names = list(emas) if r % 2 == 0 else list(emas)[::-1]
        for ema in emas.values():
            ema.update()
        for name in names:
            ema = emas[name]
            before = ema.snapshots.bytes_written
            dist.barrier()
            t0 = time.perf_counter()
            ema.snapshot()
            ema.flush()
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if r:
                seconds[name].append(float(dt))
                nbytes[name].append(ema.snapshots.bytes_written - before)
    for ema in emas.values():
        ema.close()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"seconds": seconds, "bytes": nbytes}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    from tests.dist_harness import run_workers

    world = 4
    with tempfile.TemporaryDirectory(prefix="dist-ema-bench-replicas-") as tmp:
        run_workers("bench.replicas:worker", world, tmp, timeout=1800,
                    kwargs={"width": args.width, "layers": args.layers, "rounds": args.rounds})
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    med = statistics.median
    params = args.layers * (args.width * args.width + args.width)
    per_rank = {name: [med(rk["bytes"][name]) for rk in ranks] for name in ("shared", "replica0")}
    secs = {name: ranks[0]["seconds"][name] for name in ("shared", "replica0")}  # slowest rank, same on all
    paired = med([a / b for a, b in zip(secs["shared"], secs["replica0"])])
    result = {
        "setup": f"FSDP2 HSDP, mesh 2 replicas x 2 shards on 4 CPU gloo ranks, {params:,} fp32 parameters "
                 f"({params * 4 / 2**20:.1f} MiB), {len(SIGMA_RELS)} profiles, default process writer, "
                 f"local disk, {args.rounds} interleaved rounds",
        "bytes_per_rank": per_rank,
        "max_rank_bytes_ratio": max(per_rank["shared"]) / max(per_rank["replica0"]),
        "snapshot_seconds_median": {k: med(v) for k, v in secs.items()},
        "snapshot_seconds_ratio": paired,
    }
    out = ROOT / "bench" / "results" / "replicas.json"
    out.write_text(json.dumps(result, indent=1))
    mib = 2**20
    print(result["setup"])
    print(f"{'':10} {'bytes per rank per snapshot (MiB)':>36} {'snapshot time (median)':>24}")
    for name in ("replica0", "shared"):
        print(f"{name:10} {' / '.join(f'{b / mib:.2f}' for b in per_rank[name]):>36} "
              f"{med(secs[name]) * 1e3:>21.1f} ms")
    print(f"largest per-rank write: {result['max_rank_bytes_ratio']:.2f}x of replica0; "
          f"snapshot time: {paired:.2f}x of replica0 (paired per-round ratio)")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
