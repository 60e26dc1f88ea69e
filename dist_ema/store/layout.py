"""Store layout and planning: pure functions, no I/O, no torch.distributed.

A training *layout* says where every parameter's elements live in the store:

    params:  [(fqn, global_shape, dtype)]                 identical on every rank
    ranks:   per rank, [(param_index, start, numel, offset, box)]

A piece is a flat range [start, start + numel) of a parameter (``box`` None), or of the row-major
order of an N-d box of it (``box = (starts, sizes)``, as torch.distributed.checkpoint's chunks:
tensor parallel, ``Shard(d > 0)``): any region of any layout is read through box intersection.
Each rank writes, per profile, ONE flat array holding its owned pieces back to back
(``offset`` is a piece's position in it). So objects per snapshot = O(ranks x profiles),
never O(ranks x parameters). The keys and bytes of the stored arrays are in format.py.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from dist_ema.errors import LayoutError
from dist_ema.store.format import (  # noqa: F401 - the format's names, importable from here too
    DEFAULT_INNER_BYTES,
    FORMAT_VERSION,
    STORAGE_DTYPES,
    STORE_MARKER,
    decode,
    np_dtype,
    snapshot_id,
)

__all__ = [
    "FORMAT_VERSION",
    "STORAGE_DTYPES",
    "Box",
    "Layout",
    "ParamIndex",
    "Read",
    "Unit",
    "plan_region",
    "plan_units",
    "snapshot_id",
    "canonical_piece",
    "cover_problem",
    "flat_blocks",
    "piece_blocks",
    "validate_fqn",
]

DEFAULT_MAX_OBJECT_BYTES = DEFAULT_INNER_BYTES  # the option's default: the size of one inner chunk

_FQN_RE = re.compile(r"^[A-Za-z0-9_.\-:\[\]]+$")


def validate_fqn(fqn: str) -> str:
    """Parameter names are data, never paths: reject anything that could escape a prefix."""
    if not isinstance(fqn, str) or not fqn or not _FQN_RE.match(fqn) or "" in fqn.split("."):
        raise LayoutError(
            f"parameter name {fqn!r} is not a valid name (letters, digits, '_', '.', '-', ':', '[]'); "
            f"rename the parameter"
        )
    return fqn


Box = tuple[tuple[int, ...], tuple[int, ...]]  # (starts, sizes) per dimension of a parameter


def row_strides(sizes: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides (in elements) of a tensor of ``sizes``."""
    out, acc = [], 1
    for s in reversed(sizes):
        out.append(acc)
        acc *= int(s)
    return tuple(reversed(out))


def flat_blocks(start: int, stop: int, shape: Sequence[int]) -> list[tuple[tuple, tuple, int, int]]:
    """Rectangular blocks ``(offsets, sizes, a, b)`` that cover the flat range [start, stop) of a row-major
    tensor of ``shape``, in order; block i holds the flat elements [a, b), contiguously.

    A flat range of an N-d tensor is at most 2N - 1 such blocks (a partial row, full rows, a partial row,
    recursively).

    Example:
        >>> flat_blocks(2, 9, (3, 4))
        [((0, 2), (1, 2), 2, 4), ((1, 0), (1, 4), 4, 8), ((2, 0), (1, 1), 8, 9)]
    """
    shape = tuple(int(s) for s in shape)
    if start >= stop:
        return []
    if not shape:
        return [((), (), start, stop)]
    inner = math.prod(shape[1:])
    r0, o0 = divmod(start, inner)
    r1, o1 = divmod(stop, inner)
    out: list[tuple[tuple, tuple, int, int]] = []

    def within(row: int, a: int, b: int) -> None:
        for offs, sizes, x, y in flat_blocks(a, b, shape[1:]):
            out.append(((row, *offs), (1, *sizes), row * inner + x, row * inner + y))

    if r0 == r1:
        within(r0, o0, o1)
        return out
    if o0:
        within(r0, o0, inner)
        r0 += 1
    if r1 > r0:
        out.append(((r0,) + (0,) * (len(shape) - 1), (r1 - r0, *shape[1:]), r0 * inner, r1 * inner))
    if o1:
        within(r1, 0, o1)
    return out


