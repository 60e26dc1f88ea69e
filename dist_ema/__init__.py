"""dist-ema: post-hoc EMA (Karras et al., EDM2) for sharded training under FSDP and DeepSpeed ZeRO.

    from dist_ema import PostHocEMA, open_store, synthesize

Heavy parts (torch, zarr) are imported on first use, so ``import dist_ema`` stays light.
"""

from __future__ import annotations

from typing import Any

from dist_ema.phema import gamma_to_sigma_rel, sigma_rel_to_gamma, solve_coefficients

__version__ = "0.1.0"

__all__ = [
    "DistEMAError",
    "ModelChangedError",
    "PostHocEMA",
    "StoreError",
    "__version__",
    "export_peft",
    "gamma_to_sigma_rel",
    "import_run",
    "load_synthesized",
    "open_store",
    "sigma_rel_to_gamma",
    "solve_coefficients",
    "synthesize",
]

_LAZY = {
    "PostHocEMA": ("dist_ema.tracker", "PostHocEMA"),
    "open_store": ("dist_ema.store.reader", "open_store"),
    "StoreError": ("dist_ema.store.fs", "StoreError"),
    "DistEMAError": ("dist_ema.errors", "DistEMAError"),
    "ModelChangedError": ("dist_ema.sharding.watch", "ModelChangedError"),
    "synthesize": ("dist_ema.synthesis", "synthesize"),
    "load_synthesized": ("dist_ema.load", "load_synthesized"),
    "import_run": ("dist_ema.importers", "import_run"),
    "export_peft": ("dist_ema.adapters", "export_peft"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'dist_ema' has no attribute {name!r}")
