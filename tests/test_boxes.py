"""Shards as N-d boxes: the pure arithmetic of store/layout.py, without process groups.

Every read plan is executed here by a plain loop over its runs and compared with numpy slicing
of the full tensor (the independent computation); coverage errors are checked on layouts that
have a gap, an overlap or an empty rank.
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from dist_ema.store.layout import (
    Layout,
    canonical_piece,
    cover_problem,
    flat_blocks,
    merge_reads,
    plan_region,
    plan_units,
    translate,
    unit_segments,
)


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """torch.chunk-like split of n into parts (trailing parts may be empty)."""
    c = -(-n // parts) if n else 0
    return [(min(i * c, n), min((i + 1) * c, n)) for i in range(parts)]


def _grid_pieces(shape, splits) -> list[list[tuple]]:
    """One rank per cell of a grid split of ``shape`` (splits[d] parts on dim d): its box, whole."""
    ranks = []
    for cell in itertools.product(*(range(k) for k in splits)):
        spans = [_split(shape[d], splits[d])[cell[d]] for d in range(len(shape))]
        starts, sizes = tuple(a for a, _ in spans), tuple(b - a for a, b in spans)
        n = math.prod(sizes)
        ranks.append([("w", 0, n, (starts, sizes))] if n else [])
    return ranks


def _rank_arrays(layout: Layout, full: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Each rank's stored array, built by plain indexing of the full tensors (not by the planner)."""
    out = []
    for pieces in layout.ranks:
        parts = []
        for p, start, numel, _off, box in pieces:
            fqn, shape, _ = layout.params[p]
            t = full[fqn]
            if box is None:
                parts.append(t.reshape(-1)[start:start + numel])
            else:
                starts, sizes = box
                sub = t[tuple(slice(a, a + z) for a, z in zip(starts, sizes))]
                parts.append(np.ascontiguousarray(sub).reshape(-1)[start:start + numel])
        out.append(np.concatenate(parts) if parts else np.zeros(0, np.float32))
    return out


def _run(reads, arrays, n: int) -> np.ndarray:
    """Execute reads with a plain loop over rows (NaN where nothing was written)."""
    out = np.full(n, np.nan, dtype=np.float32)
    for rd in reads:
        for i in range(rd.rows):
            s, d = rd.src + i * rd.src_stride, rd.dst + i * rd.dst_stride
            assert np.isnan(out[d:d + rd.numel]).all(), "two reads write the same element"
            out[d:d + rd.numel] = arrays[rd.rank][s:s + rd.numel]
    return out


@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 5), (4, 1, 3, 2)])
def test_flat_blocks_cover_the_range_in_order(shape):
    n = math.prod(shape)
    idx = np.arange(n).reshape(shape)
    for a in range(n + 1):
        for b in range(a, n + 1):
            blocks = flat_blocks(a, b, shape)
            assert len(blocks) <= max(1, 2 * len(shape) - 1)
            got = []
            for offs, sizes, x, y in blocks:
                sub = idx[tuple(slice(o, o + z) for o, z in zip(offs, sizes))].reshape(-1)
                assert list(sub) == list(range(x, y))  # contiguous, and it is [x, y)
                got.extend(sub.tolist())
            assert got == list(range(a, b))


def test_canonical_piece_keeps_contiguous_boxes_flat():
    # Shard(0) rows are one flat range of the parameter: stored as in format version 2
    assert canonical_piece((6, 4), 0, 8, ((2, 0), (2, 4))) == (8, 8, None)
    # a part of a row-box that stays inside one row is contiguous too
    assert canonical_piece((6, 4), 2, 2, ((3, 0), (2, 2))) == (16, 2, None)
    # a column block is not
    assert canonical_piece((6, 4), 0, 12, ((0, 2), (6, 2))) == (0, 12, ((0, 2), (6, 2)))
    with pytest.raises(ValueError, match="outside"):
        canonical_piece((6, 4), 0, 4, ((5, 0), (2, 4)))


def test_box_layouts_round_trip_and_flat_ones_keep_the_version_2_files():
    params = [("w", (6, 4), "float32"), ("b", (4,), "float32")]
    flat = Layout.build(params, [[("w", 0, 12), ("b", 0, 2)], [("w", 12, 12), ("b", 2, 2)]])
    assert not flat.has_boxes
    assert all(len(x) == 4 for x in __import__("json").loads(flat.rank_json(0))["pieces"])
    cols = Layout.build(params, [[("w", 0, 12, ((0, 0), (6, 2))), ("b", 0, 2)],
                                 [("w", 0, 12, ((0, 2), (6, 2))), ("b", 0, 2, ((2,), (2,)))]])
    assert cols.has_boxes
    again = Layout.from_json(cols.params_json(), [cols.rank_json(r) for r in range(2)])
    assert again == cols and again.layout_id() == cols.layout_id() != flat.layout_id()
    assert again.ranks[1][1][4] is None  # the bias box is a flat range