def is_contiguous_box(shape: Sequence[int], starts: Sequence[int], sizes: Sequence[int]) -> bool:
    """True when a box's elements are one contiguous run of the row-major parameter of ``shape``."""
    d = len(shape)
    k = 0
    while k < d and sizes[k] == 1:
        k += 1
    return all(int(sizes[i]) == int(shape[i]) for i in range(k + 1, d))


def canonical_piece(shape: Sequence[int], start: int, numel: int, box: Box | None) -> tuple[int, int, Box | None]:
    """One piece's (start, numel, box) in its canonical form: a flat range of the whole parameter
    (``box`` None) wherever the elements are contiguous in the parameter, else the range
    [start, start + numel) of the row-major order of ``box``."""
    if box is None:
        return int(start), int(numel), None
    starts, sizes = tuple(int(x) for x in box[0]), tuple(int(x) for x in box[1])
    shape = tuple(int(x) for x in shape)
    if len(starts) != len(shape) or len(sizes) != len(shape):
        raise LayoutError(f"box {box} has {len(starts)} dimensions; the parameter has shape {shape}")
    if any(a < 0 or n < 0 or a + n > s for a, n, s in zip(starts, sizes, shape)):
        raise LayoutError(f"box starts {starts} sizes {sizes} lies outside a parameter of shape {shape}")
    if not 0 <= start <= start + numel <= math.prod(sizes):
        raise LayoutError(f"range [{start}, {start + numel}) outside a box of sizes {sizes}")
    blocks = flat_blocks(start, start + numel, sizes)
    if len(blocks) == 1:
        offs, bs, _, _ = blocks[0]
        gs = tuple(a + o for a, o in zip(starts, offs))
        if is_contiguous_box(shape, gs, bs):
            return sum(g * st for g, st in zip(gs, row_strides(shape))), int(numel), None
    return int(start), int(numel), (starts, sizes)


def piece_blocks(shape: Sequence[int], start: int, numel: int, box: Box | None) -> list[tuple[tuple, tuple, int]]:
    """A piece as true boxes of the parameter: [(global starts, sizes, offset within the piece)]."""
    if box is None:
        return [(offs, sizes, a - start) for offs, sizes, a, _ in flat_blocks(start, start + numel, shape)]
    starts, bsizes = box
    return [(tuple(s + o for s, o in zip(starts, offs)), sizes, a - start)
            for offs, sizes, a, _ in flat_blocks(start, start + numel, bsizes)]


def cover_problem(shape: Sequence[int], blocks: Sequence[tuple[tuple, tuple, int]]) -> str | None:
    """None when ``blocks`` [(starts, sizes, rank)] cover every element of ``shape`` exactly once, else what
    is wrong (the first uncovered or twice covered element, and the ranks involved)."""
    shape = tuple(int(s) for s in shape) or (1,)
    d = len(shape)
    cuts = [sorted({0, shape[i]} | {int(b[0][i]) for b in blocks} | {int(b[0][i]) + int(b[1][i]) for b in blocks})
            for i in range(d)]
    pos = [{c: j for j, c in enumerate(cs)} for cs in cuts]
    count = np.zeros([len(cs) - 1 for cs in cuts], dtype=np.int32)
    who = np.full(count.shape, -1, dtype=np.int64)
    for starts, sizes, r in blocks:
        starts, sizes = (tuple(starts) or (0,)), (tuple(sizes) or (1,))
        if any(int(n) <= 0 for n in sizes):
            continue
        if any(a < 0 or a + n > s for a, n, s in zip(starts, sizes, shape)):
            return f"a piece of rank {r} (box starts {tuple(starts)}, sizes {tuple(sizes)}) lies outside the shape"
        sl = tuple(slice(pos[i][int(starts[i])], pos[i][int(starts[i]) + int(sizes[i])]) for i in range(d))
        count[sl] += 1
        who[sl] = r
    bad = np.argwhere(count != 1)
    if bad.size == 0:
        return None
    cell = tuple(int(x) for x in bad[0])
    at = tuple(cuts[i][cell[i]] for i in range(d))
    what = "gap" if count[cell] == 0 else f"overlap ({int(count[cell])} pieces, last of rank {int(who[cell])})"
    return f"{what} at index {at}"


