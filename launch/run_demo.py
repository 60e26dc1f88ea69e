#!/usr/bin/env python
"""The end-to-end demo: train on 2 ranks with snapshots, synthesize a sigma_rel sweep, evaluate, plot.

    python launch/run_demo.py                      # what launch/demo.sh runs
    python launch/run_demo.py --steps 200 --nproc 2 --sigma-rels 0.05 0.1 0.2
    python launch/run_demo.py --store s3://bucket/demo/snapshots   # the same flow against S3

Three real launches, each printed before it runs, so the demo doubles as a recipe:

1. ``torchrun --nproc-per-node 2 launch/train.py`` (FSDP2, gloo on CPU) trains for 300 steps at
   a high learning rate (0.05), writes a snapshot of the tracked profiles (sigma_rel 0.05 and
   0.10, configs/demo.toml) every 25 steps into a store, and the final raw weights to a
   safetensors file;
2. ``torchrun --nproc-per-node 2 -m dist_ema synthesize`` reconstructs the EMA for every
   sigma_rel of the sweep from those snapshots, after training, without retraining;
3. every synthesized EMA and the raw weights are loaded into an ordinary model and evaluated
   on 360 held-out digits; the table is printed and the loss is plotted against sigma_rel.

The demo's settings (DEMO_STEPS, DEMO_LR, SWEEP) are chosen so that the high learning rate
keeps the raw weights jumping around an optimum that the model reaches early in the run:
averaging over longer than either tracked profile then pays, so the best sigma_rel is one that
was never tracked, found after training.
Model init, data order and batches are fixed by the seed. The high learning rate also makes
the run chaotic: a last-bit difference in one kernel (AVX2 against AVX-512 reductions, another
matrix-multiply kernel) grows into other figures within a few hundred steps. So on the CPU the
demo pins the kernels (PINNED_KERNELS, set for every launch and the evaluation unless already
in the environment): ATen's baseline kernels instead of the fastest ones for this CPU, MKL's
reproducible mode and one thread per rank. The figures then do not depend on which vector
instructions an x86-64 CPU has; ``--native-kernels`` runs this CPU's fastest kernels instead
(its figures repeat only on the same CPU). Both need the same torch build; GPUs print others.

Each run starts from a clean run directory: the previous demo run in it is removed first (a
directory the demo did not create is never touched; pick another --run-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from evaluate import Row, evaluate_run, format_table, plot  # noqa: E402

MARKER = ".dist-ema-demo"  # written into the run directory; only such directories are cleared
SWEEP = (0.03, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20, 0.24)  # synthesized after training (0.24: recon. error < 10%)
DEMO_STEPS = 300  # 12 snapshots at the config's snapshot_every = 25
DEMO_LR = 0.05  # AdamW; high on purpose: the raw weights jump around the optimum
# ATen's kernels for CPUs without AVX (which every x86-64 CPU runs alike), MKL's conditional numerical
# reproducibility on its code path for any x86-64 CPU, and single-threaded ranks (no thread-dependent reduction order)
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_run_dir(run_dir: Path) -> None:
    """Empty ``run_dir`` if an earlier demo made it; refuse to touch any other existing directory."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / MARKER).exists():
            raise SystemExit(f"run_demo: {run_dir} exists and was not made by the demo; remove it yourself or "
                             f"pass --run-dir to a new directory")
        print(f"== removing the previous demo run in {run_dir}")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text("made by launch/run_demo.py; the next demo run deletes this directory\n")


def pin_kernels() -> str:
    """Set PINNED_KERNELS in this process's environment (launches inherit it); values already set are kept.

    Takes effect in this process too: ATen and MKL read these at their first computation, not at import.
    """
    for key, value in PINNED_KERNELS.items():
        os.environ.setdefault(key, value)
    return " ".join(f"{key}={os.environ[key]}" for key in PINNED_KERNELS)


def run(step: str, cmd: list[str], timeout: float) -> None:
    """Run one launch with its output shown live; SystemExit naming the step when it fails."""
    print(f"\n== {step}\n$ {shlex.join(cmd)}", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        r = subprocess.run(cmd, cwd=str(ROOT), env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"run_demo: {step} did not finish within {timeout:.0f} s") from None
    if r.returncode != 0:
        raise SystemExit(f"run_demo: {step} failed (exit code {r.returncode}); its output is above")


def torchrun(nproc: int) -> list[str]:
    # python -m torch.distributed.run is the torchrun command, without relying on PATH
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}"]


