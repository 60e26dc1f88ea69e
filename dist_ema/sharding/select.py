"""Which parameters (and buffers) an EMA tracks: ``PostHocEMA(model, params=...)``.

``params`` is one of:

* None (the default): every parameter the engine lists (``include_frozen`` decides about frozen ones);
* glob patterns, one string or a list (``"*.lora_*"``, ``["*.lora_A.*", "*.lora_B.*"]``), matched with
  :func:`fnmatch.fnmatchcase` against the model's clean parameter names (no ``module.`` /
  ``_fsdp_wrapped_module.`` prefixes: the names the store and the exported files use);
* a predicate ``params=lambda name, p: ...`` on the clean name and the parameter as the model registers
  it (the ``DTensor`` under FSDP2, the partitioned parameter under DeepSpeed ZeRO-3; FSDP1 flat
  parameters without ``use_orig_params`` register no per-parameter tensor: the predicate then gets a
  ``meta`` tensor of the parameter's global shape and dtype). From Python only.

Buffers follow the same rule: a buffer is kept (copied into snapshots and exports) when its name matches
a pattern, or when the predicate returns True for ``(name, buffer)``.

:func:`select_layout` applies the choice to one rank's :class:`~dist_ema.sharding.base.ShardLayout`
(pieces, params and buffers together, before the layout check), and records on it what the ranks must
agree on (:class:`Selection`). ``checks.verify_layout`` compares it across ranks: the patterns (or "a
callable"), patterns that matched no name on any rank, and, for a predicate, its outcome (a name chosen
on one rank and left out on another). Every failure is the same :class:`~dist_ema.errors.ConfigError` on
every rank.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from dist_ema.config import check_params
from dist_ema.errors import ConfigError

__all__ = ["Selection", "check_params", "chooser", "params_record", "params_spec", "refuse_other_choice",
           "make_selected_layout", "select_layout", "select_local", "selected_buffers", "snapshot_record"]

# a predicate: (clean name, parameter or buffer) -> keep it
Predicate = Callable[[str, torch.Tensor], bool]
_SHOWN = 8  # names shown in messages


def params_spec(params: object) -> str | None:
    """What the ranks compare (and what the store records, as text): the patterns, "a callable", or None."""
    if params is None:
        return None
    if callable(params):
        return "a callable"
    return repr(list(params))  # type: ignore[call-overload]


def params_record(params: object) -> dict | None:
    """What a snapshot records about the choice: ``{"patterns": [...]}``, ``{"callable": "<module.qualname>"}``
    (a callable itself cannot be stored), or None when every parameter is tracked."""
    if params is None:
        return None
    if callable(params):
        name = getattr(params, "__qualname__", type(params).__qualname__)
        return {"callable": f"{getattr(params, '__module__', None) or '?'}.{name}"}
    return {"patterns": list(params)}  # type: ignore[call-overload]


def chooser(params: object) -> Callable[[str, torch.Tensor | None], bool]:
    """``chosen(name, tensor)`` for ``params`` (tensor may be None for patterns: names only)."""
    if params is None:
        return lambda name, t: True
    if callable(params):
        predicate = params

        def chosen(name: str, t: torch.Tensor | None) -> bool:
            try:
                return bool(predicate(name, t))
            except Exception as e:  # noqa: BLE001 - named with the parameter it failed on
                raise ConfigError(f"params= callable failed on {name!r}: {type(e).__name__}: {e}") from e

        return chosen
    patterns = tuple(params)  # type: ignore[arg-type]
    return lambda name, t: any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


@dataclass(frozen=True)
class Selection:
    """``params=`` as applied to one rank's layout (``ShardLayout.selection``).

    Attributes:
        params: the validated choice (patterns or the callable).
        spec: :func:`params_spec` of it, compared across ranks.
        unmatched: the patterns that match no parameter or buffer name this rank holds.
        left_out: the parameters the engine listed on this rank that the choice leaves out.
        names: a few of this rank's parameter names (for messages).
    """

    params: object
    spec: str | None
    unmatched: tuple[str, ...] = ()
    left_out: frozenset[str] = frozenset()
    names: tuple[str, ...] = ()

    def chooses(self, name: str, tensor: torch.Tensor | None = None) -> bool:
        return chooser(self.params)(name, tensor)

    def summary(self, chose_any: bool) -> tuple:
        """The small record ``verify_layout`` gathers from every rank."""
        return (self.spec, self.unmatched, self.names if self.unmatched or not chose_any else (), chose_any)


def _named_tensors(module: object) -> dict[str, torch.Tensor]:
    """The model's registered parameters by clean name (FSDP1 flat parameters left out)."""
    from dist_ema.sharding.replicated import clean_fqn

    if not isinstance(module, torch.nn.Module):
        return {}
    return {clean_fqn(n): p for n, p in module.named_parameters() if not getattr(p, "_is_flat_param", False)}