def test_coverage_errors_name_gaps_overlaps_and_outside_boxes():
    params = [("w", (4, 4), "float32")]
    with pytest.raises(ValueError, match="gap"):
        Layout.build(params, [[("w", 0, 8, ((0, 0), (4, 2)))], [("w", 0, 6, ((0, 2), (3, 2)))]])
    with pytest.raises(ValueError, match="overlap"):
        Layout.build(params, [[("w", 0, 12, ((0, 0), (4, 3)))], [("w", 0, 8, ((0, 2), (4, 2)))]])
    with pytest.raises(ValueError, match="outside"):
        Layout.build(params, [[("w", 0, 16, ((1, 0), (4, 4)))]])
    assert cover_problem((4, 4), [((0, 0), (4, 2), 0), ((0, 2), (4, 2), 1)]) is None
    assert cover_problem((4, 4), [((0, 0), (4, 2), 0), ((0, 2), (4, 2), 1), ((0, 0), (0, 4), 2)]) is None


LAYOUTS = {
    "rows": lambda shape: _grid_pieces(shape, (3,) + (1,) * (len(shape) - 1)),
    "cols": lambda shape: _grid_pieces(shape, (1, 3) + (1,) * (len(shape) - 2)),
    "tp2xfsdp2": lambda shape: _grid_pieces(shape, (2, 2) + (1,) * (len(shape) - 2)),
    "uneven5x3": lambda shape: _grid_pieces(shape, (5, 3) + (1,) * (len(shape) - 2)),
    "last": lambda shape: _grid_pieces(shape, (1,) * (len(shape) - 1) + (4,)),
}


def _strided(shape, parts, sf):
    """_StridedShard-like: dim 0 cut into parts*sf blocks, rank i holds blocks i, i+parts, ... (several boxes)."""
    blocks = _split(shape[0], parts * sf)
    rest = tuple(shape[1:])
    ranks = []
    for i in range(parts):
        mine = []
        for a, b in blocks[i::parts]:
            if b > a:
                mine.append(("w", 0, (b - a) * math.prod(rest), ((a,) + (0,) * len(rest), (b - a,) + rest)))
        ranks.append(mine)
    return ranks


@pytest.mark.parametrize("shape", [(7, 5), (6, 4, 3), (9, 2, 2, 3)])
@pytest.mark.parametrize("src_name", [*LAYOUTS, "strided", "flat"])
def test_any_region_reads_from_any_layout(shape, src_name):
    rng = random.Random(hash((shape, src_name)) & 0xFFFF)
    full = {"w": np.arange(math.prod(shape), dtype=np.float32).reshape(shape) + 0.5}
    params = [("w", shape, "float32")]
    n = math.prod(shape)
    if src_name == "strided":
        src_pieces = _strided(shape, 2, 3)
    elif src_name == "flat":  # FSDP1-like flat ranges that cut rows anywhere
        cuts = sorted(rng.sample(range(1, n), 3))
        src_pieces = [[("w", a, b - a)] for a, b in zip([0, *cuts], [*cuts, n])]
    else:
        src_pieces = LAYOUTS[src_name](shape)
    src = Layout.build(params, src_pieces)
    arrays = _rank_arrays(src, full)
    index = src.piece_index()[0]
    flat = full["w"].reshape(-1)
    for _ in range(25):  # flat regions of the whole parameter
        a = rng.randrange(n)
        b = rng.randrange(a, n + 1)
        got = _run(merge_reads(plan_region(index, a, b)), arrays, b - a)
        assert np.array_equal(got, flat[a:b])
    for name in LAYOUTS:  # every piece of every other box layout, whole and in parts
        dst = Layout.build(params, LAYOUTS[name](shape))
        for pieces in dst.ranks:
            for _p, start, numel, _off, box in pieces:
                for a, b in [(start, start + numel), (start + numel // 3, start + numel - numel // 4)]:
                    got = _run(plan_region(index, a, b, box), arrays, b - a)
                    if box is None:
                        want = flat[a:b]
                    else:
                        sub = full["w"][tuple(slice(s, s + z) for s, z in zip(*box))]
                        want = np.ascontiguousarray(sub).reshape(-1)[a:b]
                    assert np.array_equal(got, want), (name, box, a, b)


def test_units_of_a_box_layout_translate_into_another_layout():
    """Synthesis' path: units of the newest layout (boxes), read from an older layout (flat rows)."""
    shape = (8, 6)
    params = [("w", shape, "float32"), ("b", (6,), "float32")]
    full = {"w": np.random.default_rng(0).standard_normal(shape).astype(np.float32),
            "b": np.arange(6, dtype=np.float32)}
    boxes = Layout.build(params, [p + [("b", 0, 3, ((0,), (3,)))] if i == 0 else p + ([("b", 3, 3)] if i == 1 else [])
                                  for i, p in enumerate(_grid_pieces(shape, (2, 2)))])
    rows = Layout.build(params, [[("w", 0, 24), ("b", 0, 6)], [("w", 24, 24)]])
    mine, old = _rank_arrays(boxes, full), _rank_arrays(rows, full)
    index = rows.piece_index(boxes)
    for unit in plan_units(boxes, [5] * boxes.world_size, 7):  # units cut inside boxes
        got = _run(translate(index, unit_segments(boxes, unit)), old, unit.numel)
        assert np.array_equal(got, mine[unit.rank][unit.start:unit.start + unit.numel])