@dataclass(frozen=True)
class Layout:
    """Where every parameter's elements live. Built from all ranks' pieces (same on every rank).

    A piece is ``(param, start, numel, offset, box)``: elements [start, start + numel) of the row-major
    order of ``box`` of parameter ``param`` (``box`` None: of the whole parameter, a flat range),
    stored at ``offset`` of its rank's array. Boxes (``(starts, sizes)``) describe shards that are not
    contiguous in the parameter (tensor parallel, ``Shard(1)``); pieces that are contiguous are always
    stored as flat ranges, so layouts without boxes are exactly those of format version 2.
    """

    params: tuple[tuple[str, tuple[int, ...], str], ...]
    ranks: tuple[tuple[tuple, ...], ...]  # per rank: (param, start, numel, offset, box)
    engine: str = "unknown"

    @staticmethod
    def build(
        params: Sequence[tuple[str, Sequence[int], str]],
        rank_pieces: Sequence[Sequence[tuple]],
        engine: str = "unknown",
    ) -> Layout:
        """params: [(fqn, shape, dtype)]; rank_pieces[r]: owned (fqn, start, numel[, box]) of rank r, in
        the order rank r stores them. Validates that the pieces cover every parameter exactly once."""
        table = tuple((validate_fqn(f), tuple(int(s) for s in shape), str(dt)) for f, shape, dt in params)
        idx = {f: i for i, (f, _, _) in enumerate(table)}
        if len(idx) != len(table):
            raise LayoutError("duplicate parameter names in the layout")
        ranks = []
        for r, pieces in enumerate(rank_pieces):
            off, out = 0, []
            for piece in pieces:
                fqn, start, numel = piece[0], piece[1], piece[2]
                box = piece[3] if len(piece) > 3 else None
                if fqn not in idx:
                    raise LayoutError(f"rank {r} lists a piece of {fqn!r}, which is not in the parameter table")
                s, n, b = canonical_piece(table[idx[fqn]][1], start, numel, box)
                out.append((idx[fqn], s, n, off, b))
                off += n
            ranks.append(tuple(out))
        lay = Layout(table, tuple(ranks), engine)
        lay.validate()
        return lay

    @property
    def has_boxes(self) -> bool:
        """True when a piece is an N-d box (format version 3); False for a layout of flat ranges."""
        cached = self.__dict__.get("_has_boxes")
        if cached is None:
            cached = any(x[4] is not None for pieces in self.ranks for x in pieces)
            object.__setattr__(self, "_has_boxes", cached)
        return cached

    def validate(self) -> None:
        covered: list[list[tuple[int, int, int]]] = [[] for _ in self.params]
        boxed = [False] * len(self.params)
        for r, pieces in enumerate(self.ranks):
            for p, start, numel, _, box in pieces:
                covered[p].append((start, start + numel, r, box))
                boxed[p] = boxed[p] or box is not None
        for p, spans in enumerate(covered):
            fqn, shape, _ = self.params[p]
            total = math.prod(shape)
            if boxed[p]:
                blocks = [(s, z, r) for a, b, r, box in spans for s, z, _ in piece_blocks(shape, a, b - a, box)]
                if any(b <= a for a, b, _, _ in spans):
                    raise LayoutError(f"layout lists an empty piece of {fqn!r}")
                problem = cover_problem(shape, blocks)
                if problem:
                    raise LayoutError(f"layout does not cover {fqn!r} (shape {shape}) exactly once: {problem}")
                continue
            spans.sort(key=lambda x: x[:3])
            pos = 0
            for a, b, r, _ in spans:
                if a != pos or b > total or b <= a:
                    what = "overlap" if a < pos else "gap"
                    raise LayoutError(
                        f"layout does not cover {fqn!r} (shape {shape}) exactly once: {what} at element "
                        f"{min(a, pos)} (piece [{a}, {b}) of rank {r})"
                    )
                pos = b
            if pos != total:
                raise LayoutError(f"layout does not cover {fqn!r} (shape {shape}): elements [{pos}, {total}) missing")

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def rank_numel(self, r: int) -> int:
        return sum(x[2] for x in self.ranks[r])

    @property
    def total_numel(self) -> int:
        return sum(math.prod(s) for _, s, _ in self.params)

    def fqn_index(self) -> dict[str, int]:
        return {f: i for i, (f, _, _) in enumerate(self.params)}

    def layout_id(self) -> str:
        """Content hash of the layout (cached: the layout is immutable)."""
        cached = self.__dict__.get("_layout_id")
        if cached is not None:
            return cached
        h = hashlib.sha256(self.params_json().encode())
        for r in range(self.world_size):
            h.update(self.rank_json(r).encode())
        lid = h.hexdigest()[:16]
        object.__setattr__(self, "_layout_id", lid)  # frozen dataclass: cache without a field
        return lid

    def model_fingerprint(self) -> str:
        """Hash of the parameter names and shapes: same model <=> same fingerprint.

        Independent of the table's order: engines list parameters in different orders (FSDP1
        unit by unit, a plain model in module order), and one store may hold both.
        """
        table = sorted([f, list(s)] for f, s, _ in self.params)
        return hashlib.sha256(json.dumps(table).encode()).hexdigest()[:16]

    # ---- (de)serialization: params.json and rank-<r>.json
    def params_json(self) -> str:
        return json.dumps({"params": [[f, list(s), d] for f, s, d in self.params], "engine": self.engine,
                           "world_size": self.world_size}, separators=(",", ":"))

    def rank_json(self, r: int) -> str:
        """A rank's pieces: ``[param, start, numel, offset]`` (a flat range, as in format version 2), or
        ``[param, start, numel, offset, starts, sizes]`` (a range of a box, format version 3)."""
        rows = [[p, s, n, o] if b is None else [p, s, n, o, list(b[0]), list(b[1])]
                for p, s, n, o, b in self.ranks[r]]
        return json.dumps({"rank": r, "numel": self.rank_numel(r), "pieces": rows}, separators=(",", ":"))

    @staticmethod
    def from_json(params_doc: str | bytes, rank_docs: Sequence[str | bytes]) -> Layout:
        pd = json.loads(params_doc)
        ranks = []
        for r, doc in enumerate(rank_docs):
            d = json.loads(doc)
            if d["rank"] != r:
                raise LayoutError(f"layout file of rank {r} says rank {d['rank']}")
            rows = []
            for x in d["pieces"]:
                if len(x) == 4:
                    rows.append((int(x[0]), int(x[1]), int(x[2]), int(x[3]), None))
                elif len(x) == 6:
                    rows.append((int(x[0]), int(x[1]), int(x[2]), int(x[3]),
                                 (tuple(int(v) for v in x[4]), tuple(int(v) for v in x[5]))))
                else:
                    raise LayoutError(f"layout file of rank {r}: a piece of {len(x)} fields ({x!r:.80})")
            ranks.append(tuple(rows))
        lay = Layout(tuple((validate_fqn(f), tuple(s), d) for f, s, d in pd["params"]), tuple(ranks), pd["engine"])
        lay.validate()
        return lay

    # ---- where is each element
    def piece_index(self, order: Layout | None = None) -> list[ParamIndex]:
        """Per parameter: a :class:`ParamIndex` of where its pieces lie.

        With ``order`` (another layout of the same model): indexed by ``order``'s parameter
        positions, matched by name, so ``translate`` can take ``order``'s unit segments.
        """
        flat: list[list[tuple[int, int, int, int]]] = [[] for _ in self.params]
        boxed: list[list[tuple]] = [[] for _ in self.params]
        for r, pieces in enumerate(self.ranks):
            for p, start, numel, off, box in pieces:
                flat[p].append((start, numel, r, off))
                boxed[p].append((start, numel, r, off, box))
        out = []
        for p, (_fqn, shape, _) in enumerate(self.params):
            if all(x[4] is None for x in boxed[p]):
                out.append(ParamIndex(sorted(flat[p]), shape))
            else:
                out.append(ParamIndex([], shape, boxes=_box_table(shape, boxed[p])))
        if order is None or order.params == self.params:
            return out
        mine = self.fqn_index()
        missing = [f for f, _, _ in order.params if f not in mine]
        if missing:
            raise LayoutError(f"layouts of different models: parameters {missing[:3]} are not in this layout")
        return [out[mine[f]] for f, _, _ in order.params]