def select_layout(layout, params: object, module: object = None):
    """``layout`` restricted to the parameters and buffers ``params`` chooses (a new ShardLayout; runs no collective).

    ``params``: None (``layout`` is returned as it is), patterns or a predicate (see the module docstring);
    checked with :func:`check_params`. ``module``: the model, for the predicate's tensors (None: meta
    tensors of the global shapes). The result's ``selection`` records the choice for the layout check.
    """
    params = check_params(params)
    if params is None:
        return layout
    chosen = chooser(params)
    tensors = _named_tensors(module)

    def tensor_of(name: str) -> torch.Tensor:
        if name in tensors:
            return tensors[name]
        shape, dtype = layout.params[name]
        return torch.empty(shape, dtype=dtype, device="meta")

    keep = {f for f in layout.params if chosen(f, tensor_of(f))}
    buffers = {n: b for n, b in layout.buffers.items() if chosen(n, b)}
    unmatched: tuple[str, ...] = ()
    if not callable(params):
        names = set(layout.params) | set(tensors) | set(layout.buffers)
        unmatched = tuple(p for p in params if not any(fnmatch.fnmatchcase(n, p) for n in names))
    selection = Selection(params, params_spec(params), unmatched, frozenset(set(layout.params) - keep),
                          tuple(sorted(set(layout.params) | set(tensors))[:_SHOWN]))
    return replace(layout, pieces=[p for p in layout.pieces if p.fqn in keep],
                   params={f: v for f, v in layout.params.items() if f in keep}, buffers=buffers, selection=selection)


