"""The tracker's state under torch.distributed.checkpoint (DCP) and ``torch.save``.

``PostHocEMA.state_dict()`` / ``load_state_dict()`` / ``per_rank_state_dict()`` delegate here.
Format ``dist_ema.tracker/3``: ``{"dist_ema": {step, t, ...}, "sigma_rel_<s>": {fqn: tensor}, ...}``,
one entry per tracked profile keyed by the model's parameter names, each tensor with the
parameter's global shape: a DTensor around this rank's EMA shard where the layout's pieces are
the parameters' whole local DTensor shards (FSDP2 ``Shard(0)``), otherwise a :class:`_FlatShards`
that lists this rank's flat ranges as rectangular chunks for DCP. Both reshard through DCP.
The tensors are views of the live EMA buffers: nothing is copied or gathered.

The previous format ``dist_ema.tracker/2`` keeps each rank's flat buffers under a key of its
own and loads at the same sharding only.

This module reads and checks; the tracker writes its own buffers and clock with what
:func:`loaded_values` and :func:`check_state` return.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import torch

from dist_ema import phema
from dist_ema.errors import StateDictError, UsageError
from dist_ema.sharding.base import ShardLayout, ShardPiece
from dist_ema.store.layout import piece_blocks

__all__ = ["FORMAT", "FORMAT_PER_RANK", "check_state", "holds_live_views", "loaded_values", "per_rank_state_dict",
           "profile_key", "refuse_kept_live_dict", "state_dict"]

FORMAT = "dist_ema.tracker/3"  # profiles keyed by parameter name, laid out like the parameters (reshards)
FORMAT_PER_RANK = "dist_ema.tracker/2"  # each rank's flat buffers under a key of its own (same sharding only)
_RESHARD_HINT = (
    "load it with torch.distributed.checkpoint, which reshards (dcp.load({'ema': ema}, ...)), or resume from "
    "the snapshot store (PostHocEMA(..., store=url, resume=True))"
)


class Profile(Protocol):
    """What this module reads of a tracked profile: its flat fp32 buffer and one view of it per piece."""

    sigma_rel: float
    gamma: float
    flat: torch.Tensor
    views: list[torch.Tensor]


class Clock(Protocol):
    step: int
    t: float
    t_updated: float
    updates: int


def profile_key(sigma_rel: float) -> str:
    return f"sigma_rel_{sigma_rel:.6g}"


def _range_doc_of(start: int, numel: int, box: tuple | None) -> list:
    """A piece's range as plain data: ``[start, numel]``, or ``[start, numel, starts, sizes]`` of a box."""
    return [int(start), int(numel)] if box is None else [int(start), int(numel), list(box[0]), list(box[1])]


def _range_doc(p: ShardPiece) -> list:
    return _range_doc_of(p.flat_start, p.numel, p.box)


class _ProfileState(dict):
    """One profile's ``{fqn: tensor}`` for DCP; pickled (``torch.save``) as plain flat ranges of this rank.

    DCP flattens it like any mapping and never pickles it. ``torch.save`` writes
    ``{fqn: {"dist_ema_flat_ranges": [[start, numel], ...], "values": [1-d tensor, ...]}}``
    (plain types: ``torch.load(..., weights_only=True)`` reads it), which
    :meth:`PostHocEMA.load_state_dict` accepts at the same sharding.
    """

    def __init__(self, entries: dict, plain: dict[str, tuple[list, list]]) -> None:
        super().__init__(entries)
        self._plain = plain

    def __reduce_ex__(self, protocol):
        items = [(fqn, OrderedDict([("dist_ema_flat_ranges", r), ("values", v)]))
                 for fqn, (r, v) in self._plain.items()]
        return (OrderedDict, (items,))


