"""Benchmark 1: EMA update cost per step, single process, 2 tracked profiles, update_every=1.

Variants, timed interleaved on the same transformer-shaped model:

- floor:       a bare ``torch._foreach_lerp_`` per profile over the model's parameters
               into separate per-parameter fp32 EMA tensors (what any EMA must do).
- dist-ema:    ``PostHocEMA.update()`` (the tracker: one foreach per profile over views
               into one flat fp32 buffer per profile, decay computed on the host).
- ema-pytorch, nitrous-ema: their ``PostHocEMA.update()`` (update_every=1, no checkpoints).
- fused:       ``dist_ema.kernels.FusedUpdate`` on dist-ema's own views and sources,
               decay weights computed per step like the tracker: each parameter is read once.
- flat floor / flat fused: the same with the sources in ONE flat buffer (what FSDP1 flat
               parameters and ZeRO fp32 partitions give), one lerp per profile vs one fused kernel.
"""

from __future__ import annotations

import tempfile
import time

import torch

from bench.common import Goal, Result, Table, fmt_ms, fmt_x, interleaved, med, paired_ratio, profile_top, spread
from bench.models import describe, encoder

SIGMA_RELS = (0.05, 0.10)


def run(quick: bool = False, threads: int = 1, device: str = "cpu") -> Result:
    torch.set_num_threads(threads)
    if device != "cpu" and not torch.cuda.is_available():
        res = Result("update_gpu", "1b. Update cost per step on a GPU")
        res.notes.append("no GPU on this machine: not run (it runs by default where torch.cuda.is_available())")
        return res
    from dist_ema import PostHocEMA, phema
    from dist_ema.kernels import FusedUpdate

    layers, width, ff = (4, 128, 512) if quick else (24, 512, 2048)
    rounds = 5 if quick else 15
    model = encoder(layers, width, ff).to(device)
    params = [p for p in model.parameters()]
    gpu = device != "cpu"
    sync = torch.cuda.synchronize if gpu else None  # GPU: host time including launches and syncs
    where = f"GPU {torch.cuda.get_device_name()}" if gpu else "single process"
    res = Result("update_gpu" if gpu else "update",
                 f"1{'b' if gpu else ''}. Update cost per step ({where}, 2 profiles, update_every=1)")
    res.config = {"model": f"{layers} x TransformerEncoderLayer(width {width}, ff {ff})", **describe(model),
                  "device": device, "threads": threads, "rounds": rounds, "sigma_rels": list(SIGMA_RELS)}

    gammas = [float(phema.sigma_rel_to_gamma(s)) for s in SIGMA_RELS]
    floor_emas = [[p.detach().clone() for p in params] for _ in SIGMA_RELS]
    srcs = [p.detach() for p in params]
    step = {"n": 0}

    def weights(t: float) -> list[float]:
        return [1.0 - float(phema.power_beta(g, t, 1.0)) for g in gammas]

    def floor() -> None:
        step["n"] += 1
        w = weights(float(step["n"] + 1))
        for e, wk in zip(floor_emas, w):
            torch._foreach_lerp_(e, srcs, wk)

    ema = PostHocEMA(model, sigma_rels=SIGMA_RELS)
    fns = {"floor": floor, "dist-ema": ema.update}

    tmp = tempfile.TemporaryDirectory(prefix="bench-update-")
    libs = {}
    try:
        import ema_pytorch

        libs["ema-pytorch"] = ema_pytorch.PostHocEMA(
            model, sigma_rels=SIGMA_RELS, update_every=1, checkpoint_every_num_steps="manual",
            checkpoint_folder=f"{tmp.name}/ema_pytorch")
        fns["ema-pytorch"] = libs["ema-pytorch"].update
    except ImportError:
        res.notes.append("ema-pytorch is not installed (pip install ema-pytorch): not compared")
    try:
        import nitrous_ema

        libs["nitrous-ema"] = nitrous_ema.PostHocEMA(
            model, sigma_rels=SIGMA_RELS, update_every=1, checkpoint_every_num_steps=10**12,
            checkpoint_folder=f"{tmp.name}/nitrous")
        fns["nitrous-ema"] = libs["nitrous-ema"].update
    except ImportError:
        res.notes.append("nitrous-ema is not installed (pip install nitrous-ema): not compared")

    # fused: dist-ema's own flat EMA views, each parameter read once for both profiles
    fused = FusedUpdate([p.views for p in ema.profiles], [p.source for p in ema.pieces])
    t_fused = {"t": 0.0}

    def fused_step() -> None:
        t_fused["t"] += 1.0
        fused(weights(t_fused["t"] + 1.0))

    t0 = time.perf_counter()
    fused_step()  # compiles (inductor caches kernels on disk: later runs are faster)
    if sync is not None:
        sync()
    compile_s = time.perf_counter() - t0
    fns["fused"] = fused_step

    # flat sources (FSDP1 / ZeRO style): one flat fp32 source, one flat EMA per profile
    flat_src = torch.cat([p.detach().reshape(-1) for p in params])
    flat_emas = [flat_src.clone() for _ in SIGMA_RELS]

    def flat_floor() -> None:
        for e, wk in zip(flat_emas, weights(float(step["n"] + 2))):
            e.lerp_(flat_src, wk)

    flat_fused = FusedUpdate([[e] for e in flat_emas], [flat_src])
    t0 = time.perf_counter()
    flat_fused(weights(2.0))
    compile_flat_s = time.perf_counter() - t0
    fns["flat floor"] = flat_floor
    fns["flat fused"] = lambda: flat_fused(weights(float(step["n"] + 2)))

    times = interleaved(fns, rounds=rounds, warmup=2, sync=sync)
    base = times["floor"]
    tab = Table("Update time per step (median of interleaved rounds); ratio = median of per-round ratios",
                ["variant", "ms / step", "vs floor", "IQR/2"])
    for name, ts in times.items():
        if name.startswith("flat"):
            continue
        tab.rows.append([name, fmt_ms(med(ts)), fmt_x(paired_ratio(ts, base)), f"{100 * spread(ts):.0f}%"])
    res.tables.append(tab)
    flat = Table("Flat source (one buffer, as FSDP1 / ZeRO partitions give): plain lerp vs fused",
                 ["variant", "ms / step", "vs flat floor", "vs per-tensor floor"])
    for name in ("flat floor", "flat fused"):
        ts = times[name]
        flat.rows.append([name, fmt_ms(med(ts)), fmt_x(paired_ratio(ts, times["flat floor"])),
                          fmt_x(paired_ratio(ts, base))])
    res.tables.append(flat)

    r_de = paired_ratio(times["dist-ema"], base)
    res.goals.append(Goal("dist-ema within 5% of the floor", fmt_x(r_de), r_de <= 1.05))
    for lib in ("ema-pytorch", "nitrous-ema"):
        if lib in times:
            r = paired_ratio(times["dist-ema"], times[lib])
            res.goals.append(Goal(f"dist-ema ahead of {lib}", f"{fmt_x(r)} of its time ({lib}: "
                                  f"{fmt_x(paired_ratio(times[lib], base))} of the floor)", r < 1.0))
    r_f = paired_ratio(times["fused"], base)
    res.goals.append(Goal("fused K-profile update beats the floor (each parameter read once: 5/6 of the bytes)",
                          fmt_x(r_f), r_f < 1.0,
                          f"{fused.compiled_runs} of {fused.runs} tensors in {fused.signatures} compiled kernel(s), "
                          f"rest foreach; first call (compile) {compile_s:.1f}s"))
    res.notes.append(
        f"fused: tensors >= 64Ki elements go through torch.compile'd kernels grouped by size (mode {fused.mode}); "
        f"flat fused compile {compile_flat_s:.1f}s. Compile times include inductor's on-disk cache when warm.")
    res.notes.append(
        "dist-ema keeps each profile as ONE flat buffer, but the sources here (plain module, and FSDP2 / DDP "
        "shards) are separate allocations, so a single flat kernel is impossible; FusedUpdate fuses per tensor "
        "instead (one loop per tensor, all profiles per loop). FSDP1 flat parameters and ZeRO fp32 partitions ARE "
        "one flat source: `kernels.coalesce` merges adjacent pieces into one run (table 2).")
    if r_de > 1.05:
        res.notes.append("profile of dist-ema update (goal missed): " + " | ".join(profile_top(ema.update)))
    res.data = {"times_s": times, "compile_s": compile_s, "fused_mode": fused.mode,
                "fused_compiled_runs": fused.compiled_runs, "runs": fused.runs}
    del libs
    tmp.cleanup()
    return res


if __name__ == "__main__":
    import json
    import sys

    r = run(quick="--quick" in sys.argv)
    print(json.dumps(r.to_json(), indent=1, default=str))
