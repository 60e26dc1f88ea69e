"""Benchmark 2: the update under FSDP2 on 2 ranks (gloo, CPU), per rank.

- per-rank time vs the single-process full-model time (goal: about 1/world). Measured two
  ways: ranks updating one at a time (as on separate devices), and all ranks at once (here
  they share 2 cores and one memory bus, so that one is bounded by the machine, not the code).
- per-rank time vs the floor on the local shard bytes (bare foreach over the same shard tensors).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.common import Goal, Result, Table, fmt_ms, fmt_x, med, paired_ratio


def run(quick: bool = False, threads: int = 1, world: int = 2) -> Result:
    from tests.dist_harness import run_workers

    layers, width, ff = (4, 128, 512) if quick else (24, 512, 2048)
    rounds = 5 if quick else 20
    res = Result("sharded", f"2. Update under FSDP2, {world} ranks (per rank)")
    res.config = {"model": f"{layers} x TransformerEncoderLayer(width {width}, ff {ff})", "world": world,
                  "threads_per_rank": threads, "rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="bench-sharded-") as tmp:
        run_workers("bench.workers:sharded_update", world, tmp,
                    kwargs={"layers": layers, "width": width, "ff": ff, "rounds": rounds, "threads": threads},
                    timeout=600, env={"OMP_NUM_THREADS": str(threads)})
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    r0 = ranks[0]
    full = r0["full"]
    tab = Table("Per-rank update time (median over rounds)",
                ["rank", "local / full elements", "alone ms", "alone vs full model", "concurrent ms",
                 "concurrent vs local floor", "fused vs local floor"])
    alone_ratios, floor_ratios = [], []
    for r, d in enumerate(ranks):
        frac = d["local_numel"] / d["full_numel"]
        ra = paired_ratio(d["alone"]["dist-ema"], full)  # same round: robust to load drift
        rf = paired_ratio(d["concurrent"]["dist-ema"], d["concurrent"]["floor"])
        rfu = paired_ratio(d["concurrent"]["fused"], d["concurrent"]["floor"])
        alone_ratios.append(ra)
        floor_ratios.append(rf)
        tab.rows.append([r, f"{frac:.3f}", fmt_ms(med(d["alone"]["dist-ema"])), fmt_x(ra),
                         fmt_ms(med(d["concurrent"]["dist-ema"])), fmt_x(rf), fmt_x(rfu)])
    tab.rows.append(["full model, 1 process", "1.000", fmt_ms(med(full)), "1.00x", "", "", ""])
    res.tables.append(tab)
    worst = max(alone_ratios)
    res.goals.append(Goal(f"per-rank update about 1/world = {1 / world:.2f} of the full model (ranks alone)",
                          fmt_x(worst), worst <= 1.2 / world,
                          "median of per-round ratios: each rank alone vs the full model in one process, same "
                          "thread count"))
    conc = max(med(d["concurrent"]["dist-ema"]) for d in ranks) / med(full)
    res.goals.append(Goal("per-rank update with all ranks updating at once, vs the full model",
                          fmt_x(conc), None,
                          "informational: 2 ranks share 2 cores and one memory bus here (and other jobs)"))
    wf = max(floor_ratios)
    res.goals.append(Goal("dist-ema within 5% of the floor on the local shard", fmt_x(wf), wf <= 1.05))
    res.notes.append(f"{r0['pieces']} shard pieces per rank; fused path: {r0['fused_mode']} "
                     f"({r0['fused_compiled_runs']} compiled runs). FSDP2 shards are separate allocations, "
                     f"so the fused kernel runs per tensor (no flat source).")
    res.data = {"ranks": ranks}
    return res