class _FlatShards(torch.Tensor):
    """A parameter-shaped tensor of which this rank holds some flat ranges (views of the EMA buffer).

    For torch.distributed.checkpoint only: it implements DCP's checkpointable protocol
    (``__create_write_items__``, ``__create_chunk_list__``, ``__get_tensor_shard__``) and lists
    each range as rectangular chunks of the global shape, so DCP saves and loads them in place
    and reshards to any other layout (world size, engine). It has no storage and supports no
    operations. ``torch.save`` stores it as ``{"dist_ema_flat_ranges": [[start, numel], ...],
    "values": [tensor, ...]}`` (plain types, loadable with ``weights_only=True``).
    """

    _pieces: list[tuple[int, torch.Tensor, tuple | None]]
    _chunks: list[tuple[torch.Size, torch.Size, torch.Tensor]]

    @staticmethod
    def __new__(cls, shape: tuple[int, ...], pieces: list[tuple[int, torch.Tensor, tuple | None]]) -> _FlatShards:
        t = torch.Tensor._make_wrapper_subclass(cls, torch.Size(shape), dtype=torch.float32,
                                                device=pieces[0][1].device)
        t._pieces = pieces
        t._chunks = []
        for start, view, box in pieces:
            for offs, sizes, a in piece_blocks(tuple(shape), start, view.numel(), box):
                t._chunks.append((torch.Size(offs), torch.Size(sizes), view[a : a + math.prod(sizes)].view(sizes)))
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise UsageError(f"a dist-ema checkpoint shard supports no tensor operations (called {func})")

    def __repr__(self) -> str:
        ranges = [(s, s + v.numel(), b) for s, v, b in self._pieces]
        return f"_FlatShards(shape={tuple(self.shape)}, flat_ranges={ranges})"

    def __reduce_ex__(self, protocol):
        items = [("dist_ema_flat_ranges", [_range_doc_of(s, v.numel(), b) for s, v, b in self._pieces]),
                 ("values", [v for _, v, _ in self._pieces])]
        return (OrderedDict, (items,))

    def __create_write_items__(self, fqn: str, object: object) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        return [
            WriteItem(index=MetadataIndex(fqn, offs, i), type=WriteItemType.SHARD,
                      tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=offs, sizes=sizes),
                                                  properties=TensorProperties(dtype=torch.float32),
                                                  size=self.shape))
            for i, (offs, sizes, _) in enumerate(self._chunks)
        ]

    def __create_chunk_list__(self) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(offsets=offs, sizes=sizes) for offs, sizes, _ in self._chunks]

    def __get_tensor_shard__(self, index) -> torch.Tensor:
        i = index.index
        if i is not None and i < len(self._chunks) and self._chunks[i][0] == index.offset:
            return self._chunks[i][2]
        for offs, _, view in self._chunks:
            if offs == index.offset:
                return view
        raise StateDictError(f"no EMA chunk at offset {tuple(index.offset)} of {index.fqn!r} on this rank")


# ----------------------------------------------------------------------------- save


def state_dict(clock: Clock, layout: ShardLayout, pieces: Sequence[ShardPiece], profiles: Sequence[Profile], *,
               unit: str, skipped_steps: int) -> dict:
    """The format-3 state dict of an EMA (see ``PostHocEMA.state_dict``): views of ``profiles``' buffers.

    ``pieces`` are the tracker's pieces, in the order of each profile's ``views``.
    """
    header = {
        "format": FORMAT,
        "step": clock.step,
        "t": clock.t,
        "t_updated": clock.t_updated,
        "updates": clock.updates,
        "skipped_steps": skipped_steps,
        "unit": unit,
        "gammas": [p.gamma for p in profiles],
        "sigma_rels": [p.sigma_rel for p in profiles],
        "engine": layout.engine,
    }
    out: dict = {"dist_ema": header}
    by = _pieces_by_fqn(pieces)
    if layout.dtensor_params is not None and all(p.box is None for p in pieces) \
            and all(len(idx) <= 1 for idx in by.values()):  # FSDP2 Shard(0): the parameters' own DTensors
        make = _dtensor_entries(layout, pieces)
    else:
        def make(prof: Profile) -> dict[str, torch.Tensor]:
            return _flat_entries(layout, pieces, prof)
    for prof in profiles:
        # torch.save writes each entry as plain flat ranges (DTensors of views do not pickle)
        plain = {fqn: ([_range_doc(pieces[i]) for i in idx], [prof.views[i] for i in idx])
                 for fqn, idx in by.items()}
        out[profile_key(prof.sigma_rel)] = _ProfileState(make(prof), plain)
    return out


def _pieces_by_fqn(pieces: Sequence[ShardPiece]) -> dict[str, list[int]]:
    by: dict[str, list[int]] = {}
    for i, p in enumerate(pieces):
        by.setdefault(p.fqn, []).append(i)
    return by


def _flat_entries(layout: ShardLayout, pieces: Sequence[ShardPiece], prof: Profile) -> dict[str, torch.Tensor]:
    out = {}
    for fqn, idx in _pieces_by_fqn(pieces).items():
        shape = layout.params[fqn][0]
        out[fqn] = _FlatShards(shape, [(pieces[i].flat_start, prof.views[i], pieces[i].box) for i in idx])
    return out


