"""Benchmark 1c: the library's default update (update_impl="auto") against the foreach floor, per model kind.

Single process, 2 tracked profiles, update_every=1, 1 thread. For each model:

- floor:        a bare ``torch._foreach_lerp_`` per profile over the same tensors (separate fp32 EMAs)
- dist-ema:     ``PostHocEMA.update()`` with the default ``update_impl="auto"``
- foreach:      ``PostHocEMA.update()`` with ``update_impl="foreach"`` (the previous default)
- ema-pytorch, nitrous-ema: their ``PostHocEMA.update()`` where installed

Models: a 12-layer transformer encoder (144 tensors), one big linear layer (16.8M elements), a convnet of
1,200 small tensors (32-9,216 elements), and a flat FSDP1 shard (a 1-rank gloo group: one flat parameter,
the layout FSDP1 and ZeRO partitions give). The compile time of the first update is reported (inductor
caches kernels on disk, so a second process compiles faster).
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
from torch import nn

from bench.common import Goal, Result, Table, fmt_ms, fmt_x, interleaved, paired_ratio
from bench.models import encoder

SIGMA_RELS = (0.05, 0.10)


def _convnet() -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(300):  # 4 tensors per block: 1,200 tensors of 32-9,216 elements
        c = 32 if i % 3 else 16
        layers += [nn.Conv2d(c, 32 if i % 3 != 2 else 16, 3, padding=1), nn.GroupNorm(4, 32 if i % 3 != 2 else 16)]
    return nn.Sequential(*layers)


def _fsdp1_flat(tmp: str) -> nn.Module:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
    net = encoder(6, 256, 1024)
    return FSDP(net, use_orig_params=False, device_id=torch.device("cpu"))


def run(quick: bool = False, threads: int = 1) -> Result:
    torch.set_num_threads(threads)
    from dist_ema import PostHocEMA, phema

    rounds = 5 if quick else 15
    res = Result("update_models", "1c. Default update vs the foreach floor, per model kind (2 profiles)")
    tmp = tempfile.TemporaryDirectory(prefix="bench-update-models-")
    models = {
        "transformer (12 layers, 144 tensors)": lambda: encoder(3 if quick else 12, 256, 1024),
        "big linear (16.8M elements)": lambda: nn.Linear(4096, 4096, bias=False),
        "convnet (1,200 small tensors)": _convnet,
        "FSDP1 flat shard (1 flat parameter)": lambda: _fsdp1_flat(tmp.name),
    }
    gammas = [float(phema.sigma_rel_to_gamma(s)) for s in SIGMA_RELS]
    tab = Table("Update time per step (median of interleaved rounds); ratio = median of per-round ratios",
                ["model", "tensors", "floor ms", "dist-ema (auto) vs floor", "foreach vs floor",
                 "ema-pytorch vs floor", "nitrous-ema vs floor", "first update (compile) s"])
    data = {}
    for name, make in models.items():
        torch.manual_seed(0)
        model = make()
        with torch.no_grad():
            srcs = [p.detach() for p in model.parameters()]
        floor_emas = [[s.clone() for s in srcs] for _ in SIGMA_RELS]
        step = {"n": 1}

        def floor(srcs=srcs, floor_emas=floor_emas, step=step) -> None:
            step["n"] += 1
            for e, g in zip(floor_emas, gammas):
                torch._foreach_lerp_(e, srcs, 1.0 - float(phema.power_beta(g, float(step["n"]), 1.0)))

        auto = PostHocEMA(model, sigma_rels=SIGMA_RELS)
        t0 = time.perf_counter()
        auto.update()
        compile_s = time.perf_counter() - t0
        fe = PostHocEMA(model, sigma_rels=SIGMA_RELS, update_impl="foreach")
        fns = {"floor": floor, "auto": auto.update, "foreach": fe.update}
        libs = {}
        for lib in ("ema_pytorch", "nitrous_ema"):
            try:
                mod = __import__(lib)
            except ImportError:
                continue
            if name.startswith("FSDP1"):
                continue  # single-GPU libraries: no FSDP1 flat parameters
            kw = {"checkpoint_every_num_steps": "manual" if lib == "ema_pytorch" else 10**12}
            libs[lib] = mod.PostHocEMA(model, sigma_rels=SIGMA_RELS, update_every=1,
                                       checkpoint_folder=os.path.join(tmp.name, lib), **kw)
            fns[lib] = libs[lib].update
        times = interleaved(fns, rounds=rounds, warmup=2)
        base = times["floor"]
        ratios = {k: paired_ratio(v, base) for k, v in times.items()}
        tab.rows.append([name, len(srcs), fmt_ms(sum(base) / len(base)), fmt_x(ratios["auto"]),
                         fmt_x(ratios["foreach"]),
                         fmt_x(ratios["ema_pytorch"]) if "ema_pytorch" in ratios else "-",
                         fmt_x(ratios["nitrous_ema"]) if "nitrous_ema" in ratios else "-", f"{compile_s:.1f}"])
        plan = auto._update_plan
        data[name] = {"ratios": ratios, "compile_s": compile_s, "runs": plan.runs, "compiled_runs": plan.compiled_runs,
                      "staged_runs": plan.staged_runs, "stages": plan.stages}
        res.goals.append(Goal(f"{name}: dist-ema <= 0.85x the floor", fmt_x(ratios["auto"]), ratios["auto"] <= 0.85,
                              f"{plan.compiled_runs} compiled run(s), {plan.staged_runs} small runs in "
                              f"{plan.stages} staging buffer(s), {plan.runs} runs after coalescing"))
        for lib in libs:
            r = paired_ratio(times["auto"], times[lib])
            res.goals.append(Goal(f"{name}: dist-ema ahead of {lib.replace('_', '-')}", f"{fmt_x(r)} of its time",
                                  r < 1.0))
        del libs, auto, fe, model
    res.tables.append(tab)
    res.data = data
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    tmp.cleanup()
    return res


if __name__ == "__main__":
    import json
    import sys

    r = run(quick="--quick" in sys.argv)
    print(json.dumps(r.to_json(), indent=1, default=str))