class ParamIndex(list):
    """Where one parameter's pieces lie in a layout.

    As a list: the sorted flat pieces ``[(flat_start, numel, rank, offset)]`` of a parameter stored
    as flat ranges only. ``boxes``: for a parameter with N-d box pieces, every piece as true boxes,
    ``(starts [n, d], ends [n, d], rank [n], offset [n])`` (the list is then empty).
    """

    def __init__(self, items=(), shape: Sequence[int] = (), boxes: tuple | None = None) -> None:
        super().__init__(items)
        self.shape = tuple(int(s) for s in shape)
        self.boxes = boxes
        self.starts = [s for s, _, _, _ in self]  # for bisection, built once

    def table(self) -> tuple:
        """Every piece as true boxes (built on first use for a flat-only parameter)."""
        if self.boxes is None:
            self.boxes = _box_table(self.shape, [(s, n, r, o, None) for s, n, r, o in self])
        return self.boxes


def _box_table(shape: Sequence[int], pieces: Sequence[tuple]) -> tuple:
    shape = tuple(shape) or (1,)
    starts, ends, rank, offset = [], [], [], []
    for start, numel, r, off, box in pieces:
        for s, z, o in piece_blocks(shape, start, numel, box):
            starts.append(s or (0,))
            ends.append(tuple(a + b for a, b in zip(s or (0,), z or (1,))))
            rank.append(r)
            offset.append(off + o)
    d = len(shape)
    return (np.asarray(starts, dtype=np.int64).reshape(-1, d), np.asarray(ends, dtype=np.int64).reshape(-1, d),
            np.asarray(rank, dtype=np.int64), np.asarray(offset, dtype=np.int64))


