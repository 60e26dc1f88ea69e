"""Run the dist-ema benchmark suite: ``python bench/run.py [--quick] [--only NAME[,NAME...]]``.

Writes ``bench/results/latest.json`` and ``bench/results/latest.md`` (one table per
benchmark, ratios against baselines measured in the same run, goals met or missed).
``--quick`` runs tiny sizes as a smoke test (< 2 minutes) and writes ``quick.json`` /
``quick.md`` instead. ``--only`` runs some benchmarks and merges them into the existing
results file (each benchmark records when it ran and the machine's load).

Benchmarks: update, update_gpu (run by default when CUDA is available), sharded, train, snapshot,
synthesis, solver, scale, many, offload.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NAMES = ("update", "update_models", "update_gpu", "sharded", "train", "snapshot", "synthesis", "solver", "scale",
         "many", "offload")


def _run_one(name: str, quick: bool, threads: int, context: dict):
    from bench import scale, sharded, snapshot, solver, synthesis, train, update

    if name == "update":
        return update.run(quick, threads)
    if name == "update_models":
        from bench import update_models

        return update_models.run(quick, threads)
    if name == "update_gpu":
        return update.run(quick, threads, device="cuda")
    if name == "sharded":
        return sharded.run(quick, threads)
    if name == "train":
        return train.run(quick, threads)
    if name == "snapshot":
        return snapshot.run(quick, threads)
    if name == "synthesis":
        return synthesis.run(quick, threads)
    if name == "solver":
        return solver.run(quick, threads)
    if name == "scale":
        return scale.run(quick, context)
    if name == "many":
        from bench import many

        return many.run(quick, threads)
    if name == "offload":
        from bench import offload

        return offload.run(quick, threads)
    raise ValueError(name)


def _cell(v) -> str:
    return str(v).replace("|", "\\|")


def render_md(doc: dict) -> str:
    m = doc["machine"]
    out = [f"## Benchmarks ({'quick smoke run' if doc['quick'] else 'full run'})", "",
           f"Command: `{doc['command']}`. Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
           f"{'GPU ' + m['gpu'] if m['gpu'] else 'no GPU'}; Python {m['python']}, torch {m['torch']}, "
           f"zarr {m['zarr']}, ema-pytorch {m['ema_pytorch']}, nitrous-ema {m['nitrous_ema']}. "
           f"{doc['threads']} compute thread(s) per process. The machine is shared with other jobs (1-min load "
           f"average {m['load_avg_1m_at_start']} at start, {doc['load_avg_1m_at_end']} at end): every figure is a "
           f"median of interleaved repetitions and every ratio is against a baseline measured in the same run.", ""]
    goals = [(r["title"], g) for r in doc["results"] for g in r["goals"] if g["met"] is not None]
    if goals:
        out += ["| benchmark | goal | result | met |", "| --- | --- | --- | --- |"]
        for title, g in goals:
            out.append(f"| {_cell(title.split(' (', 1)[0].split(':', 1)[0])} | {_cell(g['goal'])} | "
                       f"{_cell(g['value'])} | "
                       f"{'yes' if g['met'] else '**no**'} |")
        out.append("")
    for r in doc["results"]:
        out += [f"### {r['title']}", ""]
        if r.get("error"):
            out += ["```", r["error"].strip()[-2000:], "```", ""]
            continue
        cfg = ", ".join(f"{k} {v}" for k, v in r["config"].items())
        out += [f"Setup: {cfg}. Took {r['seconds']:.0f} s." if cfg else f"Took {r['seconds']:.0f} s.", ""]
        for t in r["tables"]:
            out += [f"{t['title']}:", "", "| " + " | ".join(map(_cell, t["columns"])) + " |",
                    "|" + " --- |" * len(t["columns"])]
            for row in t["rows"]:
                out.append("| " + " | ".join(_cell(c) for c in row) + " |")
            out.append("")
        if r["goals"]:
            out += ["| goal | result | met | why / evidence |", "| --- | --- | --- | --- |"]
            for g in r["goals"]:
                met = "info" if g["met"] is None else ("yes" if g["met"] else "**no**")
                out.append(f"| {_cell(g['goal'])} | {_cell(g['value'])} | {met} | {_cell(g['why'])} |")
            out.append("")
        for n in r["notes"]:
            out.append(f"- {n}")
        if r["notes"]:
            out.append("")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in under 2 minutes")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(NAMES)}")
    p.add_argument("--threads", type=int, default=1,
                   help="compute threads per process (default 1: the machine is shared, 2 threads per process "
                        "turn other jobs' load into noise)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results directory")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # before torch is imported
    import torch

    # the GPU variant of the update benchmark runs by default when a GPU exists
    default = tuple(n for n in NAMES if n != "update_gpu" or torch.cuda.is_available())
    names = default if args.only is None else tuple(n.strip() for n in args.only.split(",") if n.strip())
    bad = [n for n in names if n not in NAMES]
    if bad:
        p.error(f"unknown benchmark(s) {bad}; choose from {', '.join(NAMES)}")
    from bench.common import machine

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "latest"
    doc = {"command": "python bench/run.py" + (" --quick" if args.quick else "")
           + (f" --only {args.only}" if args.only else "") + (f" --threads {args.threads}" if args.threads != 1
                                                                else ""),
           "quick": args.quick, "threads": args.threads, "machine": machine(), "results": []}
    previous = {}
    if args.only and (out_dir / f"{stem}.json").exists():
        previous = {r["name"]: r for r in json.loads((out_dir / f"{stem}.json").read_text())["results"]}
    context: dict = {}
    t_all = time.perf_counter()
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            res = _run_one(name, args.quick, args.threads, context)
        except Exception:  # noqa: BLE001 - one failed benchmark must not lose the others
            from bench.common import Result

            res = Result(name, name, error=traceback.format_exc())
        res.seconds = time.perf_counter() - t0
        if name == "train" and not res.error:
            context["train"] = res.data
        rec = res.to_json()
        rec["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
        rec["load_avg_1m"] = round(os.getloadavg()[0], 2)
        previous[name] = rec
        status = "ERROR" if res.error else ", ".join(
            f"{g.goal[:40]}: {g.value} ({'met' if g.met else 'MISSED' if g.met is False else 'info'})"
            for g in res.goals)
        print(f"[bench] {name}: {res.seconds:.0f}s; {status}", flush=True)
        if res.error:
            print(res.error, file=sys.stderr)
    doc["results"] = [previous[n] for n in NAMES if n in previous]
    doc["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    doc["seconds"] = round(time.perf_counter() - t_all, 1)
    tmp = out_dir / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(out_dir / f"{stem}.json")
    (out_dir / f"{stem}.md").write_text(render_md(doc))
    print(render_md(doc))
    print(f"[bench] wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')} in {doc['seconds']:.0f}s")
    return 1 if any(r.get("error") for r in doc["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
