"""GPU check: the update and snapshot path on a CUDA device, with no host-device synchronization.

Run on a machine with a GPU: ``python bench/gpu_check.py`` (about a minute). It checks

1. ``update()`` (fused default) and ``snapshot()`` raise nothing under
   ``torch.cuda.set_sync_debug_mode("error")`` (a host-device sync would raise);
2. every snapshot written while training holds exactly the EMA of its step (read back from the store);
3. the host time of ``snapshot()`` against ``update()`` (the copy runs on a side stream).

Prints one JSON object; exits 1 if a check fails. Needs nothing but torch and dist-ema.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "no CUDA device"}))
        return 1
    from dist_ema import PostHocEMA, open_store

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)]).to(dev)  # 33.6M params
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=True)
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ema = PostHocEMA(model, sigma_rels=(0.05, 0.10), store=f"{tmp}/s", snapshot_every=5)
        x = torch.randn(64, 2048, device=dev)

        def train_step() -> None:
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=False)

        for _ in range(3):  # warm-up: compile of the fused kernels, first snapshot
            train_step()
            ema.update()
        ema.flush()
        expected, t_update, t_snap, errors = {}, [], [], []
        for _ in range(30):
            train_step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                torch.cuda.set_sync_debug_mode("error")
                applied = ema.update()
            except RuntimeError as e:
                errors.append(f"update(): {e}")
                applied = False
            finally:
                torch.cuda.set_sync_debug_mode("default")
            dt = time.perf_counter() - t0
            (t_snap if ema.updates % 5 == 0 else t_update).append(dt)
            if applied and ema.updates % 5 == 0:
                expected[ema.step] = ema.full_state_dict(sigma_rel=0.10)
        ema.close()
        store = open_store(f"{tmp}/s")
        mismatch = []
        for step, ref in expected.items():
            for name, v in ref.items():
                got = store.read(step, 0.10, name)
                if not torch.equal(got, v.cpu()):
                    mismatch.append(f"step {step} {name}")
        out["checks"]["no host-device sync in update()/snapshot()"] = errors[:3] or "ok"
        out["checks"]["snapshots equal the EMA of their step"] = mismatch[:3] or f"ok ({len(expected)} snapshots)"
        out["update_ms"] = round(1e3 * statistics.median(t_update), 3)
        out["update_with_snapshot_ms"] = round(1e3 * statistics.median(t_snap), 3) if t_snap else None
        out["ok"] = not errors and not mismatch
    print(json.dumps(out, indent=1))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