def param_mismatch(mine: dict, theirs: dict) -> str | None:
    """How two parameter tables ({fqn: shape}) differ, for an error message; None when they are one model."""
    mine = {f: tuple(s) for f, s in mine.items()}
    theirs = {f: tuple(s) for f, s in theirs.items()}
    if mine == theirs:
        return None
    only_store = sorted(set(theirs) - set(mine))[:5]
    only_model = sorted(set(mine) - set(theirs))[:5]
    shapes = sorted(f for f in set(mine) & set(theirs) if mine[f] != theirs[f])[:5]
    return f"parameters only in the store {only_store}, only in this model {only_model}, different shapes {shapes}"


@dataclass(frozen=True)
class Read:
    """Copy ``numel`` elements from rank array ``rank`` at ``src`` to the output at ``dst``.

    With ``rows`` > 1, ``rows`` such runs: run i starts at ``src + i * src_stride`` and lands at
    ``dst + i * dst_stride`` (a block of an N-d box that is not contiguous in one of the layouts).
    """

    rank: int
    src: int
    dst: int
    numel: int
    rows: int = 1
    src_stride: int = 0
    dst_stride: int = 0

    @property
    def total(self) -> int:
        """Elements copied."""
        return self.numel * self.rows

    @property
    def span(self) -> int:
        """Elements of the source range [src, src + span) the read needs fetched."""
        return (self.rows - 1) * self.src_stride + self.numel


