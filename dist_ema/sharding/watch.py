"""Tell, cheaply and before every EMA update, whether the model moved away from the EMA's views.

The EMA keeps 1-d views of the tensors the engine adapters listed (``ShardPiece.source``). A
model that is later converted (``model.double()``, ``model.to(dtype or device)``), whose
``param.data`` is replaced, that gets a new submodule (a new head), or whose frozen layer is
unfrozen while only trainable parameters are tracked goes on training other tensors, and the
EMA would silently keep averaging the old ones.

:class:`ModelWatch` records a fingerprint of the model once and compares it with a few
C-level ``map`` passes over cached lists (no module-tree walk, no tensor operation, no sync):

* module tree: the size of every module's ``_modules`` / ``_parameters`` / ``_buffers`` dict and
  the identity of every child module and buffer (a replaced or added submodule, a new buffer);
* parameter objects: the identity of every registered parameter (not under FSDP2, which swaps
  sharded and unsharded parameters in and out of its modules around forward);
* storages: the ``data_ptr`` of what each piece was cut from (the parameter itself for
  plain/DDP models, the DTensor's local shard under FSDP2, the flat parameter's local shard
  under FSDP1; none under DeepSpeed, whose fp32 partitions live in the optimizer);
* ``requires_grad`` of every parameter (a layer unfrozen with ``include_frozen=False``).

Why ``data_ptr`` alone catches dtype and device changes: the EMA's views keep the old storages
alive, so a new storage can never be allocated at the old address.

When :meth:`ModelWatch.changed` is true, :func:`param_table` (a full walk) tells what changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from operator import attrgetter

import torch
from torch import nn

from dist_ema.errors import DistEMAError
from dist_ema.sharding.replicated import clean_fqn, unwrap_ddp

__all__ = ["ModelChangedError", "ModelWatch", "ParamInfo", "engine_module", "param_table"]

_requires_grad = attrgetter("requires_grad")
_local_tensor = attrgetter("_local_tensor")


class ModelChangedError(DistEMAError, RuntimeError):
    """The model's tracked parameters changed (added, removed, replaced or newly trainable) after the EMA was made."""


@dataclass(frozen=True)
class ParamInfo:
    """One registered parameter of the model, as a full walk sees it."""

    owner: int  # id() of the module that registers it: a new id means a replaced submodule
    requires_grad: bool
    flat: bool  # an FSDP1 FlatParameter (its requires_grad covers many parameters)


def engine_module(model_or_engine: object) -> nn.Module | None:
    """The user's module inside a DeepSpeed engine, DDP or ``torch.compile`` wrapper; None if there is none.

    FSDP1 units stay wrapped: their names are cleaned (``clean_fqn``) instead.
    """
    from dist_ema.sharding.deepspeed import is_deepspeed_engine

    inner = model_or_engine.module if is_deepspeed_engine(model_or_engine) else model_or_engine
    return unwrap_ddp(inner) if isinstance(inner, nn.Module) else None


def param_table(module: nn.Module) -> dict[str, ParamInfo]:
    """Every registered parameter of ``module`` by clean name (a full walk: only when something changed)."""
    out: dict[str, ParamInfo] = {}
    for prefix, mod in module.named_modules():
        for key, p in mod._parameters.items():
            if p is None:
                continue
            name = clean_fqn(f"{prefix}.{key}" if prefix else key)
            out.setdefault(name, ParamInfo(id(mod), bool(p.requires_grad), bool(getattr(p, "_is_flat_param", False))))
    return out


def _dicts(module: nn.Module) -> Iterator[dict]:
    for mod in module.modules():
        yield mod._modules
        yield mod._parameters
        yield mod._buffers