def _dtensor_entries(layout: ShardLayout, pieces: Sequence[ShardPiece]):
    """A function of a profile: ``{fqn: DTensor}`` around its views, with the live parameters' mesh and placements."""
    from torch.distributed.tensor import DTensor

    live = {name: p for name, p in layout.dtensor_params().items() if name in layout.params}
    missing = sorted(set(layout.params) - set(live))
    if missing:
        raise StateDictError(f"state_dict(): the FSDP2 parameters {missing[:3]} are no longer DTensors of the model")
    by = _pieces_by_fqn(pieces)

    def make(prof: Profile) -> dict[str, torch.Tensor]:
        out = {}
        for fqn, p in live.items():
            idx = by.get(fqn, [])
            if len(idx) > 1:
                raise StateDictError(f"state_dict(): {len(idx)} FSDP2 shard pieces of {fqn!r} on one rank")
            if idx:
                local = prof.views[idx[0]].view(-1, *p.shape[1:])
            else:  # this rank holds no rows of the parameter
                local = prof.flat.new_empty((0, *p.shape[1:]))
            out[fqn] = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                          shape=p.shape, stride=p.stride())
        return out

    return make


def per_rank_state_dict(clock: Clock, pieces: Sequence[ShardPiece], profiles: Sequence[Profile], *,
                        unit: str) -> dict:
    """The format-2 state dict (see ``PostHocEMA.per_rank_state_dict``): this rank's flat buffers."""
    from dist_ema.collective import rank

    return {
        "dist_ema": {
            "format": FORMAT_PER_RANK,
            "step": clock.step,
            "t": clock.t,
            "t_updated": clock.t_updated,
            "updates": clock.updates,
            "unit": unit,
            "gammas": [p.gamma for p in profiles],
        },
        f"dist_ema_rank{rank():05d}": {
            "pieces": json.dumps([[p.fqn, *_range_doc(p)] for p in pieces]),
            **{f"p{k}": prof.flat for k, prof in enumerate(profiles)},
        },
    }


# ----------------------------------------------------------------------------- load


def check_state(state: object, gammas: Sequence[float], unit: str) -> tuple[str, dict]:
    """``(format, header)`` of a tracker state dict, or ValueError: not one, other profiles, another time unit."""
    head = state.get("dist_ema") if isinstance(state, dict) else None
    fmt = head.get("format") if isinstance(head, dict) else None
    if fmt not in (FORMAT, FORMAT_PER_RANK):
        raise StateDictError(
            f"not a dist-ema tracker state dict (no 'dist_ema' entry of format {FORMAT} or "
            f"{FORMAT_PER_RANK}; got {fmt!r})"
        )
    theirs = [float(g) for g in head["gammas"]]
    if len(theirs) != len(gammas) or not all(map(phema.same_gamma, theirs, gammas)):
        raise StateDictError(f"state dict tracks gammas {head['gammas']}, this EMA tracks {list(gammas)}")
    if head["unit"] != unit:
        raise StateDictError(
            f"state dict counts time in {head['unit']}, this EMA in {unit} (batch_size= must "
            f"be given in both or in neither)"
        )
    return fmt, head


def refuse_kept_live_dict(state: dict, head: dict, fmt: str, profiles: Sequence[Profile], *, step: int,
                          updates: int, written_since: bool) -> None:
    """Refuse a state dict whose tensors are the EMA's live buffers but whose clock is older.

    ``state_dict()`` holds views of the EMA, not a copy (DCP loads into them in place), and a copy of
    the clock. Kept in memory while training goes on, its values move with the EMA and its clock
    does not: loading it would put the old step onto the new values. DCP's load writes the saved
    values into the views first (in-place writes the tensors' version counters count) and then
    calls ``load_state_dict``: ``written_since`` (the buffers were written by someone other than the
    EMA since its last update) tells a loaded dict, which is accepted.
    """
    if int(head["updates"]) == updates or not holds_live_views(state, fmt, profiles) or written_since:
        return  # a copy, values and clock from the same moment, or values loaded into the views (DCP)
    raise StateDictError(
        f"this state dict holds live views of the EMA (its values are those of now, step {step}, after "
        f"{updates} updates) but the clock of step {head['step']} ({head['updates']} updates): loading "
        f"it would put the old step onto the newer values. ema.state_dict() is not a copy: for an in-memory "
        f"rollback keep a copy, copy.deepcopy(ema.state_dict()) (or torch.save it), and load that"
    )


def holds_live_views(state: dict, fmt: str, profiles: Sequence[Profile]) -> bool:
    """Whether a tensor of the state dict's profile entries lies in the profiles' own buffers."""
    spans = [(prof.flat.data_ptr(), prof.flat.data_ptr() + prof.flat.numel() * prof.flat.element_size())
             for prof in profiles if prof.flat.numel()]
    if fmt == FORMAT_PER_RANK:
        tensors = [v for k, part in state.items() if k.startswith("dist_ema_rank") and isinstance(part, dict)
                   for v in part.values() if isinstance(v, torch.Tensor)]
    else:
        tensors = [t for prof in profiles
                   for entry in (state.get(profile_key(prof.sigma_rel)) or {}).values()
                   for t in _entry_tensors(entry)]
    return any(a <= t.data_ptr() < b for t in tensors if t.numel() for a, b in spans)


