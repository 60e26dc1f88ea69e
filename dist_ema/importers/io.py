"""Import I/O: read a library's checkpoint files (``torch.load(weights_only=True)``, one at a time) and write
them as a dist-ema store (format 2, through the store's own writer functions and commit protocol). EDM2's
pickles reach :func:`write_store` as the safetensors files its child process writes (edm2.py, ``read=``).

The store is claimed like a training job claims it (:class:`~dist_ema.snapshot.session.StoreSession`:
create-only ``owner.json``, the layout files), every snapshot's data goes to this job's own attempt
folder, and only once every snapshot's data is written are the commit markers written, oldest
first. A failure before that leaves no committed snapshot (the attempt folders are removed here,
or by the next job's start-up); a failure among the markers removes the ones already written.
So a failed import never leaves a store that lists part of a run.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dist_ema.errors import ConfigError
from dist_ema.importers.libraries import EDM2_REFUSAL, Library
from dist_ema.importers.plan import ImportPlan, Scan
from dist_ema.store.format import (
    DEFAULT_INNER_BYTES,
    FORMAT_VERSION,
    SnapshotMeta,
    array_doc,
    data_prefix,
    geometry,
    rank_key,
    shard_key,
    snapshot_id,
)
from dist_ema.store.fs import StoreError, StoreIO
from dist_ema.store.io import (
    check_owner,
    commit_snapshot,
    read_commits,
    remove_snapshot,
    remove_torn_snapshot,
    write_buffers,
    write_shard,
)
from dist_ema.store.layout import Layout

__all__ = ["Contents", "check_step", "check_store_empty", "load_file", "probe", "split_entries", "write_store"]

log = logging.getLogger("dist_ema")

# the buffers of torch's norm layers: stored as snapshot buffers (copied, as dist-ema's own snapshots store
# them), not averaged, so load_synthesized puts them back into the model's buffers (with average_buffers the
# running statistics are averaged tensors; the counter, which ema-pytorch casts to float16, never is)
NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_file(path: str) -> dict:
    """A checkpoint file's dict, with ``torch.load(weights_only=True)`` (never unpickling code), memory-mapped."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # a file of torch.save's legacy format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, ValueError) as e:
        if path.endswith(".pkl"):
            raise ConfigError(f"{path}: {EDM2_REFUSAL}") from None
        raise ConfigError(
            f"{path} cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {str(e)[:200]}): not a "
            f"file of the library, a damaged file, or one holding objects beyond tensors and plain values. dist-ema "
            f"never unpickles code from a checkpoint folder"
        ) from None
    if not isinstance(sd, dict):
        raise ConfigError(f"{path} holds a {type(sd).__name__}, not the dict of tensors the library writes")
    return sd


def _guess(sd: dict) -> str | None:
    """Which library wrote a file, from its entries."""
    if "_extra_state" in sd:
        return "nitrous-ema"
    if any(isinstance(k, str) and k.startswith("ema_model.") for k in sd):
        return "ema-pytorch"
    if "step" in sd and "initted" in sd:
        return "posthoc-ema"
    return None


@dataclass(frozen=True)
class Contents:
    """What the files of one run hold (from the first step's files; every other file must agree).

    ``params``: the averaged tensors, stored as the snapshot's data [(name, shape, dtype)];
    ``buffers``: entries stored as snapshot buffers (copied from the smallest sigma_rel's file);
    ``ties``: {alias: name} of entries that share storage with another (stored once).
    """

    params: tuple[tuple[str, tuple[int, ...], str], ...]
    buffers: tuple[str, ...]
    ties: dict
    file_dtype: str
    ema_step: tuple[float | None, bool]  # the library's own step entry of the first file, and whether it is exact

    @property
    def numel(self) -> int:
        return int(sum(int(np.prod(s)) for _, s, _ in self.params))


