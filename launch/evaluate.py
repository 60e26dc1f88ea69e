#!/usr/bin/env python
"""Evaluate synthesized EMAs (and the raw weights) of launch/train.py on the held-out digits.

    python launch/evaluate.py --synth runs/demo/synth --raw runs/demo/final.safetensors \
        --store runs/demo/snapshots --plot out/demo_loss_vs_sigma_rel.png

``--synth`` is the output directory of ``dist-ema synthesize`` (safetensors format): it
holds ``synthesis.json`` and one ``sigma_rel-<s>/model.safetensors`` per target. Each file
is loaded with ``safetensors`` into an ordinary, unsharded ``DigitsMLP``: no dist-ema
needed to use a synthesized EMA. Local paths and fsspec URLs (``s3://...``) both work.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # launch/: the model and data live in train.py
from train import HELD_OUT, DigitsMLP, evaluate, load_digits_split  # noqa: E402

log = logging.getLogger("dist_ema")


@dataclass
class Row:
    """One evaluated set of weights."""

    name: str  # "raw weights" or "sigma_rel=0.100"
    sigma_rel: float | None  # None for the raw weights
    error: float | None  # relative L2 reconstruction error of the profile (None: raw weights)
    loss: float  # held-out mean cross-entropy (nats)
    accuracy: float  # held-out accuracy, 0..1
    tracked: bool = False  # a profile tracked during training (not only synthesized)


def _read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    if "://" not in url or url.startswith("file://"):
        return Path(url.removeprefix("file://")).read_bytes()
    import fsspec

    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        return f.read()


def load_weights(url: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file (local path or fsspec URL) as a state dict of fp32 tensors."""
    from safetensors.torch import load

    return {k: v.float() for k, v in load(_read_bytes(url, storage_options)).items()}


def model_from_weights(sd: dict[str, torch.Tensor]) -> DigitsMLP:
    """An ordinary DigitsMLP holding ``sd`` (width read from the weights); strict: every key must match."""
    if "fc1.weight" not in sd:
        raise ValueError(f"not DigitsMLP weights (keys: {sorted(sd)[:6]}); was the run made with launch/train.py?")
    model = DigitsMLP(hidden=sd["fc1.weight"].shape[0])
    model.load_state_dict(sd, strict=True)
    return model.eval()