def selected_buffers(layout, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``buffers`` restricted to those the layout's selection keeps (all of them without one)."""
    sel = getattr(layout, "selection", None)
    if sel is None:
        return buffers
    return {n: b for n, b in buffers.items() if sel.chooses(n, b)}


# ----------------------------------------------------------------------------- the ranks' agreement


def _by_rank(values: Sequence[object]) -> str:
    from dist_ema.settings import _ranks_by_value

    return _ranks_by_value(list(values))


def check_summaries(summaries: Sequence[tuple | None]) -> None:
    """The ranks' :meth:`Selection.summary` (None: no params=), gathered; ConfigError (the same on every rank).

    Refuses: ranks with different ``params=`` (patterns or kinds), a pattern that matches no name on
    any rank, and a choice that leaves no parameter to track on any rank.
    """
    specs = [None if s is None else s[0] for s in summaries]
    invalid = {r: spec[len(_INVALID):] for r, spec in enumerate(specs) if spec and spec.startswith(_INVALID)}
    if invalid:
        detail = "; ".join(f"rank {r}: ConfigError: {err}" for r, err in list(invalid.items())[:4])
        raise ConfigError(f"PostHocEMA settings are invalid on {len(invalid)} of {len(specs)} rank(s): {detail}",
                          failures={r: f"ConfigError: {err}" for r, err in invalid.items()})
    if len(set(specs)) > 1:
        shown = [s if s is not None else "none (every parameter)" for s in specs]
        raise ConfigError(f"PostHocEMA settings differ across ranks: params: {_by_rank(shown)}. Fix: every rank must "
                          f"construct PostHocEMA with the same params=; nothing was written")
    if specs[0] is None:
        return
    names = sorted({n for s in summaries for n in s[2]})[:_SHOWN]
    unmatched = [p for p in summaries[0][1] if all(p in s[1] for s in summaries)]
    if unmatched:
        raise ConfigError(f"params={specs[0]}: {'pattern' if len(unmatched) == 1 else 'patterns'} {unmatched} "
                          f"{'matches' if len(unmatched) == 1 else 'match'} no parameter or buffer name of the model "
                          f"(its names are like {names}). Fix: glob patterns match the whole clean name "
                          f"(fnmatch, case-sensitive): '*.lora_*' or 'layers.*.attn.*'")
    if not any(s[3] for s in summaries):
        raise ConfigError(f"params={specs[0]} chose no parameter to track (the model's names are like {names}; "
                          f"with include_frozen=False the frozen ones are left out as well). Fix: choose at least one "
                          f"parameter")


def check_outcomes(keys: Sequence[Sequence[str]], left_out: Sequence[Sequence[str]], spec: str | None) -> None:
    """A name chosen on one rank and left out on another: the ranks' choices differ (a predicate that does
    not depend on the name and parameter alone). ConfigError, the same on every rank."""
    if spec is None:
        return
    chosen_on = {}
    for r, names in enumerate(keys):
        for n in names:
            chosen_on.setdefault(n, r)
    clashes = [(n, chosen_on[n], r) for r, names in enumerate(left_out) for n in sorted(names) if n in chosen_on]
    if clashes:
        lines = "; ".join(f"{n!r} is tracked on rank {a} but left out on rank {b}" for n, a, b in clashes[:_SHOWN])
        more = f"; and {len(clashes) - _SHOWN} more" if len(clashes) > _SHOWN else ""
        raise ConfigError(f"params={spec} chose different parameters on different ranks: {lines}{more}. Fix: the "
                          f"choice must depend on the name and the parameter's shape, dtype or requires_grad only, "
                          f"the same on every rank (not on the rank or a local shard); nothing was written")


# ----------------------------------------------------------------------------- resume


def refuse_other_choice(url: str, snap_id: str, meta: dict, record: dict | None, mine: dict, theirs: dict) -> None:
    """Resume: the store's snapshot was taken with another ``params=`` than this EMA's. StoreError naming both.

    ``record``: this EMA's :func:`params_record`; ``mine`` / ``theirs``: {name: shape} tracked here and held by
    the snapshot. Two callables are compared by what they chose.
    """
    from dist_ema.store.fs import StoreError
    from dist_ema.store.layout import param_mismatch

    stored = meta.get("params")
    if stored == record or (stored is not None and record is not None and "callable" in stored and "callable" in
                            record):
        if stored is not None and "callable" in stored:
            diff = param_mismatch(mine, theirs)
            if diff is not None:
                raise StoreError(f"store {url} (snapshot {snap_id}) was written with a params= callable that chose "
                                 f"other parameters than this one: {diff}. Fix: resume with the same choice, or use "
                                 f"a new store URL")
        return

    def said(rec: dict | None) -> str:
        if rec is None:
            return "every parameter (no params=)"
        if "patterns" in rec:
            return f"params={rec['patterns']}"
        return f"params=<callable {rec['callable']}>"

    raise StoreError(f"store {url} (snapshot {snap_id}) was written tracking {said(stored)} ({len(theirs)} "
                     f"parameters), this EMA tracks {said(record)} ({len(mine)} parameters); a resumed EMA must track "
                     f"what its snapshots hold. Fix: resume with the same params=, or use a new store URL")


def snapshot_record(model_or_engine: object, layout) -> dict:
    """What every snapshot records about the tracked set (entries of its metadata): ``"params"`` (the choice,
    :func:`params_record`, when params= is given) and ``"peft"`` (the model's PEFT adapter when it is a
    ``peft.PeftModel``: :func:`dist_ema.adapters.adapter_record`)."""
    from dist_ema.adapters import adapter_record

    out: dict = {}
    sel = getattr(layout, "selection", None)
    if sel is not None:
        out["params"] = params_record(sel.params)
    peft = adapter_record(model_or_engine)
    if peft is not None:
        out["peft"] = peft
    return out


_INVALID = "invalid: "  # the spec of a rank whose params= value is invalid


def make_selected_layout(model_or_engine: object, include_frozen: bool, params: object):
    """``make_layout(model_or_engine, include_frozen, params)`` for PostHocEMA, which checks it across ranks next.

    An invalid ``params`` value does not raise here (the layout check is collective: every rank must get
    there): the layout then holds every parameter and a selection that the check refuses on every rank,
    naming this rank's error.
    """
    from dist_ema.sharding.detect import make_layout

    try:
        params = check_params(params)
    except ConfigError as e:
        layout = make_layout(model_or_engine, include_frozen=include_frozen)
        return replace(layout, selection=Selection(None, f"{_INVALID}{e}"))
    return make_layout(model_or_engine, include_frozen=include_frozen, params=params)


def select_local(layout, params: object, module: object = None):
    """:func:`select_layout` for a hand-made layout, its checks on this rank only (no layout check runs)."""
    layout = select_layout(layout, params, module)
    if layout.selection is not None:
        check_summaries([layout.selection.summary(bool(layout.params))])
    return layout