def plan_region(index: Sequence[tuple[int, int, int, int]], start: int, end: int, box: Box | None = None) -> list[Read]:
    """Reads that assemble elements [start, end) of one parameter from its pieces.

    index: that parameter's :class:`ParamIndex` (``Layout.piece_index()``), or its sorted flat
    pieces ``[(flat_start, numel, rank, offset)]``. ``box``: the range is of that box's row-major
    order (``None``: of the whole parameter). The reads land at [0, end - start).
    """
    if start < 0 or end < start:
        raise LayoutError(f"bad region [{start}, {end})")
    if box is not None or getattr(index, "boxes", None) is not None:
        return _plan_boxes(index, start, end, box)
    starts = index.starts if isinstance(index, ParamIndex) else [s for s, _, _, _ in index]
    i = max(0, bisect.bisect_right(starts, start) - 1)
    reads: list[Read] = []
    pos = start
    while pos < end and i < len(index):
        s, n, r, off = index[i]
        if s + n <= pos:
            i += 1
            continue
        if s > pos:
            break
        take = min(end, s + n) - pos
        reads.append(Read(r, off + (pos - s), pos - start, take))
        pos += take
        i += 1
    if pos < end:
        raise LayoutError(f"region [{start}, {end}) is not covered by the layout (stops at {pos})")
    return reads


def _plan_boxes(index: ParamIndex, start: int, end: int, box: Box | None) -> list[Read]:
    """plan_region by box intersection: every true block of the wanted range against every stored block."""
    shape = index.shape or (1,)
    s_lo, s_hi, s_rank, s_off = index.table()
    reads: list[Read] = []
    covered = 0
    for d0, dz, dst in piece_blocks(shape, start, end - start, box):
        d0 = tuple(d0) or (0,)
        dz = tuple(dz) or (1,)
        d1 = tuple(a + b for a, b in zip(d0, dz))
        lo = np.maximum(s_lo, np.asarray(d0, dtype=np.int64))
        hi = np.minimum(s_hi, np.asarray(d1, dtype=np.int64))
        hit = np.flatnonzero(np.all(hi > lo, axis=1))
        for j in hit.tolist():
            i0, i1 = lo[j], hi[j]
            covered += int(np.prod(i1 - i0))
            _emit(reads, int(s_rank[j]), tuple(s_lo[j].tolist()), tuple((s_hi[j] - s_lo[j]).tolist()),
                  int(s_off[j]), d0, dz, dst, tuple(i0.tolist()), tuple((i1 - i0).tolist()))
    if covered != end - start:
        raise LayoutError(f"region [{start}, {end}) of box {box} is not covered exactly once by the layout "
                         f"({covered} elements found)")
    return reads


def _emit(out: list[Read], rank: int, s0: tuple, sz: tuple, soff: int, d0: tuple, dz: tuple, doff: int,
          i0: tuple, iz: tuple) -> None:
    """Reads that copy the intersection box (i0, iz) from a stored block (s0, sz at soff, row-major)
    to a wanted block (d0, dz at doff, row-major)."""
    st_s, st_d = row_strides(sz), row_strides(dz)
    src = soff + sum((a - b) * st for a, b, st in zip(i0, s0, st_s))
    dst = doff + sum((a - b) * st for a, b, st in zip(i0, d0, st_d))
    d = len(iz)
    j = d - 1  # dims j.. are one contiguous run in both blocks
    while j > 0 and iz[j] == sz[j] == dz[j]:
        j -= 1
    run = math.prod(iz[j:])
    if j == 0:
        out.append(Read(rank, src, dst, run))
        return
    rows = iz[j - 1]
    for idx in itertools.product(*(range(n) for n in iz[: j - 1])):
        a = src + sum(k * st for k, st in zip(idx, st_s))
        b = dst + sum(k * st for k, st in zip(idx, st_d))
        if rows == 1:
            out.append(Read(rank, a, b, run))
        else:
            out.append(Read(rank, a, b, run, rows, st_s[j - 1], st_d[j - 1]))