def split_entries(lib: Library, sd: dict, where: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(the model's tensors by name, the library's own entries) of one file, or ConfigError."""
    guess = _guess(sd)
    if guess is not None and guess != lib.kind:
        raise ConfigError(f"{where} looks like a {guess} checkpoint, not {lib.kind}'s (entries "
                          f"{sorted(map(str, sd))[:4]}); give the kind that wrote the folder: dist-ema import "
                          f"{guess} ...")
    state = {k: sd[k] for k in lib.state_keys if k in sd}
    missing = [k for k in lib.state_keys if k not in sd]
    if missing:
        raise ConfigError(f"{where} lacks {lib.kind}'s entries {missing}: not a {lib.kind} checkpoint file")
    tensors = {}
    for k, v in sd.items():
        if k in state:
            continue
        if not isinstance(k, str) or not k.startswith(lib.prefix) or not torch.is_tensor(v):
            raise ConfigError(f"{where}: entry {k!r} ({type(v).__name__}) is not one of {lib.kind}'s "
                              f"(tensors named {lib.prefix!r}...): not a {lib.kind} checkpoint file")
        tensors[k[len(lib.prefix):]] = v
    if not tensors:
        raise ConfigError(f"{where} holds no tensors of a model")
    return tensors, state


def _file_step(lib: Library, state: dict) -> tuple[float | None, bool]:
    """The library's own step entry (the EMA's calls) as a float, or None where it has none; and whether it is
    exact (an integer; not a float16 cast as ema-pytorch's, or any checkpoint_dtype cast)."""
    v = state.get("_extra_state", {}).get("step") if lib.kind == "nitrous-ema" else state.get("step")
    if v is None:
        return None, False
    if torch.is_tensor(v):
        return float(v.item()), not v.is_floating_point()
    return float(v), isinstance(v, int)


def probe(lib: Library, src: str, scan: Scan, average_buffers: bool) -> Contents:
    """Read the first step's files (one at a time) and say what the run's files hold."""
    names = None
    ema_step = None
    for name in scan.files[0]:
        path = os.path.join(src, name)
        tensors, state = split_entries(lib, load_file(path), path)
        table = {n: (tuple(v.shape), v.dtype) for n, v in tensors.items()}
        if names is None:
            names, first, first_path = table, tensors, path
            ema_step = _file_step(lib, state)
        elif table != names:
            raise ConfigError(_mismatch(first_path, names, path, table))
    ties = _shared(first)
    params, buffers = [], []
    dtypes = set()
    for n, v in first.items():
        if n in ties:
            continue
        leaf = n.rsplit(".", 1)[-1]
        floating = v.is_floating_point()
        if not floating or leaf == "num_batches_tracked" or (leaf in NORM_BUFFERS and not average_buffers):
            buffers.append(n)
        else:
            params.append((n, tuple(v.shape), str(v.dtype).replace("torch.", "")))
            dtypes.add(v.dtype)
    if not params:
        raise ConfigError(f"{src}: the files hold no floating-point tensors to import")
    file_dtype = str(max(dtypes, key=lambda d: torch.finfo(d).bits)).replace("torch.", "")
    return Contents(tuple(params), tuple(buffers), ties, file_dtype, ema_step)


def _shared(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """{alias: first name} of entries that are the same tensor (tied weights, saved once by torch.save)."""
    first: dict[tuple, str] = {}
    ties = {}
    for n, v in tensors.items():
        if v.numel() == 0:
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if key in first:
            ties[n] = first[key]
        else:
            first[key] = n
    return ties


def _mismatch(a: str, ta: dict, b: str, tb: dict) -> str:
    only_a = sorted(set(ta) - set(tb))[:3]
    only_b = sorted(set(tb) - set(ta))[:3]
    shapes = sorted(n for n in set(ta) & set(tb) if ta[n] != tb[n])[:3]
    return (f"{b} does not hold the tensors {a} holds (only in the first {only_a}, only in the other {only_b}, "
            f"other shapes or dtypes {shapes}): files of different models or runs in one folder; import one run's "
            f"folder")


def check_store_empty(io: StoreIO) -> None:
    """StoreError unless the store has no committed snapshot (an import writes a new store)."""
    try:
        done, _ = read_commits(io)
    except FileNotFoundError:
        return
    if done:
        steps = [c.meta.get("step") for c in done]
        raise StoreError(f"{io.url} already holds {len(done)} committed snapshot(s) (steps {steps[:3]}"
                         f"{' ...' if len(steps) > 3 else ''}): dist-ema import writes a new store; give an empty or "
                         f"new STORE")


def _values(tensors: dict[str, torch.Tensor], contents: Contents, dtype: str, where: str) -> np.ndarray:
    """The averaged tensors of one file, back to back in layout order, as the stored dtype's values."""
    flat = torch.empty(contents.numel, dtype=_TORCH[dtype])
    off = 0
    for n, shape, dt in contents.params:
        v = tensors.get(n)
        if v is None or tuple(v.shape) != shape or str(v.dtype).replace("torch.", "") != dt:
            got = None if v is None else (tuple(v.shape), str(v.dtype))
            raise ConfigError(f"{where}: {n} is {got}, the run's first files hold {(shape, dt)}: files of different "
                              f"models or runs in one folder; import one run's folder")
        k = v.numel()
        flat[off:off + k].copy_(v.reshape(-1))
        off += k
    return flat.view(torch.int16).numpy().view("<u2") if dtype == "bfloat16" else flat.numpy()


def _buffers(tensors: dict[str, torch.Tensor], names: tuple[str, ...], where: str) -> tuple[bytes, list]:
    """The packed buffers and their records (name, shape, dtype, offset, nbytes), as the tracker writes them.

    A norm layer's ``num_batches_tracked`` is an int64 counter: ema-pytorch's float16 cast is undone."""
    parts, records, off = [], [], 0
    for n in names:
        v = tensors.get(n)
        if v is None:
            raise ConfigError(f"{where} lacks {n}, which the run's first files hold: files of different runs in "
                              f"one folder")
        if n.rsplit(".", 1)[-1] == "num_batches_tracked" and v.is_floating_point():
            v = v.round().to(torch.int64)
        raw = v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        records.append((n, list(v.shape), str(v.dtype).replace("torch.", ""), off, len(raw)))
        parts.append(raw)
        off += len(raw)
    return b"".join(parts), records


def check_step(plan_calls: int, step: tuple[float | None, bool], where: str) -> None:
    """The library's own step entry agrees with the file name (a float cast: within float16 rounding; inf: not
    checked)."""
    value, exact = step
    if value is None or not np.isfinite(value):
        return
    tol = 0.5 if exact else max(0.5, abs(plan_calls) * 2.0**-10)
    if abs(value - plan_calls) > tol:
        raise ConfigError(f"{where}: the file's own step entry says {value:g} EMA calls, its name {plan_calls}: a "
                          f"renamed file or a wrong update_after_step; import the files as the library wrote them")


def write_store(io: StoreIO, src: str, plan: ImportPlan, contents: Contents, storage_dtype: str,
                storage_options: dict | None, extra: Callable[[int], dict],
                read: Callable[[int, int, str], dict] | None = None, unit: str = "steps") -> tuple[list[str], int]:
    """Write every planned step as a committed snapshot (all or none). Returns (snapshot ids, data bytes).

    ``read(n, k, path)``: step n's profile-k file's tensors by name (default: the library's .pt file, read with
    :func:`load_file` and checked against the plan); ``unit``: the snapshots' time unit."""
    from dist_ema.snapshot.session import StoreSession

    engine = f"import:{plan.library.kind}"
    layout = Layout.build(list(contents.params), [[(n, 0, int(np.prod(s))) for n, s, _ in contents.params]], engine)
    g = geometry(contents.numel, storage_dtype, DEFAULT_INNER_BYTES, None)
    session = StoreSession(io, None, 0, storage_options)
    # claims the store as a training job does: refused while another job owns it; resume=True takes over the
    # claim of a job shown to be dead (an import that was killed) and removes its leftovers
    session.open(layout, resume=True)
    if session.committed:  # committed since check_store_empty: another job wrote it meanwhile
        session.release()
        raise StoreError(f"{io.url} holds {len(session.committed)} committed snapshot(s): dist-ema import writes a "
                         f"new store; give an empty or new STORE")
    written: list[str] = []
    committed: list[str] = []
    nbytes = 0
    ok = False
    try:
        metas = []
        for n, st in enumerate(plan.steps):
            snap = snapshot_id(st.step)
            prefix = data_prefix(snap, session.job)
            written.append(snap)
            packed, records = b"", []
            for k, name in enumerate(st.files):
                path = os.path.join(src, name)
                if read is None:
                    tensors, state = split_entries(plan.library, load_file(path), path)
                    check_step(st.calls, _file_step(plan.library, state), path)
                    del state
                else:
                    tensors = read(n, k, path)
                nbytes += write_shard(io, shard_key(prefix, 0, k), _values(tensors, contents, storage_dtype, path), g,
                                      durable=True)
                if k == plan.buffers_profile and contents.buffers:
                    packed, records = _buffers(tensors, contents.buffers, path)
                del tensors
            io.put(f"{rank_key(prefix, 0)}/zarr.json", array_doc(len(st.files), g, {"rank": 0}))
            if contents.buffers:
                write_buffers(io, prefix, packed)
                nbytes += len(packed)
            metas.append((snap, SnapshotMeta(
                step=st.step, t=st.t, t_now=st.t_now, updates=st.updates, unit=unit,
                profiles=tuple(zip(plan.sigma_rels, plan.gammas)), dtype=storage_dtype, world_size=1,
                layout=layout.layout_id(), model=layout.model_fingerprint(), engine=engine, compression=None,
                inner_bytes=DEFAULT_INNER_BYTES, attempt=session.job, update_every=plan.update_every,
                ties=dict(contents.ties), buffers=tuple(tuple(r) for r in records), created=time.time(),
                version=FORMAT_VERSION, extra=extra(n),
            ).to_doc()))
        check_owner(io, session.job)  # fencing, as the writer does before its commits
        for snap, meta in metas:  # markers last, oldest first
            commit_snapshot(io, snap, meta)
            committed.append(snap)
        ok = True
    finally:
        if not ok:
            _undo(io, session.job, written, committed)
        session.release()
    return written, nbytes


def _undo(io: StoreIO, job: str, written: list[str], committed: list[str]) -> None:
    """After a failed import: remove its committed snapshots (marker first) and its attempt folders."""
    for snap in committed:
        try:
            remove_snapshot(io, snap)
        except Exception as e:  # noqa: BLE001 - reported; the data stays, and the marker too if it failed
            log.error("dist-ema: import failed; could not remove its snapshot %s from %s: %s", snap, io.url, e)
    for snap in written:
        if snap in committed:
            continue
        try:
            remove_torn_snapshot(io, snap, lambda name: None if name == job else "another job's attempt")
        except Exception as e:  # noqa: BLE001 - the next job's start-up removes a dead job's attempts
            log.warning("dist-ema: import failed; could not remove its uncommitted data %s/%s: %s", io.url, snap, e)

