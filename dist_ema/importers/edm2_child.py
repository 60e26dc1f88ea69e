"""The child process of ``dist-ema import edm2 --allow-pickle``: it loads EDM2's network-snapshot pickles, which
runs the code they hold, and writes each one's EMA network as a safetensors file. dist-ema never imports this
module; dist_ema/importers/edm2.py starts it as ``python -m dist_ema.importers.edm2_child`` and only after the
user opted in (``--allow-pickle`` / ``allow_pickle=True``).

    python -m dist_ema.importers.edm2_child --jobs JOBS.json --out DIR [--code EDM2_CODE] [--window N]

``JOBS.json``: ``{"files": [path, ...]}``, converted in that order, one at a time. ``--code``: a folder put first
on ``sys.path`` (EDM2's code: the folder holding ``dnnlib/`` and ``torch_utils/``, whose
``torch_utils.persistence`` re-creates the pickled classes from the source stored in the pickle); nothing else is
added. For file i the child writes ``DIR/<i>.safetensors`` (``data["ema"].state_dict()``, every tensor in the
dtype the pickle holds, entries that share a tensor saved once) and then prints one JSON line on its standard
output, the file's manifest record: ``{"i", "file", "out", "params": [[name, shape, dtype]], "buffers": [...],
"ties": {alias: name}, "ema_class", "entries"}``. At most ``--window`` converted files wait for the parent, which
acknowledges each one (a line on the child's standard input) once it has taken and removed it. A file that cannot
be converted ends the child (exit 3) after one JSON line ``{"error": ..., "file", "type", "message", "missing"}``;
after the last file it prints ``{"done": n}``. Anything else the loaded code prints goes to standard error.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import traceback


def _error(i: int, path: str, stage: str, e: BaseException) -> dict:
    return {"error": stage, "i": i, "file": path, "type": type(e).__name__, "message": str(e)[:2000],
            "missing": getattr(e, "name", None) if isinstance(e, ImportError) else None,
            "trace": traceback.format_exc()[-3000:]}


def _convert(i: int, path: str, out: str) -> dict:
    """One pickle to ``out/<i>.safetensors``; the manifest record, or an error record."""
    import torch
    from safetensors.torch import save_file

    try:
        with open(path, "rb") as f:
            # the opt-in: unpickling runs the code the file holds (EDM2's persistent classes); only in this child
            data = pickle.load(f)
    except Exception as e:  # noqa: BLE001 - every failure is reported to the parent, which names the file
        return _error(i, path, "load", e)
    entries = sorted(map(str, data)) if isinstance(data, dict) else None
    if not isinstance(data, dict) or "ema" not in data:
        return {"error": "no-ema", "i": i, "file": path, "type": type(data).__name__, "entries": entries,
                "message": f"holds a {type(data).__name__} without an 'ema' entry (entries {(entries or [])[:8]})"}
    ema = data["ema"]
    if not isinstance(ema, torch.nn.Module):
        return {"error": "no-ema", "i": i, "file": path, "type": type(ema).__name__, "entries": entries,
                "message": f"its 'ema' entry is a {type(ema).__name__}, not a torch.nn.Module"}
    try:
        sd = ema.state_dict()
        param_names = {n for n, _ in ema.named_parameters(remove_duplicate=False)}
        first: dict[tuple, str] = {}
        ties: dict[str, str] = {}
        storages: dict[int, int] = {}
        kept: dict[str, torch.Tensor] = {}
        for n, v in sd.items():
            v = v.detach()
            if v.numel() > 0:
                key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()),
                       v.dtype)
                if key in first:  # the same tensor under another name (tied weights): saved once
                    ties[n] = first[key]
                    continue
                first[key] = n
                ptr = v.untyped_storage().data_ptr()
                storages[ptr] = storages.get(ptr, 0) + 1
            kept[n] = v
        tensors = {}
        for n, v in kept.items():
            shared = v.numel() > 0 and storages[v.untyped_storage().data_ptr()] > 1
            tensors[n] = v.clone() if shared else v.contiguous()  # safetensors stores no views of one storage
        rec = {
            "i": i, "file": path, "out": f"{i:06d}.safetensors",
            "params": [[n, list(v.shape), str(v.dtype).replace("torch.", "")] for n, v in tensors.items()
                       if n in param_names],
            "buffers": [[n, list(v.shape), str(v.dtype).replace("torch.", "")] for n, v in tensors.items()
                        if n not in param_names],
            "ties": ties, "ema_class": f"{type(ema).__module__}.{type(ema).__qualname__}", "entries": entries,
        }
        tmp = os.path.join(out, rec["out"] + ".part")
        save_file(tensors, tmp)
        os.replace(tmp, os.path.join(out, rec["out"]))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        return _error(i, path, "convert", e)
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dist_ema.importers.edm2_child")
    p.add_argument("--jobs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--code", default=None)
    p.add_argument("--window", type=int, default=2)
    args = p.parse_args(argv)
    # the protocol owns the real standard output; whatever the loaded code prints goes to standard error
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if args.code:
        sys.path.insert(0, os.path.abspath(args.code))
    with open(args.jobs) as f:
        files = json.load(f)["files"]
    acked = 0
    for i, path in enumerate(files):
        while i - acked >= max(1, args.window):  # the parent has not taken the files before: wait for it
            if not sys.stdin.readline():
                return 0  # the parent closed the pipe: it stopped the import
            acked += 1
        rec = _convert(i, path, args.out)
        proto.write(json.dumps(rec) + "\n")
        if "error" in rec:
            return 3
    proto.write(json.dumps({"done": len(files)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