@dataclass(frozen=True)
class Unit:
    """One unit of synthesis work: elements [start, start+numel) of rank array ``rank``
    of the *output* layout (= the layout of the newest snapshot)."""

    rank: int
    start: int
    numel: int

    @property
    def key(self) -> tuple[int, int]:
        return (self.rank, self.start)


def plan_units(layout: Layout, chunk_of_rank: Sequence[int], unit_elems: int) -> list[Unit]:
    """Split every rank array into units of about ``unit_elems`` elements, cut at stored chunk boundaries.

    ``chunk_of_rank[r]``: elements per inner chunk of rank r's stored array; a unit is a whole
    number of chunks, so every unit fetches each of its chunks once and no two units share one.
    Independent of the synthesis world size (so the output is too).
    """
    units = []
    for r in range(layout.world_size):
        n = layout.rank_numel(r)
        if n == 0:
            continue
        c = max(1, int(chunk_of_rank[r]))
        step = max(1, unit_elems // c) * c
        units.extend(Unit(r, a, min(step, n - a)) for a in range(0, n, step))
    return units


def assign_units(units: Sequence[Unit], world_size: int) -> list[list[Unit]]:
    """Deterministic, size-balanced assignment of units to synthesis ranks: each rank gets one run of
    the units in store order (rank array, then offset), so that the reads of its adjacent units
    coalesce into large ones. A unit goes to the rank whose share ``[k, k + 1) * total / world``
    holds the unit's middle element: a rank's load is its share to within one unit."""
    order = sorted(units, key=lambda u: u.key)
    total = sum(u.numel for u in order)
    out: list[list[Unit]] = [[] for _ in range(world_size)]
    done = 0
    for u in order:
        k = min(world_size - 1, (2 * done + u.numel) * world_size // (2 * total)) if total else 0
        out[k].append(u)
        done += u.numel
    return out


def unit_segments(layout: Layout, unit: Unit) -> list[tuple]:
    """The parameter segments inside a unit: [(param, start, numel, unit_offset, box)] (``start`` and
    ``numel`` within ``box``'s row-major order, or the parameter's when ``box`` is None)."""
    segs = []
    a, b = unit.start, unit.start + unit.numel
    for p, start, numel, off, box in layout.ranks[unit.rank]:
        lo, hi = max(a, off), min(b, off + numel)
        if lo < hi:
            segs.append((p, start + (lo - off), hi - lo, lo - a, box))
    return segs


def translate(src_index: Sequence[ParamIndex], segments: Iterable[tuple]) -> list[Read]:
    """Reads in another layout for the given unit segments.

    src_index: the other layout's ``piece_index(order=<the segments' layout>)``, so that the
    segments' parameter positions name the same parameters in both.
    """
    reads = []
    for seg in segments:
        p, start, numel, uoff = seg[:4]
        box = seg[4] if len(seg) > 4 else None
        for rd in plan_region(src_index[p], start, start + numel, box):
            reads.append(replace(rd, dst=uoff + rd.dst))
    return reads


def merge_reads(reads: Sequence[Read]) -> list[Read]:
    """Coalesce reads that are contiguous in both source and destination (strided reads stay as they are)."""
    out: list[Read] = []
    for rd in sorted(reads, key=lambda x: (x.rank, x.src)):
        last = out[-1] if out else None
        if last is not None and last.rows == 1 and rd.rows == 1 and last.rank == rd.rank \
                and last.src + last.numel == rd.src and last.dst + last.numel == rd.dst:
            out[-1] = Read(last.rank, last.src, last.dst, last.numel + rd.numel)
        else:
            out.append(rd)
    return out
