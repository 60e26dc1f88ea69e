"""PEFT adapters: the synthesized EMA of a LoRA (or other PEFT) adapter as PEFT's own files.

At training time, when the tracked model is (or holds) a ``peft.PeftModel``, the EMA records in every
snapshot (:func:`adapter_record`, the snapshot metadata's ``"peft"`` entry) the active adapter's name,
its config as PEFT writes it (``adapter_config.json``) and the key of every adapter tensor in PEFT's
files, mapped from the EMA's names: PEFT's own ``get_peft_model_state_dict`` is asked which entries of
the model belong to the adapter and under what key (``base_model.model.fc1.lora_A.default.weight`` ->
``base_model.model.fc1.lora_A.weight``: no adapter name), so the export follows PEFT's rules for every
method.

``synthesize(url, sigma_rels, out=..., format="peft")`` (CLI ``dist-ema synthesize --format peft``)
then writes, per target, ``sigma_rel-<s>/adapter_model.safetensors`` and ``adapter_config.json``:
``PeftModel.from_pretrained(base_model, "<out>/sigma_rel-<s>")`` loads it. A store without the record
(the model was not a PeftModel when it was tracked) exports with ``adapter_config=`` given: a
``PeftConfig`` or its dict; its keys are then the tracked names that contain ``.<adapter>.`` without
that part (``adapter_name``, default "default"), PEFT's rule for LoRA-like methods.

The EMA must track every adapter tensor (``params="*lora_*"``, ``include_frozen=False`` on a PEFT model
whose base is frozen, or every parameter); a missing one is refused before anything is written.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from dist_ema.errors import ConfigError

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "adapter_config_bytes", "adapter_record", "export_keys",
           "export_peft"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file names (peft.utils.constants)
ADAPTER_CONFIG = "adapter_config.json"


def _jsonable(value: Any) -> Any:
    """``value`` as JSON (sets as sorted lists, as PEFT writes them; enums and other objects as text)."""
    def default(o: Any) -> Any:
        if isinstance(o, (set, frozenset)):
            return sorted(o, key=str)
        return str(o)

    return json.loads(json.dumps(value, default=default))


def _find_peft_model(model_or_engine: object) -> tuple[str, Any] | None:
    """(clean prefix, the PeftModel) inside the tracked object, or None (peft not imported: never a PeftModel)."""
    if "peft" not in sys.modules:
        return None
    from peft import PeftModel

    from dist_ema.sharding.parts import as_model
    from dist_ema.sharding.replicated import clean_fqn
    from dist_ema.sharding.watch import engine_module

    module = engine_module(as_model(model_or_engine))
    if module is None:
        return None
    for name, mod in module.named_modules():
        if isinstance(mod, PeftModel):
            return clean_fqn(name), mod
    return None


def _config_doc(peft_model: Any, adapter: str) -> dict:
    """The adapter's config as ``PeftModel.save_pretrained`` writes ``adapter_config.json``."""
    cfg = copy.deepcopy(peft_model.peft_config[adapter])
    if cfg.base_model_name_or_path is None:
        base = peft_model.base_model if cfg.is_prompt_learning else peft_model.base_model.model
        cfg.base_model_name_or_path = base.__dict__.get("name_or_path", None) or None
    cfg.inference_mode = True
    doc = cfg.to_dict()
    if cfg.task_type is None:  # a custom model: PEFT records the base class (auto mapping)
        try:
            cls = peft_model._get_base_model_class(is_prompt_tuning=cfg.is_prompt_learning)
            doc["auto_mapping"] = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
        except Exception:  # noqa: BLE001 - informational only
            pass
    return _jsonable(doc)


def adapter_record(model_or_engine: object) -> dict | None:
    """What a snapshot records about the PEFT adapter of the tracked model, or None when it has none.

    ``{"adapter": name, "config": {adapter_config.json}, "keys": {EMA name: PEFT key}}`` for the active
    adapter; ``keys`` lists every tensor PEFT saves for it (tracked or not: the export checks).
    """
    found = _find_peft_model(model_or_engine)
    if found is None:
        return None
    prefix, pm = found
    from peft import get_peft_model_state_dict

    from dist_ema.sharding.replicated import clean_fqn

    adapter = pm.active_adapter
    if not isinstance(adapter, str):  # several active adapters: record the first (PEFT saves each apart)
        adapter = list(adapter)[0]
    # PEFT's own rules, asked with a stand-in state dict: which entries belong to the adapter, and their keys
    names = [clean_fqn(n) for n, _ in pm.named_parameters(remove_duplicate=False)]
    names += [clean_fqn(n) for n, _ in pm.named_buffers(remove_duplicate=False)]
    import torch

    stand_in = {n: torch.empty(0) for n in dict.fromkeys(names)}
    back = {id(t): n for n, t in stand_in.items()}
    try:
        saved = get_peft_model_state_dict(pm, state_dict=stand_in, adapter_name=adapter)
    except Exception as e:  # noqa: BLE001 - a PEFT method this cannot map: the export then needs adapter_config=
        import logging

        logging.getLogger("dist_ema").warning("dist-ema: could not record the PEFT adapter's keys (%s: %s); export "
                                              "it with adapter_config= given", type(e).__name__, e)
        return None
    keys = {(f"{prefix}.{back[id(t)]}" if prefix else back[id(t)]): k for k, t in saved.items() if id(t) in back}
    return {"adapter": adapter, "config": _config_doc(pm, adapter), "keys": keys}


