"""GPU check: the tracking, update and snapshot path on a CUDA device, in one table (about 2 minutes).

Run on a machine with a GPU: ``python bench/gpu_check.py``. It prints one table:

1. FSDP2 on NCCL (world 1 in this process; with 2+ GPUs also ``torchrun`` on up to 4 of them):
   the EMA tracked on the GPU equals a brute-force float64 EMA of the full parameters;
2. host-device synchronizations in ``update()`` and ``snapshot()`` under
   ``torch.cuda.set_sync_debug_mode("error")`` (each one would raise): must be 0;
3. update time: dist-ema fused (the default) and foreach, the bare per-profile
   ``torch._foreach_lerp_`` floor, and ema-pytorch's ``PostHocEMA.update`` (when installed);
4. snapshot stall: the host time of ``snapshot()`` against a device-to-host copy of the
   same bytes into pinned memory (synchronized); and every snapshot read back equals the
   EMA of its step;
5. host-memory EMA (``offload=True``): device memory of the EMA per profile (expected 0 bytes,
   against one fp32 copy of the shard without offload), the host time of ``update()`` and the
   training step's time against a device-to-host copy of the shard (pinned, synchronized), and
   whether the offloaded EMA equals the device path's bit for bit after 20 steps (the host update
   runs the CPU's lerp, the device path CUDA's: any difference is reported in ulps).

Exits 1 if a check fails. Needs torch and dist-ema (ema-pytorch optional).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SIGMAS = (0.05, 0.10)


def _timed(fn, rounds: int = 30) -> float:
    import torch

    ts = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def fsdp2_tracking(steps: int = 12) -> dict:
    """FSDP2 on NCCL in this process group: max relative error against a brute-force float64 EMA."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from dist_ema import PostHocEMA, phema

    rank = dist.get_rank()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)]).to(dev)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    ema = PostHocEMA(model, sigma_rels=SIGMAS)
    brute: dict[float, dict[str, torch.Tensor]] = {}
    x = torch.randn(32, 512, device=dev)
    for step in range(1, steps + 1):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        full = {n: p.full_tensor().double() for n, p in model.named_parameters()}
        for g in ema.gammas:
            b = float(phema.power_beta(g, float(step), 1.0))
            old = brute.setdefault(g, {n: v.clone() for n, v in full.items()})
            for n, v in full.items():
                old[n].mul_(b).add_(v, alpha=1.0 - b)
    worst = 0.0
    for s, g in zip(SIGMAS, ema.gammas):
        got = ema.full_state_dict(sigma_rel=s)
        if rank == 0:
            for n, v in brute[g].items():
                err = (got[n].to(dev).double() - v).abs().max().item() / max(v.abs().max().item(), 1e-12)
                worst = max(worst, err)
    ema.close()
    return {"world": dist.get_world_size(), "max_rel_error": worst}


def _fsdp2_worker() -> None:
    import torch.distributed as dist

    dist.init_process_group("nccl")
    res = fsdp2_tracking()
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(res), flush=True)
    dist.destroy_process_group()


def fsdp2_rows() -> list[list]:
    import torch
    import torch.distributed as dist

    rows = []
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        r = fsdp2_tracking()
    finally:
        dist.destroy_process_group()
    rows.append(["FSDP2 (NCCL) world 1: EMA vs brute force", f"max rel. error {r['max_rel_error']:.1e}",
                 r["max_rel_error"] < 1e-5])
    n = torch.cuda.device_count()
    if n >= 2:
        world = min(4, n)
        exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
        p = subprocess.run([exe, "--standalone", f"--nproc-per-node={world}", __file__, "--fsdp2-worker"],
                           capture_output=True, text=True, timeout=240)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            rows.append([f"FSDP2 (NCCL) world {world}", f"failed: {p.stderr[-300:]}", False])
        else:
            r = json.loads(line[-1][7:])
            rows.append([f"FSDP2 (NCCL) world {world}: EMA vs brute force", f"max rel. error {r['max_rel_error']:.1e}",
                         r["max_rel_error"] < 1e-5])
    else:
        rows.append(["FSDP2 (NCCL) more ranks", "skipped: 1 GPU", True])
    return rows