def summary(best: Row, raw: Row, tracked: list[Row]) -> str:
    """The table in words: the best sigma_rel (tracked or not) against the best tracked one and the raw weights."""
    def vs(other: Row) -> str:
        return f"{100 * (best.loss / other.loss - 1):+.0f}%"

    kind = "tracked in training" if best.tracked else "never tracked: synthesized after training"
    lines = [f"best synthesized EMA: sigma_rel={best.sigma_rel:g} ({kind}), held-out loss {best.loss:.4f}"]
    top = min(tracked, key=lambda r: r.loss) if tracked else None
    if top is not None and top is not best:
        lines.append(f"  {vs(top)} vs the best tracked profile (sigma_rel={top.sigma_rel:g}, {top.loss:.4f})")
    lines.append(f"  {vs(raw)} vs the raw final weights ({raw.loss:.4f})")
    if best.loss >= raw.loss:
        lines.append("note: no synthesized EMA beat the raw weights in this run (try more --steps)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-dir", default="runs/demo", help="where the run's files go (cleared at the start)")
    p.add_argument("--out", default="out", help="directory of the plot and the results JSON")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.toml"), help="train + dist-ema config")
    p.add_argument("--engine", default="fsdp2", help="training engine (fsdp2, fsdp1, ddp, zero1, zero2, zero3)")
    p.add_argument("--nproc", type=int, default=2, help="ranks for training and for synthesis")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help="training steps")
    p.add_argument("--lr", type=float, default=DEMO_LR, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=None, help="model init and data order (default: the config's)")
    p.add_argument("--sigma-rels", type=float, nargs="+", default=list(SWEEP), help="sigma_rels to synthesize")
    p.add_argument("--store", default=None, help="snapshot store URL (default: <run-dir>/snapshots; s3://... works)")
    p.add_argument("--synth-out", default=None, help="synthesis output (default: next to the store, .../synth)")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed for each launch")
    p.add_argument("--native-kernels", action="store_true",
                   help="this CPU's fastest kernels instead of PINNED_KERNELS (figures then vary between CPUs)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    if not args.native_kernels:
        print(f"== CPU kernels pinned, for the same figures on any x86-64 CPU: {pin_kernels()}", flush=True)
    run_dir = Path(args.run_dir)
    fresh_run_dir(run_dir)
    store = args.store or str(run_dir / "snapshots")
    synth = args.synth_out or (store.rstrip("/").rsplit("/", 1)[0] + "/synth" if args.store else str(run_dir / "synth"))
    final = str(run_dir / "final.safetensors")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train = [*torchrun(args.nproc), "launch/train.py", "--config", args.config, "--engine", args.engine,
             "--store", store, "--save-final", final, "--steps", str(args.steps), "--lr", f"{args.lr:g}"]
    if args.seed is not None:
        train += ["--seed", str(args.seed)]
    run(f"1/3 train on {args.nproc} ranks ({args.engine}), snapshots in {store}", train, args.timeout)

    sweep = [f"{s:g}" for s in args.sigma_rels]
    run(f"2/3 synthesize {len(sweep)} sigma_rels on {args.nproc} ranks from the snapshots",
        [*torchrun(args.nproc), "-m", "dist_ema", "synthesize", store, "--sigma-rel", *sweep, "--out", synth,
         "--no-progress"], args.timeout)

    print("\n== 3/3 evaluate the raw weights and each synthesized EMA on held-out digits\n", flush=True)
    rows = evaluate_run(synth, raw=final, store=store)
    table = format_table(rows)
    png = out / "demo_loss_vs_sigma_rel.png"
    raw = next(r for r in rows if r.sigma_rel is None)
    best = min((r for r in rows if r.sigma_rel is not None), key=lambda r: r.loss)
    tracked = [r for r in rows if r.tracked]
    plot(rows, str(png), title=f"Post-hoc EMA of an MLP on 8x8 digits ({args.engine}, {args.nproc} ranks)")
    (out / "demo_results.json").write_text(json.dumps(
        {"rows": [asdict(r) for r in rows], "store": store, "synth": synth, "raw": final,
         "seconds": time.perf_counter() - t0}, indent=1))
    print(table)
    print("\n" + summary(best, raw, tracked))
    print(f"plot: {png}\nresults: {out / 'demo_results.json'}\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
