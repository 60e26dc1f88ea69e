"""Shard records: what every engine adapter reports about a rank's own parameter shards.

A rank's shard of a parameter is one or more *pieces*: a contiguous range of the row-major
flattened global tensor (FSDP1, DeepSpeed ZeRO, DDP, FSDP2 ``Shard(0)`` rows), or a range of the
row-major order of an N-d *box* of it (``box = (starts, sizes)``, as torch.distributed.checkpoint's
chunks: tensor parallel, ``Shard(d > 0)``, expert parallel, ``_StridedShard``). One record type
serves all engines:

    fqn, global_shape, dtype, box (None: the whole parameter), [flat_start, flat_start + numel), live 1-d view

The tracker averages ``source``; the store writes the piece's elements from the EMA;
synthesis and resume read any region through box intersection. Nothing here depends on
torch.distributed or on the store.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from dist_ema.errors import DistEMAError

__all__ = ["ShardPiece", "ShardLayout", "UnsupportedEngineError", "check_pieces_local", "even_chunk", "even_split",
           "replica_cuts", "share_among_replicas", "split_among_replicas"]


class UnsupportedEngineError(DistEMAError, RuntimeError):
    """The model/engine (or its version or configuration) is not understood by any adapter."""


@dataclass(frozen=True)
class ShardPiece:
    """One contiguous flat range of one parameter held by this rank.

    Attributes:
        fqn: the parameter's name as ``model.named_parameters()`` of the *unwrapped*
            model reports it (no ``_fsdp_wrapped_module.`` / ``module.`` prefixes).
        global_shape: shape of the full (unsharded) parameter.
        dtype: dtype of the model's parameter (the EMA itself is kept in fp32).
        flat_start: first element of the range in the row-major flattened parameter (or box).
        numel: number of elements in the range (> 0; empty pieces are not listed).
        source: live 1-d tensor of ``numel`` elements that the EMA averages: the fp32
            master where the engine has one, otherwise the sharded parameter. It is a
            view: its storage stays the same across optimizer steps.
        owner: True when this rank is the one that writes this range to the store.
            Replicas (HSDP replicate axis, FSDP1 hybrid and NO_SHARD) track the range
            too, so a swapped-in EMA is available on every replica, but exactly one
            owns each element: the replicas split the writing between them
            (``share_among_replicas``).
        load_target: live 1-d tensor of ``numel`` elements holding the weights the
            forward pass uses, where it differs from ``source`` (ZeRO working
            weights, DeepSpeed bf16 params); ``None`` when ``source`` is what forward
            reads. ``PostHocEMA.swapped`` copies into both.
        box: ``(starts, sizes)`` per dimension of the global tensor when the piece is a range of
            that box's row-major order (a shard that is not contiguous in the parameter, e.g. a
            tensor-parallel column block); None when the range is of the whole parameter.
    """

    fqn: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    flat_start: int
    numel: int
    source: torch.Tensor = field(repr=False, compare=False)
    owner: bool = True
    load_target: torch.Tensor | None = field(default=None, repr=False, compare=False)
    box: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    @property
    def global_numel(self) -> int:
        return math.prod(self.global_shape)

    @property
    def region_numel(self) -> int:
        """Elements of what ``flat_start`` counts in: the box, or the whole parameter."""
        return self.global_numel if self.box is None else math.prod(self.box[1])

    @property
    def key(self) -> tuple:
        """Where the piece lies: ``(fqn, flat_start, numel, box)`` (what the store's layout records)."""
        return (self.fqn, self.flat_start, self.numel, self.box)

    @property
    def flat_end(self) -> int:
        return self.flat_start + self.numel


@dataclass
class ShardLayout:
    """All pieces of one rank plus what the engine needs around them.

    Attributes:
        engine: short engine name recorded in snapshots ("fsdp2", "fsdp1",
            "zero1", "zero2", "zero3", "replicated").
        pieces: this rank's pieces, in a deterministic order (same model => same order).
        params: every parameter this rank's model holds as ``{fqn: (global_shape, dtype)}``:
            identical on all ranks, except under pipeline parallelism, where each rank lists its
            stages' parameters and ``all_params`` (set by the layout check) is their union.
        buffers: the model's buffers (e.g. norm running stats) as ``{fqn: tensor}``,
            full and identical on every rank under every supported engine. The
            tracker copies them into snapshots (or averages them, by option).
        process_group: the group the shards are split over (None = default group).
        refresh: re-lists the pieces (after a checkpoint load replaced storages). The
            new layout's ``after_load`` works on the new storages.
        after_load: called on every rank together (it may run collectives) right after
            ``load_target``/``source`` were written, when a swap puts the EMA in and
            again when it puts the training weights back. Afterwards the next forward of
            every rank must compute with what was written, in every layer: it re-syncs
            replicated copies from the owners' slices (DDP, ZeRO-1/2), re-gathers
            persistent ZeRO-3 params, and drops the unsharded copies FSDP keeps after
            forward (the root unit, ``reshard_after_forward=False``, SHARD_GRAD_OP). It
            must not write anything back into ``source``. None when nothing needs it.
        all_params: under pipeline parallelism, every stage's parameters (set by the layout check).
        step_applied: tells whether the engine's latest optimizer step changed the weights (False
            on a skipped fp16-overflow step or a gradient-accumulation micro-step: DeepSpeed); the
            tracker does not count such steps. None when every optimizer step is applied.
        dtensor_params: returns the model's live DTensor parameters ``{fqn: DTensor}`` (FSDP2 and
            the other DTensor engines). When every piece is a parameter's whole local shard, a DCP
            state dict of the EMA wraps each piece into a DTensor of its parameter's mesh and
            placements. None when the parameters are not DTensors.
        selection: what ``params=`` chose (``select.Selection``: pieces, params and buffers are already
            restricted to it; the layout check compares it across ranks); None when every parameter is
            tracked.
    """

    engine: str
    pieces: list[ShardPiece]
    params: dict[str, tuple[tuple[int, ...], torch.dtype]]
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    process_group: object | None = None
    refresh: Callable[[], ShardLayout] | None = None
    after_load: Callable[[], None] | None = None
    all_params: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
    step_applied: Callable[[], bool] | None = None
    dtensor_params: Callable[[], dict[str, torch.Tensor]] | None = None
    selection: Any | None = None

    @property
    def global_params(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every parameter of the model over all ranks: ``params``, or under pipeline parallelism
        (each rank holding some stages) their union, set by ``checks.verify_layout``."""
        return self.params if self.all_params is None else self.all_params


def even_chunk(numel: int, world: int) -> int:
    """Size of each rank's part in a ``torch.chunk``-like split of ``numel`` over ``world``: ceil(numel / world)."""
    return -(-numel // world) if numel else 0


def even_split(numel: int, world: int, rank: int) -> tuple[int, int]:
    """Range ``[start, end)`` of rank ``rank`` in a ``torch.chunk``-like split of ``numel``.

    Chunk size is :func:`even_chunk`, ``ceil(numel / world)``; trailing ranks may get an
    empty range (``start == end``), exactly like ``torch.chunk`` returning fewer chunks.
    The split of FSDP1 flat parameters, of FSDP2 ``Shard(0)`` rows, of DDP / ZeRO-1/2
    ownership and of ZeRO-3 frozen parameters.

    Example:
        >>> [even_split(10, 4, r) for r in range(4)]
        [(0, 3), (3, 6), (6, 9), (9, 10)]
    """
    if world <= 0 or not 0 <= rank < world:
        raise ValueError(f"invalid rank {rank} for world size {world}")
    chunk = even_chunk(numel, world)
    start = min(rank * chunk, numel)
    return start, min(start + chunk, numel)


def share_among_replicas(pieces: Sequence[ShardPiece], replica: int, replicas: int) -> list[ShardPiece]:
    """Split the ownership of pieces that ``replicas`` ranks all hold, so each writes 1/replicas of them.

    ``pieces`` are this rank's pieces in the adapter's order, the same (fqn, range, order) on
    every replica of its shard group (HSDP replicate axis, FSDP1 hybrid inter-node group);
    ``replica`` is this rank's index among them. Their elements, back to back, are cut into
    ``replicas`` contiguous parts of ``floor(total * i / replicas)`` boundaries (sizes differ by
    at most one element); this rank owns part ``replica``. A piece that straddles a boundary
    becomes up to three pieces (views of the same source), so every rank still tracks all it
    holds and exactly one replica owns each element. Runs no collective.
    """
    return [q for split in split_among_replicas(pieces, replica, replicas) for q in split]


def split_among_replicas(pieces: Sequence[ShardPiece], replica: int, replicas: int) -> list[list[ShardPiece]]:
    """``share_among_replicas``, as the list of sub-pieces of each piece (in order)."""
    out: list[list[ShardPiece]] = []
    for p, cuts in zip(pieces, replica_cuts([p.numel for p in pieces], replica, replicas)):
        subs = []
        for x, y, owner in cuts:
            target = None if p.load_target is None else p.load_target[x:y]
            subs.append(replace(p, flat_start=p.flat_start + x, numel=y - x, source=p.source[x:y],
                                owner=owner, load_target=target))
        out.append(subs)
    return out


def replica_cuts(numels: Sequence[int], replica: int, replicas: int) -> list[list[tuple[int, int, bool]]]:
    """How ``replicas`` ranks holding the same pieces (of ``numels`` elements, in one order) split the writing.

    The elements, back to back, are cut into ``replicas`` contiguous parts at ``floor(total * i /
    replicas)``; replica ``replica`` owns part ``replica``. Per piece: its sub-ranges ``(x, y, owned)``
    (relative to the piece, in order), at most three. A function of its arguments only, so every
    replica (and a rank checking all of them) computes the same split.
    """
    if replicas < 1 or not 0 <= replica < replicas:
        raise ValueError(f"invalid replica {replica} of {replicas}")
    total = sum(numels)
    lo, hi = total * replica // replicas, total * (replica + 1) // replicas
    out = []
    a = 0  # first element of the piece in the replicas' common order
    for n in numels:
        cuts = sorted({0, n, min(max(lo - a, 0), n), min(max(hi - a, 0), n)})
        out.append([(x, y, lo <= a + x and a + y <= hi) for x, y in zip(cuts[:-1], cuts[1:])])
        a += n
    return out


def check_pieces_local(pieces: Sequence[ShardPiece]) -> None:
    """Cheap per-rank sanity checks (the collective coverage check lives in checks.py)."""
    for p in pieces:
        if p.numel <= 0:
            raise ValueError(f"empty shard piece listed for {p.fqn!r}; adapters must skip empty pieces")
        if p.flat_start < 0 or p.flat_end > p.region_numel:
            raise ValueError(
                f"shard piece of {p.fqn!r} covers [{p.flat_start}, {p.flat_end}) outside the "
                f"{p.region_numel} elements of its {'parameter' if p.box is None else f'box {p.box}'} "
                f"(global shape {p.global_shape})"
            )
        if p.box is not None and (len(p.box[0]) != len(p.global_shape) or any(
                a < 0 or n < 0 or a + n > s for a, n, s in zip(p.box[0], p.box[1], p.global_shape))):
            raise ValueError(f"shard piece of {p.fqn!r}: box {p.box} is not inside the global shape {p.global_shape}")
        if p.source.dim() != 1 or p.source.numel() != p.numel:
            raise ValueError(
                f"shard piece of {p.fqn!r}: source must be a 1-d view of {p.numel} elements, "
                f"got shape {tuple(p.source.shape)}"
            )
        if p.load_target is not None and p.load_target.numel() != p.numel:
            raise ValueError(f"shard piece of {p.fqn!r}: load_target has the wrong size")