def update_and_snapshot_rows() -> list[list]:
    import torch

    from dist_ema import PostHocEMA, open_store, phema

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)]).to(dev)  # 33.6M params
    params = list(model.parameters())
    rows = []
    # ---- update time: fused, foreach, the floor, ema-pytorch (interleaved rounds, medians)
    emas = {impl: PostHocEMA(model, sigma_rels=SIGMAS, update_impl=impl) for impl in ("fused", "foreach")}
    for e in emas.values():
        for _ in range(3):
            e.update()  # compile / warm up
    floor_emas = [[p.detach().clone().float() for p in params] for _ in SIGMAS]
    gammas = [float(phema.sigma_rel_to_gamma(s)) for s in SIGMAS]

    def floor() -> None:
        for g, e in zip(gammas, floor_emas):
            torch._foreach_lerp_(e, [p.detach() for p in params], 1.0 - float(phema.power_beta(g, 100.0, 1.0)))

    cands = {"dist-ema fused": emas["fused"].update, "dist-ema foreach": emas["foreach"].update, "floor": floor}
    try:
        import ema_pytorch

        ep = ema_pytorch.PostHocEMA(model, sigma_rels=SIGMAS, update_every=1, checkpoint_every_num_steps="manual",
                                    checkpoint_folder=tempfile.mkdtemp())
        cands["ema-pytorch"] = ep.update
    except ImportError:
        pass
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(5):
        for k, fn in cands.items():
            times[k].append(_timed(fn, 10))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in cands:
        if k != "floor":
            rows.append([f"update, {k} (ms; x floor)", f"{1e3 * med[k]:.3f} ms; {med[k] / med['floor']:.2f}x",
                         k != "dist-ema fused" or med[k] <= med.get("ema-pytorch", float("inf"))])
    rows.append(["update, bare foreach_lerp floor", f"{1e3 * med['floor']:.3f} ms", True])
    for e in emas.values():
        e.close()
    # ---- syncs and snapshot stall, snapshots read back
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=True)
    x = torch.randn(64, 2048, device=dev)
    with tempfile.TemporaryDirectory() as tmp:
        ema = PostHocEMA(model, sigma_rels=SIGMAS, store=f"{tmp}/s", snapshot_every=5)

        def train_step() -> None:
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=False)

        for _ in range(5):
            train_step()
            ema.update()
        ema.flush()
        syncs, stall, expected = [], [], {}
        for _ in range(30):
            train_step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                torch.cuda.set_sync_debug_mode("error")
                ema.update()  # every 5th takes a snapshot
            except RuntimeError as e:
                syncs.append(str(e)[:120])
            finally:
                torch.cuda.set_sync_debug_mode("default")
            if ema.updates % 5 == 0:
                stall.append(time.perf_counter() - t0)
                expected[ema.step] = ema.full_state_dict(sigma_rel=0.10)
        ema.close()
        nbytes = sum(p.numel() for p in params) * 4 * len(SIGMAS)
        src = torch.empty(nbytes // 4, device=dev)
        pinned = torch.empty(nbytes // 4, pin_memory=True)
        d2h = _timed(lambda: pinned.copy_(src, non_blocking=True), 10)
        store = open_store(f"{tmp}/s")
        bad = [f"{s} {n}" for s, ref in expected.items() for n, v in ref.items()
               if not torch.equal(store.read(s, 0.10, n), v.cpu())]
    rows.append(["host-device syncs in update() + snapshot()", f"{len(syncs)}" + (f" ({syncs[0]})" if syncs else ""),
                 not syncs])
    st = statistics.median(stall) if stall else float("nan")
    rows.append(["snapshot() host time vs D2H copy of its bytes (pinned, synchronized)",
                 f"{1e3 * st:.2f} ms vs {1e3 * d2h:.2f} ms ({nbytes / 2**20:.0f} MiB)", st <= d2h])
    rows.append(["snapshots read back equal the EMA of their step", f"{len(expected) - len(bad)} of {len(expected)}",
                 not bad])
    return rows


def offload_rows() -> list[list]:
    import torch

    from dist_ema import PostHocEMA

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)]).to(dev)  # 33.6M params
    numel = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=True)
    x = torch.randn(64, 2048, device=dev)

    def train_step() -> None:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    train_step()  # gradients and optimizer state exist before the memory is measured
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    host = PostHocEMA(model, sigma_rels=SIGMAS, offload=True)
    torch.cuda.synchronize()
    host_bytes = torch.cuda.memory_allocated() - base
    device = PostHocEMA(model, sigma_rels=SIGMAS)
    torch.cuda.synchronize()
    dev_bytes = torch.cuda.memory_allocated() - base - host_bytes
    rows = [["offload: EMA device memory per profile (offload=True vs False)",
             f"{host_bytes / len(SIGMAS) / 2**20:.1f} MiB vs {dev_bytes / len(SIGMAS) / 2**20:.1f} MiB "
             f"(shard {numel * 4 / 2**20:.0f} MiB fp32)", host_bytes == 0]]
    update_s = []
    for _ in range(20):
        train_step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        host.update()
        update_s.append(time.perf_counter() - t0)
        device.update()
    host.wait_update()
    torch.cuda.synchronize()
    diffs = []
    for a, b in zip(host.profiles, device.profiles):
        ia, ib = a.flat.view(torch.int32).long(), b.flat.cpu().view(torch.int32).long()
        diffs.append(int((ia - ib).abs().max()))
    rows.append(["offload: EMA after 20 steps equals the device path (max ulps)",
                 "bitwise equal" if not any(diffs) else f"max {max(diffs)} ulp apart", not any(diffs)])
    src = torch.empty(numel, device=dev)
    pinned = torch.empty(numel, pin_memory=True)
    d2h = _timed(lambda: pinned.copy_(src, non_blocking=True), 10)
    upd = statistics.median(update_s[2:])
    rows.append(["offload: update() host time vs D2H copy of the shard (pinned, synchronized)",
                 f"{1e3 * upd:.2f} ms vs {1e3 * d2h:.2f} ms ({numel * 4 / 2**20:.0f} MiB)", upd <= d2h])
    device.close()
    steps: dict[str, list[float]] = {"none": [], "device": [], "offload": []}
    for _ in range(5):  # interleaved blocks of 10 steps: no EMA, the device EMA, the host EMA
        for name, ema in (("none", None), ("device", PostHocEMA(model, sigma_rels=SIGMAS)), ("offload", host)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                train_step()
                if ema is not None:
                    ema.update()
            if ema is not None:
                ema.wait_update()
            torch.cuda.synchronize()
            steps[name].append((time.perf_counter() - t0) / 10)
            if name == "device":
                ema.close()
    med = {k: statistics.median(v) for k, v in steps.items()}
    rows.append(["offload: step time, no EMA / device EMA / offload (ms)",
                 f"{1e3 * med['none']:.2f} / {1e3 * med['device']:.2f} / {1e3 * med['offload']:.2f} "
                 f"({host.update_waits} updates waited for the previous one)", None])
    host.close()
    return rows


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu_check.py: no CUDA device here; run it on a machine with a GPU")
        return 1
    rows = [["device", f"{torch.cuda.get_device_name()}, torch {torch.__version__}", True]]
    rows += fsdp2_rows()
    rows += update_and_snapshot_rows()
    rows += offload_rows()
    w = max(len(r[0]) for r in rows)
    print(f"| {'check'.ljust(w)} | result | ok |\n|{'-' * (w + 2)}|--------|----|")
    for name, result, ok in rows:
        print(f"| {name.ljust(w)} | {result} | {'info' if ok is None else 'yes' if ok else 'NO'} |")
    return 0 if all(r[2] is not False for r in rows) else 1


if __name__ == "__main__":
    if "--fsdp2-worker" in sys.argv:
        _fsdp2_worker()
    else:
        sys.exit(main())
