"""Pipeline stages as one model: ``PostHocEMA(model_parts)``.

Under pipeline parallelism a rank holds one or more stage modules (torchtitan's ``model_parts``,
one per virtual stage; ``torch.distributed.pipelining`` splits). Each stage keeps the full model's
parameter names (the layers of other stages are deleted, not renamed), so the stages of a rank
together are a part of one model. :class:`ModelParts` shows them to the adapters as one module:
its parameters, buffers and modules are those of every stage, under their own names. It is a
view for describing shards only: it has no forward and registers nothing of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from dist_ema.errors import UsageError
from dist_ema.sharding.base import UnsupportedEngineError

__all__ = ["ModelParts", "as_model"]


class ModelParts(nn.Module):
    """Several stage modules of one model on this rank, seen as one module (names unchanged)."""

    def __init__(self, parts: Sequence[nn.Module]) -> None:
        super().__init__()
        object.__setattr__(self, "parts", list(parts))  # not registered: names stay the stages' own

    def forward(self, *args, **kwargs):  # pragma: no cover - a view, never run
        raise UsageError("ModelParts is a view of pipeline stages for dist-ema; run the stages themselves")

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True) -> Iterator:
        seen: set[int] = set() if memo is None else memo
        for part in self.parts:
            for name, mod in part.named_modules(prefix=prefix):
                if remove_duplicate and id(mod) in seen:
                    continue
                seen.add(id(mod))
                yield name, mod

    def modules(self) -> Iterator[nn.Module]:
        for _, mod in self.named_modules():
            yield mod

    def children(self) -> Iterator[nn.Module]:
        yield from self.parts

    def named_children(self) -> Iterator:
        for i, part in enumerate(self.parts):
            yield str(i), part

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator:
        seen: set[int] = set()
        for part in self.parts:
            for name, p in part.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate):
                if remove_duplicate and id(p) in seen:
                    continue
                seen.add(id(p))
                yield name, p

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator:
        seen: set[int] = set()
        for part in self.parts:
            for name, b in part.named_buffers(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate):
                if remove_duplicate and id(b) in seen:
                    continue
                seen.add(id(b))
                yield name, b

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def register_load_state_dict_post_hook(self, hook):
        handles = [part.register_load_state_dict_post_hook(hook) for part in self.parts]

        class _Handles:
            def remove(self) -> None:
                for h in handles:
                    h.remove()

        return _Handles()


def as_model(model_or_parts: object) -> object:
    """A list or tuple of stage modules as one :class:`ModelParts`; anything else unchanged."""
    if isinstance(model_or_parts, (list, tuple)):
        parts = list(model_or_parts)
        if not parts or not all(isinstance(p, nn.Module) for p in parts):
            raise UnsupportedEngineError(
                f"a list of model parts must hold nn.Modules (pipeline stages), got "
                f"{[type(p).__name__ for p in parts][:4]}; pass one module, an engine, or the stages' modules"
            )
        if len(parts) == 1:
            return parts[0]
        names: dict[str, int] = {}
        for i, part in enumerate(parts):
            for name, _ in part.named_parameters():
                if name in names:
                    raise UnsupportedEngineError(
                        f"parameter {name!r} is in model part {names[name]} and in part {i}: pipeline stages "
                        "must keep the full model's parameter names, each parameter in one stage of a rank"
                    )
                names[name] = i
        return ModelParts(parts)
    return model_or_parts
