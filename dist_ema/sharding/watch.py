"""Tell, cheaply and before every EMA update, whether the model moved away from the EMA's views.

The EMA keeps 1-d views of the tensors the engine adapters listed (``ShardPiece.source``). A
model that is later converted (``model.double()``, ``model.to(dtype or device)``), whose
``param.data`` is replaced, that gets a new submodule (a new head), or whose frozen layer is
unfrozen while only trainable parameters are tracked goes on training other tensors, and the
EMA would silently keep averaging the old ones.

:class:`ModelWatch` records a fingerprint of the model once and compares it with C-level ``map``
passes over cached lists (no tensor operation, no sync). At every update:

* storages: the ``data_ptr`` of what each piece was cut from (the parameter now registered under
  each tracked name for plain/DDP models, the DTensor's local shard under FSDP2, the flat
  parameter's local shard under FSDP1; under DeepSpeed, whose fp32 partitions live in the
  optimizer, the identity of the registered parameters instead);
* ``requires_grad`` of every parameter, with ``include_frozen=False`` (a layer unfrozen later).

Only after a module, parameter or buffer was registered somewhere in the process (torch's global
registration hooks count them, see :class:`_Registrations`), the module tree too: the size of every
module's ``_modules`` / ``_parameters`` / ``_buffers`` dict and the identity of every child module,
parameter (not under FSDP1/FSDP2, which swap sharded and unsharded parameters in and out of their
modules around forward) and buffer.

Why ``data_ptr`` alone catches dtype and device changes: the EMA's views keep the old storages
alive, so a new storage can never be allocated at the old address.

When :meth:`ModelWatch.changed` is true, :func:`param_table` (a full walk) tells what changed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from operator import attrgetter

import torch
from torch import nn

from dist_ema.errors import DistEMAError
from dist_ema.sharding.replicated import clean_fqn, unwrap_ddp

__all__ = ["ModelChangedError", "ModelWatch", "ParamInfo", "describe_change", "engine_module", "param_table"]

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


class _Registrations:
    """Counts the module, parameter and buffer registrations of this process (``model.head = nn.Linear(...)``).

    Installed once per process, on the first :class:`ModelWatch`, as torch's *global* registration hooks
    (``torch.nn.modules.module.register_module_*_registration_hook``); each costs one integer increment
    per registration anywhere in the process and changes nothing. A watch walks its model's module
    tree only when the count moved, not at every update.
    """

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()
        self._installed = False

    def _bump(self, module: nn.Module, name: str, value: object) -> None:
        self.count += 1

    def install(self) -> None:
        with self._lock:
            if self._installed:
                return
            from torch.nn.modules import module as torch_module

            torch_module.register_module_module_registration_hook(self._bump)
            torch_module.register_module_parameter_registration_hook(self._bump)
            torch_module.register_module_buffer_registration_hook(self._bump)
            self._installed = True


_REGISTRATIONS = _Registrations()


class ModelWatch:
    """A fingerprint of the model the EMA's views were cut from; :meth:`changed` costs one or two ``map`` passes.

    Build it right after the layout (and again after every re-list). ``engine`` is the layout's
    engine name; ``tracked`` the names the EMA tracks (``layout.params``); with ``include_frozen=False``
    the ``requires_grad`` flags are watched too (a layer unfrozen later).
    """

    def __init__(self, model_or_engine: object, engine: str, tracked: set[str], include_frozen: bool = True) -> None:
        _REGISTRATIONS.install()
        self._count = _REGISTRATIONS.count
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
        self._params = [p for m in mods for p in m._parameters.values() if p is not None] if not include_frozen \
            else []
        # the storages the sources were cut from, as (objects, how to get the tensor from each)
        self._getter = None
        if module is None:
            engine = "none"  # nothing to watch (a hand-made layout over no module)
        if engine == "replicated":  # the parameter now registered under each tracked name: its storage
            owned = {id(p) for name, p in _named(module) if name in tracked}
            slots = [(d, k) for d, k in zip(*self._param_slots) if id(d[k]) in owned]
            self._storages = [d for d, _ in slots]
            self._keys = [k for _, k in slots]
        else:
            self._keys = None
            if engine == "fsdp2":  # FSDP2 keeps its sharded DTensor objects; .double() replaces their local shard
                self._storages = [p for name, p in _named(module) if name in tracked and hasattr(p, "_local_tensor")]
                self._getter = _local_tensor
            elif engine == "fsdp1":
                self._storages = [p for m in mods for p in m._parameters.values() if getattr(p, "_is_flat_param", 0)]
                self._getter = _fsdp1_local_shard
            else:  # DeepSpeed (the fp32 partitions live in the optimizer; ZeRO-3 re-gathers the working weights),
                self._storages = []  # a hand-made layout: the parameters' identity only
        self._expect = self._cheap()
        self._expect_deep = self._deep()

    def _cheap(self) -> tuple[list, list, list] | None:
        try:
            if self._keys is not None:
                tensors = map(dict.get, self._storages, self._keys)
            else:
                tensors = self._storages if self._getter is None else map(self._getter, self._storages)
            ptrs = list(map(torch.Tensor.data_ptr, tensors))
        except TypeError:  # a watched parameter is gone (None in its slot)
            return None
        ids = _ids(self._param_slots) if self._keys is None else []
        return ptrs, ids, list(map(_requires_grad, self._params))

    def _deep(self) -> tuple[list, ...]:
        return (list(map(len, self._dicts)), _ids(self._children), _ids(self._param_slots), _ids(self._buffers))

    def changed(self) -> bool:
        """Whether a source storage, a watched requires_grad flag, or (after a registration) the module tree changed.

        Cheap on purpose (it runs at every update): the storages' ``data_ptr`` in one C-level pass (plus
        the parameters' identity under DeepSpeed, and ``requires_grad`` with ``include_frozen=False``);
        the module tree (sizes of every module's dicts, identity of every child, parameter and buffer)
        only when some module, parameter or buffer was registered in the process since the last look.
        """
        if self._cheap() != self._expect:
            return True
        if _REGISTRATIONS.count != self._count:
            if self._deep() != self._expect_deep:
                return True
            self._count = _REGISTRATIONS.count  # registrations elsewhere (another model): nothing here changed
        return False

    def storages_moved(self) -> bool:
        """Whether a source storage or a parameter object is not the one seen when the watch was made."""
        now = self._cheap()
        return now is None or now[:2] != self._expect[:2] or _ids(self._param_slots) != self._expect_deep[2]


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
                    include_frozen: bool, selection: object = None,
                    module: nn.Module | None = None) -> dict[str, list[str]]:
    """What changed in the set of tracked parameters: {"added": [...], "removed": [...], "replaced": [...],
    "newly trainable": [...]}, only the kinds that occurred (empty: the same parameters, maybe new storages).

    A tracked parameter that was frozen later stays tracked (its EMA then averages a constant): no change.
    ``selection``: the layout's ``params=`` choice (``select.Selection``); a parameter added or unfrozen
    that it does not choose is no change (``module``: the model, for a predicate's tensors).
    """
    chosen = None
    if selection is not None:
        now = dict(_named(module)) if module is not None else {}
        chosen = lambda n: selection.chooses(n, now.get(n))  # noqa: E731

    def trackable(info: ParamInfo, name: str) -> bool:
        return not info.flat and (include_frozen or info.requires_grad) and (chosen is None or chosen(name))

    out: dict[str, list[str]] = {}
    added = [n for n, i in after.items() if n not in before and trackable(i, n)]
    removed = [n for n in tracked if n not in after and n in before]
    replaced = [n for n in tracked if n in after and n in before and after[n].owner != before[n].owner]
    woke = [n for n, i in after.items() if n in before and n not in tracked and trackable(i, n)
            and not trackable(before[n], n)]
    for kind, names in (("added", added), ("removed", removed), ("replaced", replaced), ("newly trainable", woke)):
        if names:
            out[kind] = sorted(names)
    return out