def evaluate_weights(sd: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(held-out loss, accuracy) of a state dict in a plain model."""
    return evaluate(model_from_weights(sd), x, y)


def read_synthesis(out: str, storage_options: dict | None = None) -> list[dict]:
    """Targets of a safetensors synthesis output: sigma_rel, error, t and the file of each."""
    base = out.rstrip("/")
    try:
        doc = json.loads(_read_bytes(f"{base}/synthesis.json", storage_options))
    except FileNotFoundError:
        raise ValueError(f"{base} has no synthesis.json: pass the --out directory of "
                         f"'dist-ema synthesize ... --format safetensors'") from None
    targets = []
    for tg in doc["targets"]:
        folder = f"sigma_rel-{tg['sigma_rel']:.4f}"
        names = doc["files"][folder]
        if len(names) != 1:  # sharded export (models > max_file_bytes): not the case for this small model
            raise ValueError(f"{base}/{folder} holds {len(names)} files; this example expects one per target")
        targets.append({**tg, "file": f"{base}/{folder}/{names[0]}"})
    return targets


def tracked_sigma_rels(store: str, storage_options: dict | None = None) -> tuple[float, ...]:
    """The profiles tracked in training, from the newest snapshot of the store."""
    from dist_ema import open_store

    snaps = open_store(store, storage_options).snapshots()
    return tuple(snaps[-1].sigma_rels) if snaps else ()


def evaluate_run(synth: str, raw: str | None = None, store: str | None = None,
                 storage_options: dict | None = None) -> list[Row]:
    """Rows for the raw weights (when given) and every synthesized target, in sigma_rel order."""
    x, y = load_digits_split("heldout")
    tracked = tracked_sigma_rels(store, storage_options) if store else ()
    rows = []
    if raw:
        rows.append(Row("raw weights", None, None, *evaluate_weights(load_weights(raw, storage_options), x, y)))
    for tg in sorted(read_synthesis(synth, storage_options), key=lambda d: d["sigma_rel"]):
        s = float(tg["sigma_rel"])
        loss, acc = evaluate_weights(load_weights(tg["file"], storage_options), x, y)
        rows.append(Row(f"sigma_rel={s:.3f}", s, float(tg["error"]), loss, acc,
                        tracked=any(math.isclose(s, t, rel_tol=1e-6) for t in tracked)))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """The demo's table: one line per evaluated set of weights, the best synthesized EMA marked."""
    synth = [r for r in rows if r.sigma_rel is not None]
    best = min(synth, key=lambda r: r.loss) if synth else None
    lines = [f"{'weights':<14} {'tracked':>7} {'recon. error':>12} {'held-out loss':>13} {'accuracy':>8}",
             f"{'-' * 14} {'-' * 7} {'-' * 12} {'-' * 13} {'-' * 8}"]
    for r in rows:
        err = "-" if r.error is None else f"{100 * r.error:.2f}%"
        mark = "  <- best" if r is best else ""
        lines.append(f"{r.name:<14} {'yes' if r.tracked else '':>7} {err:>12} {r.loss:>13.4f} "
                     f"{100 * r.accuracy:>7.2f}%{mark}")
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: str, title: str = "") -> None:
    """Held-out loss against sigma_rel (tracked profiles marked, raw weights as a horizontal line) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    synth = [r for r in rows if r.sigma_rel is not None]
    raw = [r for r in rows if r.sigma_rel is None]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([r.sigma_rel for r in synth], [r.loss for r in synth], "o-", color="C0",
            label="synthesized post-hoc EMA")
    tr = [r for r in synth if r.tracked]
    if tr:
        ax.plot([r.sigma_rel for r in tr], [r.loss for r in tr], "*", ms=16, color="C1", zorder=3,
                label="tracked in training")
    if raw:
        ax.axhline(raw[0].loss, color="C3", ls="--", label=f"raw final weights ({raw[0].loss:.3f})")
    if synth:
        best = min(synth, key=lambda r: r.loss)
        right = best.sigma_rel > (synth[0].sigma_rel + synth[-1].sigma_rel) / 2
        ax.annotate(f"best: sigma_rel={best.sigma_rel:g}\nloss {best.loss:.3f}", (best.sigma_rel, best.loss),
                    textcoords="offset points", xytext=(-90 if right else 10, 28), fontsize=8,
                    arrowprops={"arrowstyle": "->", "lw": 0.8})
    losses = [r.loss for r in rows if math.isfinite(r.loss) and r.loss > 0]
    if losses and max(losses) > 2 * min(losses):
        ax.set_yscale("log")  # the raw weights can be far above the EMAs: keep the EMA curve's shape visible
        from matplotlib.ticker import FormatStrFormatter

        ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
    ax.set_xlabel("sigma_rel (EMA length relative to training time)")
    ax.set_ylabel(f"held-out cross-entropy ({HELD_OUT} digits)")
    ax.set_title(title or "Post-hoc EMA: held-out loss against sigma_rel", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synth", required=True, help="output directory of 'dist-ema synthesize' (safetensors)")
    p.add_argument("--raw", help="raw final weights (launch/train.py --save-final)")
    p.add_argument("--store", help="the run's snapshot store, to mark the tracked profiles")
    p.add_argument("--storage-options", type=json.loads, default=None, metavar="JSON", help="fsspec options")
    p.add_argument("--plot", metavar="FILE.png", help="write held-out loss against sigma_rel")
    p.add_argument("--json", metavar="FILE.json", help="write the rows as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = evaluate_run(args.synth, args.raw, args.store, args.storage_options)
    print(format_table(rows))
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