def _config_of(adapter_config: object) -> dict:
    """An explicit adapter config (a PeftConfig or its dict) as the JSON document PEFT writes."""
    if isinstance(adapter_config, Mapping):
        doc = dict(adapter_config)
    elif hasattr(adapter_config, "to_dict"):
        doc = adapter_config.to_dict()  # type: ignore[union-attr]
    else:
        raise ConfigError(f"adapter_config must be a peft.PeftConfig or its dict; got {type(adapter_config).__name__}")
    if "peft_type" not in doc:
        raise ConfigError("adapter_config has no 'peft_type': give the adapter's PeftConfig (e.g. LoraConfig) or the "
                          "dict of its adapter_config.json")
    doc["inference_mode"] = True
    return _jsonable(doc)


def export_keys(record: dict | None, params: Iterable[str], adapter_config: object = None,
                adapter_name: str = "default") -> tuple[dict[str, str], dict]:
    """({stored name: PEFT key}, adapter_config.json document) for a store's snapshot, or ConfigError / KeyError-like
    errors naming what is missing.

    ``record``: the snapshot's ``"peft"`` metadata (None: not recorded); ``params``: the names the snapshot
    holds. ``adapter_config`` overrides the recorded config (and, without a record, is required).
    """
    from dist_ema.store.fs import StoreError

    params = list(params)
    if record is None and adapter_config is None:
        raise ConfigError("the snapshots hold no PEFT adapter record (the tracked model was not a peft.PeftModel); "
                          "pass adapter_config= (the adapter's PeftConfig or its adapter_config.json dict) to export "
                          "it with format='peft'")
    config = _config_of(adapter_config) if adapter_config is not None else dict(record["config"])  # type: ignore[index]
    if record is not None:
        keys = dict(record["keys"])
        missing = sorted(n for n in keys if n not in params)
        if missing:
            raise StoreError(
                f"the snapshots do not track {len(missing)} of the {len(keys)} tensors of PEFT adapter "
                f"{record['adapter']!r}: {missing[:5]}; track them all (params='*lora_*' for LoRA, or "
                f"include_frozen=False with the base model frozen)")
        return keys, config
    tag = f".{adapter_name}."
    keys = {n: n.replace(tag, ".", 1) for n in params if tag in n}
    if not keys:
        raise StoreError(f"no tracked parameter belongs to a PEFT adapter named {adapter_name!r} (no name contains "
                         f"{tag!r}; tracked names are like {params[:5]}); pass the adapter's name (adapter_name=)")
    return keys, config


def adapter_config_bytes(config: dict) -> bytes:
    """``adapter_config.json`` as PEFT writes it (indent 2, sorted keys)."""
    return json.dumps(config, indent=2, sort_keys=True).encode()


def export_peft(url: str, out: str, sigma_rel: float | None = None, *, gamma: float | None = None,
                adapter_config: object = None, adapter_name: str = "default", **kwargs: Any) -> str:
    """Synthesize one target and write it as a PEFT adapter folder; returns the folder to load.

    ``synthesize(url, [sigma_rel], out=out, format="peft", ...)`` for one target (collective like it);
    ``PeftModel.from_pretrained(base_model, export_peft(...))`` loads the result.

    Example:
        >>> path = export_peft("runs/lora/snapshots", "runs/lora/adapter-ema", sigma_rel=0.10)
        >>> model = PeftModel.from_pretrained(base_model, path)
    """
    from dist_ema.synthesis import synthesize, target_folder

    res = synthesize(url, None if sigma_rel is None else [sigma_rel], gammas=None if gamma is None else [gamma],
                     out=out, format="peft", adapter_config=adapter_config, adapter_name=adapter_name, **kwargs)
    return f"{out.rstrip('/')}/{target_folder(res.targets[0]['sigma_rel'])}"