class ModelWatch:
    """A fingerprint of the model the EMA's views were cut from; :meth:`changed` costs a few ``map`` passes.

    Build it right after the layout (and again after every re-list). ``engine`` is the layout's
    engine name; ``tracked`` the names the EMA tracks (``layout.params``).
    """

    def __init__(self, model_or_engine: object, engine: str, tracked: set[str]) -> None:
        module = engine_module(model_or_engine)
        self.module = module
        self.table = param_table(module) if module is not None else {}
        mods = list(module.modules()) if module is not None else []
        self._dicts = [d for m in mods for d in (m._modules, m._parameters, m._buffers)]
        # identity slots (dict, key): child modules, parameters (not under FSDP1/FSDP2, which swap sharded
        # and unsharded parameters in and out of their modules around forward), buffers
        self._children = _slots(m._modules for m in mods)
        self._param_slots = _slots(m._parameters for m in mods) if engine not in ("fsdp1", "fsdp2") else ([], [])
        self._buffers = _slots(m._buffers for m in mods)
        self._params = [p for m in mods for p in m._parameters.values() if p is not None]
        self._getter = None
        if engine == "replicated":
            self._storages = [p for name, p in _named(module) if name in tracked]
        elif engine == "fsdp2":
            self._storages = [p for name, p in _named(module) if name in tracked and hasattr(p, "_local_tensor")]
            self._getter = _local_tensor
        elif engine == "fsdp1":
            self._storages = [p for p in self._params if getattr(p, "_is_flat_param", False)]
            self._getter = _fsdp1_local_shard
        else:  # DeepSpeed: the fp32 partitions live in the optimizer; ZeRO-3 re-gathers the working weights
            self._storages = []
        self._expect = self._now()

    def _ptrs(self) -> list[int]:
        tensors = self._storages if self._getter is None else map(self._getter, self._storages)
        return list(map(torch.Tensor.data_ptr, tensors))

    def _now(self) -> tuple[list, ...]:
        return (list(map(len, self._dicts)), _ids(self._children), _ids(self._param_slots), self._ptrs(),
                list(map(_requires_grad, self._params)), _ids(self._buffers))

    def changed(self) -> bool:
        """Whether the module tree, a parameter object, a source storage, a requires_grad flag or a buffer changed.

        Cheap on purpose (it runs at every update): each part is one C-level pass compared with the
        fingerprint taken at construction; the first difference returns.
        """
        lens, children, params, ptrs, grads, buffers = self._expect
        return (list(map(len, self._dicts)) != lens or _ids(self._children) != children
                or _ids(self._param_slots) != params or self._ptrs() != ptrs
                or list(map(_requires_grad, self._params)) != grads or _ids(self._buffers) != buffers)

    def storages_moved(self) -> bool:
        """Whether a source storage or a parameter object is not the one seen when the watch was made."""
        _, _, params, ptrs, _, _ = self._expect
        return self._ptrs() != ptrs or _ids(self._param_slots) != params


def _slots(dicts: Iterator[dict]) -> tuple[list[dict], list[str]]:
    pairs = [(d, k) for d in dicts for k, v in d.items() if v is not None]
    return [d for d, _ in pairs], [k for _, k in pairs]


def _ids(slots: tuple[list[dict], list[str]]) -> list[int]:
    return list(map(id, map(dict.get, *slots)))


def _named(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in module.named_parameters():
        yield clean_fqn(name), p


def _fsdp1_local_shard(flat_param: torch.Tensor) -> torch.Tensor:
    # before FSDP's lazy init (the first forward) the shard is flat_param.data itself, same storage
    local = getattr(flat_param, "_local_shard", None)
    return flat_param if local is None else local


def describe_change(before: dict[str, ParamInfo], after: dict[str, ParamInfo], tracked: set[str],
                    include_frozen: bool) -> dict[str, list[str]]:
    """What changed in the set of tracked parameters: {"added": [...], "removed": [...], "replaced": [...],
    "newly trainable": [...]}, only the kinds that occurred (empty: the same parameters, maybe new storages).

    A tracked parameter that was frozen later stays tracked (its EMA then averages a constant): no change.
    """
    def trackable(info: ParamInfo) -> bool:
        return not info.flat and (include_frozen or info.requires_grad)

    out: dict[str, list[str]] = {}
    added = [n for n, i in after.items() if n not in before and trackable(i)]
    removed = [n for n in tracked if n not in after and n in before]
    replaced = [n for n in tracked if n in after and n in before and after[n].owner != before[n].owner]
    woke = [n for n, i in after.items() if n in before and n not in tracked and trackable(i)
            and not trackable(before[n])]
    for kind, names in (("added", added), ("removed", removed), ("replaced", replaced), ("newly trainable", woke)):
        if names:
            out[kind] = sorted(names)
    return out
