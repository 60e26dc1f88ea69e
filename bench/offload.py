"""Benchmark 9: host-memory EMA (``offload=True``): the training step with it, without it, and with no EMA.

One process, a transformer-shaped model trained with AdamW (forward, backward, step), 2 tracked
profiles updated every step. Three variants, each its own copy of the model from the same seed,
timed in interleaved blocks of steps: no EMA, ``PostHocEMA`` (the EMA beside the weights, updated
on the training thread) and ``PostHocEMA(offload=True)`` (the shard copied to a host staging
buffer on the training thread, the update on a worker thread, overlapped with the next step).

On a CPU the "device" is host memory too: what offload moves here is the update's work off the
training thread (it needs a free core), not memory. The GPU figures (device memory, stall against
a device-to-host copy) come from bench/gpu_check.py.
"""

from __future__ import annotations

import time

import torch

from bench.common import Goal, Result, Table, fmt_ms, med, paired_ratio
from bench.models import describe, encoder

SIGMA_RELS = (0.05, 0.10)


def run(quick: bool = False, threads: int = 1) -> Result:
    from dist_ema import PostHocEMA

    torch.set_num_threads(threads)
    layers, width, ff, batch, seq = (2, 128, 512, 4, 16) if quick else (8, 512, 2048, 2, 16)
    steps, blocks = (3, 2) if quick else (8, 9)
    res = Result("offload", "9. Host-memory EMA (offload=True): training-step overhead, one process on CPU")
    probe = encoder(layers, width, ff)
    res.config = {"model": f"{layers} x TransformerEncoderLayer(width {width}, ff {ff}), batch {batch} x seq {seq}, "
                           f"AdamW", **describe(probe), "threads": threads, "steps_per_block": steps,
                  "blocks": blocks, "profiles": len(SIGMA_RELS)}
    del probe
    x = torch.randn(batch, seq, width, generator=torch.Generator().manual_seed(0))

    def variant(ema_kw: dict | None):
        model = encoder(layers, width, ff)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ema = PostHocEMA(model, sigma_rels=SIGMA_RELS, **ema_kw) if ema_kw is not None else None
        update_s: list[float] = []

        def block() -> None:
            for _ in range(steps):
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=False)
                if ema is not None:
                    t0 = time.perf_counter()
                    ema.update()
                    update_s.append(time.perf_counter() - t0)
            if ema is not None:
                ema.wait_update()  # the block's time includes the last update

        return block, ema, update_s

    runs = {"without EMA": variant(None), "offload=False": variant({}), "offload=True": variant({"offload": True})}
    for block, _, upd in runs.values():  # warm-up: compile the update plans, allocate optimizer state
        block()
        upd.clear()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(blocks):
        for name, (block, _, _) in runs.items():
            t0 = time.perf_counter()
            block()
            times[name].append((time.perf_counter() - t0) / steps)
    base = times["without EMA"]
    tab = Table("Step time (median over interleaved blocks)", ["variant", "ms / step", "vs without EMA",
                                                               "update() call, ms (phase only)"])
    for name, (_, _ema, upd) in runs.items():
        tab.rows.append([name, fmt_ms(med(times[name])), f"{paired_ratio(times[name], base):.3f}x",
                         fmt_ms(med(upd)) if upd else ""])
    res.tables.append(tab)
    host = runs["offload=True"][1]
    waits = host.update_waits if host is not None else 0
    shard = [p.detach() for p in runs["offload=True"][1].model.parameters()]
    mirror = [torch.empty_like(p) for p in shard]
    copy_s = []
    for _ in range(7):  # what staging adds to each update on the training thread: one copy of the shard
        t0 = time.perf_counter()
        torch._foreach_copy_(mirror, shard)
        copy_s.append(time.perf_counter() - t0)
    tab.rows.append(["a plain copy of the shard (what offload adds per update)", "", "", fmt_ms(med(copy_s))])
    r_off, r_dev = paired_ratio(times["offload=True"], base), paired_ratio(times["offload=False"], base)
    step = med(base)
    res.goals.append(Goal("training-step overhead with offload=True against offload=False (reported: on a CPU the "
                          "EMA's memory is host memory either way)",
                          f"{100 * (r_off - 1):+.1f}% vs {100 * (r_dev - 1):+.1f}% of the step without EMA "
                          f"({fmt_ms((r_off - 1) * step)} vs {fmt_ms((r_dev - 1) * step)} ms)", None,
                          why=f"offload adds a copy of the shard per update on the training thread "
                              f"({fmt_ms(med(copy_s))} ms here) and runs the lerp on a worker thread, which on this "
                              f"2-core shared machine competes with the training thread for cores and memory "
                              f"bandwidth; {waits} update() calls waited for the previous update. What offload "
                              f"saves is accelerator memory (bench/gpu_check.py)"))
    res.data = {"times": times, "waits": waits,
                "staging_bytes": host._host.staging_bytes if host is not None and host._host is not None else 0}
    for _, ema, _ in runs.values():
        if ema is not None:
            ema.close()
    return res
