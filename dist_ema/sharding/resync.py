"""Re-synchronize replicated working weights after each rank wrote only the range it owns.

Under plain/DDP models and DeepSpeed ZeRO-1/2 every rank holds the *full* working
weights but owns (averages, swaps in) only a disjoint slice of each parameter. After a
swap each rank has written its own slices; one all-gather gives every rank the others'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from dist_ema.sharding.base import ShardPiece

__all__ = ["make_replicated_resync"]


def make_replicated_resync(
    full_params: dict[str, torch.Tensor], pieces: Sequence[ShardPiece], group: object | None = None
) -> Callable[[], None] | None:
    """Return a callable that fills every rank's full params from the owners' slices.

    ``full_params``: {fqn: full working parameter} on this rank (same names as the pieces).
    The callable writes into exactly these tensors: after a load that replaced them
    (``load_state_dict(..., assign=True)``) build a new one (``ShardLayout.refresh`` does).
    Building runs no collective; the first call exchanges every rank's owned ranges once
    (all ranks call it together, as ``PostHocEMA.swapped`` does).
    Returns None in a single process (nothing to synchronize).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return None
    flat = {k: v.detach().view(-1) for k, v in full_params.items()}
    mine = [(p.fqn, p.flat_start, p.numel) for p in pieces if p.owner]
    missing = sorted({fqn for fqn, _, _ in mine} - set(flat))
    if missing:
        raise ValueError(f"resync: shard pieces name parameters the model does not have: {missing[:5]}")
    ws = dist.get_world_size(group)
    me = dist.get_rank(group)
    everyone: list = []  # every rank's owned ranges, exchanged at the first call

    @torch.no_grad()
    def resync() -> None:
        if not everyone:
            gathered: list = [None] * ws
            dist.all_gather_object(gathered, mine, group=group)  # once: the layout does not change
            everyone.extend(gathered)
        sizes = [sum(n for _, _, n in ranges) for ranges in everyone]
        width = max(sizes) if sizes else 0
        if width == 0:
            return
        some = next(iter(flat.values()))
        buf = torch.zeros(width, dtype=torch.float32, device=some.device)
        if mine:
            torch.cat([flat[f][s : s + n].float() for f, s, n in mine], out=buf[: sizes[me]])
        out = [torch.empty_like(buf) for _ in range(ws)]
        dist.all_gather(out, buf, group=group)
        for r, ranges in enumerate(everyone):
            if r == me:
                continue
            off = 0
            for f, s, n in ranges:
                flat[f][s : s + n].copy_(out[r][off : off + n])
                off += n

    return resync