def loaded_values(state: dict, fmt: str, pieces: Sequence[ShardPiece], profiles: Sequence[Profile]
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(destination, values)`` pairs to copy into the profiles' buffers: this rank's part of ``state``.

    Pairs whose values already lie in the destination (DCP loaded them in place) are left out.
    ValueError when this rank's part is missing or was saved with another sharding.
    """
    if fmt == FORMAT_PER_RANK:
        return _per_rank_values(state, pieces, profiles)
    by = _pieces_by_fqn(pieces)
    out = []
    for prof in profiles:
        key = profile_key(prof.sigma_rel)
        entries = state.get(key)
        if not isinstance(entries, dict):
            raise StateDictError(f"state dict has no entry {key!r} for the tracked profile sigma_rel={prof.sigma_rel}")
        for fqn, idx in by.items():
            if fqn not in entries:
                raise StateDictError(f"state dict has no EMA of this rank's shard of {fqn!r} (profile {key}): it was "
                                 f"saved with another sharding (world size, engine or wrapping); {_RESHARD_HINT}")
            mine = [(pieces[i].flat_start, prof.views[i], pieces[i].box) for i in idx]
            for (_, dst, _), src in zip(mine, _local_values(entries[fqn], mine, fqn)):
                if src.data_ptr() != dst.data_ptr():  # DCP loaded in place
                    out.append((dst, src.reshape(-1)))
    return out


def _per_rank_values(state: dict, pieces: Sequence[ShardPiece], profiles: Sequence[Profile]
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from dist_ema.collective import rank

    key = f"dist_ema_rank{rank():05d}"
    mine = [[p.fqn, *_range_doc(p)] for p in pieces]
    if key not in state or json.loads(state[key]["pieces"]) != mine:
        raise StateDictError(
            f"state dict ({FORMAT_PER_RANK}, per-rank buffers) was saved with a different sharding (world size "
            "or wrapping); resume from the snapshot store instead (PostHocEMA(..., store=url, resume=True)), "
            "which reshards, or load it at the world size and wrapping it was saved with"
        )
    out = []
    for k, prof in enumerate(profiles):
        src = state[key][f"p{k}"]
        if src.data_ptr() != prof.flat.data_ptr():  # DCP loads in place
            out.append((prof.flat, src))
    return out


def _entry_tensors(entry: object) -> list[torch.Tensor]:
    """The plain tensors of one state dict entry (a _FlatShards, its torch.save'd form, a DTensor)."""
    if isinstance(entry, _FlatShards):
        return [v for _, v, _ in entry._pieces]
    if isinstance(entry, dict) and "dist_ema_flat_ranges" in entry:
        return [v for v in entry.get("values", []) if isinstance(v, torch.Tensor)]
    if hasattr(entry, "to_local"):
        return [entry.to_local()]
    return [entry] if isinstance(entry, torch.Tensor) else []


def _local_values(entry: object, mine: list[tuple[int, torch.Tensor, tuple | None]], fqn: str) -> list[torch.Tensor]:
    """This rank's values of one parameter's EMA in a state dict entry, aligned with ``mine`` [(start, view, box)]."""
    want = [_range_doc_of(s, v.numel(), b) for s, v, b in mine]
    if isinstance(entry, _FlatShards):
        got = [_range_doc_of(s, v.numel(), b) for s, v, b in entry._pieces]
        values = [v for _, v, _ in entry._pieces]
    elif isinstance(entry, dict) and "dist_ema_flat_ranges" in entry:  # torch.save'd _FlatShards
        got = [[int(r[0]), int(r[1]), *([[int(x) for x in y] for y in r[2:]])] for r in entry["dist_ema_flat_ranges"]]
        values = list(entry["values"])
    elif hasattr(entry, "__create_chunk_list__") and hasattr(entry, "to_local"):  # DTensor (FSDP2)
        local = entry.to_local()
        chunks = entry.__create_chunk_list__()
        row = math.prod(entry.shape[1:])
        got = [[int(c.offsets[0]) * row, local.numel()] for c in chunks if local.numel()]
        values = [local.reshape(-1)] if local.numel() else []
    else:
        raise StateDictError(f"state dict entry of {fqn!r} is a {type(entry).__name__}, not a dist-ema EMA shard")
    if got != want or any(v.numel() != r[1] for v, r in zip(values, got)):
        raise StateDictError(
            f"the EMA of {fqn!r} in this state dict covers the flat ranges {got} on this rank, this EMA holds "
            f"{want}: it was saved with another sharding (world size, engine or wrapping); {_RESHARD_HINT}"
        )
    return values
