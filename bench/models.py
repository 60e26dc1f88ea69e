"""Models the benchmarks use: a transformer encoder stack, and a bag of big tensors for I/O."""

from __future__ import annotations

import math

import torch
from torch import nn


def encoder(layers: int, width: int, ff: int, seed: int = 0) -> nn.Module:
    """``layers`` x nn.TransformerEncoderLayer: 12 tensors per layer (288 for 24 layers)."""
    torch.manual_seed(seed)
    heads = max(1, width // 64)
    return nn.Sequential(*[nn.TransformerEncoderLayer(width, heads, ff, dropout=0.0, batch_first=True)
                           for _ in range(layers)])


def describe(model: nn.Module) -> dict:
    ps = list(model.parameters())
    return {"tensors": len(ps), "params_m": round(sum(p.numel() for p in ps) / 1e6, 2),
            "fp32_mib_per_profile": round(sum(p.numel() for p in ps) * 4 / 2**20, 1)}


class Bag(nn.Module):
    """``numel`` parameters split into ``tensors`` 2-d matrices (plus a small bias): for store benchmarks."""

    def __init__(self, numel: int, tensors: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        cols = 1024
        rows = max(1, math.ceil(numel / tensors / cols))
        self.w = nn.ParameterList([nn.Parameter(torch.randn(rows, cols, generator=g)) for _ in range(tensors)])
        self.b = nn.Parameter(torch.zeros(cols))

    def perturb(self, step: int) -> None:
        with torch.no_grad():
            for p in self.w:
                p.mul_(0.999).add_(1e-3 * (step % 7))
