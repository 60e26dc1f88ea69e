"""Store layout and planning: pure functions, no I/O, no torch.distributed.

A training *layout* says where every parameter's elements live in the store:

    params:  [(fqn, global_shape, dtype)]                 identical on every rank
    ranks:   per rank, [(param_index, flat_start, numel, offset)]

Each rank writes, per profile, ONE flat array holding its owned pieces back to back
(``offset`` is a piece's position in it). So objects per snapshot = O(ranks x profiles),
never O(ranks x parameters). The keys and bytes of the stored arrays are in format.py.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np  # noqa: F401 - re-exported helpers below take numpy arrays

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
    "Layout",
    "Read",
    "Unit",
    "plan_region",
    "plan_units",
    "snapshot_id",
    "validate_fqn",
]

DEFAULT_MAX_OBJECT_BYTES = DEFAULT_INNER_BYTES  # the option's default: the size of one inner chunk

_FQN_RE = re.compile(r"^[A-Za-z0-9_.\-:\[\]]+$")


def validate_fqn(fqn: str) -> str:
    """Parameter names are data, never paths: reject anything that could escape a prefix."""
    if not isinstance(fqn, str) or not fqn or not _FQN_RE.match(fqn) or "" in fqn.split("."):
        raise ValueError(
            f"parameter name {fqn!r} is not a valid name (letters, digits, '_', '.', '-', ':', '[]'); "
            f"rename the parameter"
        )
    return fqn


@dataclass(frozen=True)
class Layout:
    """Where every parameter's elements live. Built from all ranks' pieces (same on every rank)."""

    params: tuple[tuple[str, tuple[int, ...], str], ...]
    ranks: tuple[tuple[tuple[int, int, int, int], ...], ...]  # per rank: (param, flat_start, numel, offset)
    engine: str = "unknown"

    @staticmethod
    def build(
        params: Sequence[tuple[str, Sequence[int], str]],
        rank_pieces: Sequence[Sequence[tuple[str, int, int]]],
        engine: str = "unknown",
    ) -> Layout:
        """params: [(fqn, shape, dtype)]; rank_pieces[r]: owned (fqn, flat_start, numel) of rank r, in
        the order rank r stores them. Validates that the pieces cover every parameter exactly once."""
        table = tuple((validate_fqn(f), tuple(int(s) for s in shape), str(dt)) for f, shape, dt in params)
        idx = {f: i for i, (f, _, _) in enumerate(table)}
        if len(idx) != len(table):
            raise ValueError("duplicate parameter names in the layout")
        ranks = []
        for r, pieces in enumerate(rank_pieces):
            off, out = 0, []
            for fqn, start, numel in pieces:
                if fqn not in idx:
                    raise ValueError(f"rank {r} lists a piece of {fqn!r}, which is not in the parameter table")
                out.append((idx[fqn], int(start), int(numel), off))
                off += int(numel)
            ranks.append(tuple(out))
        lay = Layout(table, tuple(ranks), engine)
        lay.validate()
        return lay

    def validate(self) -> None:
        covered: list[list[tuple[int, int, int]]] = [[] for _ in self.params]
        for r, pieces in enumerate(self.ranks):
            for p, start, numel, _ in pieces:
                covered[p].append((start, start + numel, r))
        for p, spans in enumerate(covered):
            fqn, shape, _ = self.params[p]
            total = math.prod(shape)
            spans.sort()
            pos = 0
            for a, b, r in spans:
                if a != pos or b > total or b <= a:
                    what = "overlap" if a < pos else "gap"
                    raise ValueError(
                        f"layout does not cover {fqn!r} (shape {shape}) exactly once: {what} at element "
                        f"{min(a, pos)} (piece [{a}, {b}) of rank {r})"
                    )
                pos = b
            if pos != total:
                raise ValueError(f"layout does not cover {fqn!r} (shape {shape}): elements [{pos}, {total}) missing")

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def rank_numel(self, r: int) -> int:
        return sum(n for _, _, n, _ in self.ranks[r])

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
        return json.dumps({"rank": r, "numel": self.rank_numel(r), "pieces": [list(x) for x in self.ranks[r]]},
                          separators=(",", ":"))

    @staticmethod
    def from_json(params_doc: str | bytes, rank_docs: Sequence[str | bytes]) -> Layout:
        pd = json.loads(params_doc)
        ranks = []
        for r, doc in enumerate(rank_docs):
            d = json.loads(doc)
            if d["rank"] != r:
                raise ValueError(f"layout file of rank {r} says rank {d['rank']}")
            ranks.append(tuple(tuple(int(v) for v in x) for x in d["pieces"]))
        lay = Layout(tuple((validate_fqn(f), tuple(s), d) for f, s, d in pd["params"]), tuple(ranks), pd["engine"])
        lay.validate()
        return lay

    # ---- where is each element
    def piece_index(self, order: Layout | None = None) -> list[list[tuple[int, int, int, int]]]:
        """Per parameter: sorted [(flat_start, numel, rank, offset)].

        With ``order`` (another layout of the same model): indexed by ``order``'s parameter
        positions, matched by name, so ``translate`` can take ``order``'s unit segments.
        """
        out: list[list[tuple[int, int, int, int]]] = [[] for _ in self.params]
        for r, pieces in enumerate(self.ranks):
            for p, start, numel, off in pieces:
                out[p].append((start, numel, r, off))
        for lst in out:
            lst.sort()
        if order is None or order.params == self.params:
            return out
        mine = self.fqn_index()
        missing = [f for f, _, _ in order.params if f not in mine]
        if missing:
            raise ValueError(f"layouts of different models: parameters {missing[:3]} are not in this layout")
        return [out[mine[f]] for f, _, _ in order.params]


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
    """Copy ``numel`` elements from rank array ``rank`` at ``src`` to the output at ``dst``."""

    rank: int
    src: int
    dst: int
    numel: int


def plan_region(index: Sequence[tuple[int, int, int, int]], start: int, end: int) -> list[Read]:
    """Reads that assemble elements [start, end) of one parameter from its pieces.

    index: that parameter's sorted [(flat_start, numel, rank, offset)] (Layout.piece_index()).
    """
    if start < 0 or end < start:
        raise ValueError(f"bad region [{start}, {end})")
    starts = [s for s, _, _, _ in index]
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
        raise ValueError(f"region [{start}, {end}) is not covered by the layout (stops at {pos})")
    return reads


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
    """Deterministic, size-balanced assignment of units to synthesis ranks (greedy, largest first)."""
    loads = [0] * world_size
    out: list[list[Unit]] = [[] for _ in range(world_size)]
    for u in sorted(units, key=lambda u: (-u.numel, u.rank, u.start)):
        k = min(range(world_size), key=lambda i: (loads[i], i))
        out[k].append(u)
        loads[k] += u.numel
    for lst in out:
        lst.sort(key=lambda u: u.key)
    return out


def unit_segments(layout: Layout, unit: Unit) -> list[tuple[int, int, int, int]]:
    """The parameter segments inside a unit: [(param, flat_start, numel, unit_offset)]."""
    segs = []
    a, b = unit.start, unit.start + unit.numel
    for p, start, numel, off in layout.ranks[unit.rank]:
        lo, hi = max(a, off), min(b, off + numel)
        if lo < hi:
            segs.append((p, start + (lo - off), hi - lo, lo - a))
    return segs


def translate(
    src_index: Sequence[Sequence[tuple[int, int, int, int]]],
    segments: Iterable[tuple[int, int, int, int]],
) -> list[Read]:
    """Reads in another layout for the given unit segments.

    src_index: the other layout's ``piece_index(order=<the segments' layout>)``, so that the
    segments' parameter positions name the same parameters in both.
    """
    reads = []
    for p, start, numel, uoff in segments:
        for rd in plan_region(src_index[p], start, start + numel):
            reads.append(Read(rd.rank, rd.src, uoff + rd.dst, rd.numel))
    return reads


def merge_reads(reads: Sequence[Read]) -> list[Read]:
    """Coalesce reads that are contiguous in both source and destination."""
    out: list[Read] = []
    for rd in sorted(reads, key=lambda x: (x.rank, x.src)):
        if out and out[-1].rank == rd.rank and out[-1].src + out[-1].numel == rd.src \
                and out[-1].dst + out[-1].numel == rd.dst:
            last = out.pop()
            out.append(Read(last.rank, last.src, last.dst, last.numel + rd.numel))
        else:
            out.append(rd)
    return out
