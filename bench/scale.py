"""Benchmark 7: scale model of a 70B-parameter model on 1,024 FSDP2 ranks, 2 profiles.

Nothing is trained or written: the project's own planning code is run on synthetic shard
records. Every rank's pieces come from FSDP2 ``Shard(0)`` chunking (``_chunk_rows`` of the
FSDP2 adapter, ``torch.chunk`` semantics) of a Llama-3-70B-like parameter table
(80 layers x 9 tensors + embeddings, final norm and head: 723 tensors, 70.6B parameters);
``Layout.build`` validates and indexes them; ``dist_ema.store.format.geometry`` gives each
rank's stored shard (format 2) and ``v1_geometry`` the format-1 objects it replaces;
``plan_units(layout, chunk_of_rank, unit_elems)`` + ``assign_units`` give the synthesis
work split, with the unit size rule of ``synthesis._plan``.

Objects per snapshot follow the writer (``store/io.py``). Format 2: per rank with data, one
shard object per profile plus the rank array's ``zarr.json``; per snapshot the attempt's
group ``zarr.json`` and ``commit.json`` (+ the buffers object and its ``zarr.json`` when the
model has buffers): at most ranks x (profiles + 1) + 4. Format 1: per rank and profile the
rank array's 64 MiB objects plus its ``zarr.json``; per rank a group ``zarr.json``; the
snapshot's ``zarr.json`` and ``commit.json``. The format-2 count is checked against a real
2-rank FSDP2 store written by benchmark 3 (when it ran in the same invocation).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from bench.common import GiB, Goal, MiB, Result, Table

PROFILES = 2
DTYPE = "float32"


def llama70b_params() -> list[tuple[str, tuple[int, ...], str]]:
    """Llama-3-70B-like table: hidden 8192, MLP 28672, 64 heads / 8 KV heads of 128, vocab 128256."""
    h, inter, kv, vocab = 8192, 28672, 1024, 128256
    out = [("model.embed_tokens.weight", (vocab, h), "float32")]
    for i in range(80):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.self_attn.q_proj.weight", (h, h), "float32"),
            (f"{p}.self_attn.k_proj.weight", (kv, h), "float32"),
            (f"{p}.self_attn.v_proj.weight", (kv, h), "float32"),
            (f"{p}.self_attn.o_proj.weight", (h, h), "float32"),
            (f"{p}.mlp.gate_proj.weight", (inter, h), "float32"),
            (f"{p}.mlp.up_proj.weight", (inter, h), "float32"),
            (f"{p}.mlp.down_proj.weight", (h, inter), "float32"),
            (f"{p}.input_layernorm.weight", (h,), "float32"),
            (f"{p}.post_attention_layernorm.weight", (h,), "float32"),
        ]
    out += [("model.norm.weight", (h,), "float32"), ("lm_head.weight", (vocab, h), "float32")]
    return out


def chunk(n: int, parts: int, i: int) -> tuple[int, int]:
    """(first, count) of part ``i`` of ``n`` indices split as ``torch.chunk`` does: ceil(n / parts) each,
    trailing parts shorter or empty (DTensor ``Shard``, FSDP2 rows)."""
    size = -(-n // parts) if n else 0
    first = min(n, size * i)
    return first, min(n, first + size) - first


def fsdp2_pieces(params, world: int) -> list[list[tuple[str, int, int]]]:
    """Each rank's owned (fqn, flat_start, numel) under FSDP2 Shard(0), in parameter order."""
    ranks: list[list[tuple[str, int, int]]] = [[] for _ in range(world)]
    for fqn, shape, _ in params:
        row = math.prod(shape[1:])
        for r in range(world):
            row0, rows = chunk(shape[0], world, r)
            if rows:
                ranks[r].append((fqn, row0 * row, rows * row))
    return ranks


V1_MAX_OBJECT_BYTES = 64 * MiB  # format 1's default object size


def objects_v2(layout, profiles: int, buffers: bool = False) -> dict:
    """Objects one format-2 snapshot writes, from the layout and the writer's rules."""
    nonempty = sum(1 for r in range(layout.world_size) if layout.rank_numel(r))
    snap = 2 + (2 if buffers else 0)
    return {"data": nonempty * profiles, "array_meta": nonempty, "snapshot": snap,
            "total": nonempty * (profiles + 1) + snap}


def objects_v1(layout, profiles: int, dtype: str, max_object_bytes: int = V1_MAX_OBJECT_BYTES) -> dict:
    """Objects one format-1 snapshot wrote: max_object_bytes objects per rank array, the last one padded."""
    from dist_ema.store.format import v1_geometry

    data = sum(v1_geometry(layout.rank_numel(r), dtype, max_object_bytes).count
               for r in range(layout.world_size) if layout.rank_numel(r)) * profiles
    nonempty = sum(1 for r in range(layout.world_size) if layout.rank_numel(r))
    return {"data": data, "array_meta": nonempty * profiles, "rank_groups": layout.world_size, "snapshot": 2,
            "total": data + nonempty * profiles + layout.world_size + 2}


def stored_v2(layout, profiles: int, dtype: str) -> dict:
    """Bytes one format-2 snapshot stores (exact, from ``geometry``), and what they are made of."""
    from dist_ema.store.format import geometry

    out = {"total": 0, "data": 0, "crc": 0, "index": 0, "padding": 0, "chunks": 0, "shards": 0,
           "max_pad_vs_count": 0.0}
    for r in range(layout.world_size):
        n = layout.rank_numel(r)
        if not n:
            continue
        g = geometry(n, dtype)
        pad = (g.inner * g.count - n) * g.itemsize
        out["total"] += g.shard_bytes * profiles
        out["data"] += n * g.itemsize * profiles
        out["crc"] += 4 * g.count * profiles
        out["index"] += g.index_bytes * profiles
        out["padding"] += pad * profiles
        out["chunks"] += g.count * profiles
        out["shards"] += profiles
        out["max_pad_vs_count"] = max(out["max_pad_vs_count"], (pad / g.itemsize) / g.count)
    return out


def stored_v1(layout, profiles: int, dtype: str, max_object_bytes: int = V1_MAX_OBJECT_BYTES) -> int:
    """Bytes one format-1 snapshot stored: every object a full chunk (zarr padded the last one)."""
    from dist_ema.store.format import v1_geometry

    total = 0
    for r in range(layout.world_size):
        n = layout.rank_numel(r)
        if n:
            g = v1_geometry(n, dtype, max_object_bytes)
            total += g.count * g.inner * g.itemsize
    return total * profiles


def synthesis_units(layout, dtype: str):
    """Synthesis' units of this layout (format 2): ``plan_units`` on the stored inner chunks, sized as ``_plan``."""
    from dist_ema.store.format import STORAGE_DTYPES, geometry
    from dist_ema.store.layout import plan_units
    from dist_ema.synthesis import UNIT_BYTES_MAX, UNIT_BYTES_MIN

    chunk = [geometry(layout.rank_numel(r), dtype).inner for r in range(layout.world_size)]
    total = layout.total_numel * STORAGE_DTYPES[dtype]
    ub = min(UNIT_BYTES_MAX, max(UNIT_BYTES_MIN, total // 16))
    return plan_units(layout, chunk, max(1, ub // STORAGE_DTYPES[dtype])), ub


def fetched_bytes(layout, units, dtype: str) -> int:
    """Bytes synthesis fetches for these units from ONE profile of ONE same-layout snapshot (format 2).

    A read fetches the inner chunks holding its elements, each with its 4-byte crc32c
    (``SnapshotStore.read_stored``); units are whole numbers of chunks, so no chunk is read twice.
    """
    from dist_ema.store.format import geometry

    total = 0
    for u in units:
        g = geometry(layout.rank_numel(u.rank), dtype)
        total += len(g.chunks_of(u.start, u.start + u.numel)) * g.chunk_bytes
    return total


def run(quick: bool = False, context: dict | None = None) -> Result:
    from dist_ema.store.format import DEFAULT_INNER_BYTES, STORAGE_DTYPES
    from dist_ema.store.layout import Layout, assign_units

    world = 64 if quick else 1024
    snapshots = 100
    bw_rank = 1 * GiB  # per synthesis rank, read
    bw_total = 100 * GiB  # aggregate the object store serves
    synth_worlds = (64, 256) if quick else (64, 256, 1024)
    res = Result("scale", f"7. Scale model: 70B parameters, {world:,} FSDP2 ranks, 2 profiles (planning code only)")
    params = llama70b_params()
    total = sum(math.prod(s) for _, s, _ in params)
    t0 = time.perf_counter()
    layout = Layout.build(params, fsdp2_pieces(params, world), "fsdp2")
    build_s = time.perf_counter() - t0
    item = STORAGE_DTYPES[DTYPE]
    units, unit_bytes = synthesis_units(layout, DTYPE)
    res.config = {"tensors": len(params), "params_b": round(total / 1e9, 2), "world": world, "profiles": PROFILES,
                  "storage_dtype": DTYPE, "inner_chunk_mib": DEFAULT_INNER_BYTES / MiB,
                  "format1_object_mib": V1_MAX_OBJECT_BYTES / MiB, "synthesis_unit_mib": unit_bytes / MiB,
                  "layout_build_s": round(build_s, 1)}

    o2 = objects_v2(layout, PROFILES)
    o1 = objects_v1(layout, PROFILES, DTYPE)
    s2 = stored_v2(layout, PROFILES, DTYPE)
    s1 = stored_v1(layout, PROFILES, DTYPE)
    pieces = sum(len(r) for r in layout.ranks)
    snap_bytes = total * item * PROFILES
    rank_bytes = [layout.rank_numel(r) * item for r in range(world)]
    naive = pieces * PROFILES
    bound = world * (PROFILES + 1) + 4
    tab = Table("Objects and bytes per snapshot", ["layout", "objects / snapshot", "data objects",
                                                   "bytes / data object (mean)", "stored / data bytes",
                                                   "PUT time at 3,500/s per prefix", "PUT cost at $0.005 / 1k"])
    tab.rows.append([f"format 2: one shard per rank and profile, {DEFAULT_INNER_BYTES / MiB:.0f} MiB inner chunks "
                     f"with a crc32c each", f"{o2['total']:,}", f"{o2['data']:,}",
                     f"{s2['total'] / o2['data'] / MiB:.0f} MiB", f"{s2['total'] / snap_bytes:.6f}x",
                     f"{o2['total'] / 3500:.1f} s", f"${o2['total'] * 0.005 / 1000:.3f}"])
    tab.rows.append([f"format 1: rank arrays in {V1_MAX_OBJECT_BYTES / MiB:.0f} MiB objects, the last padded to full "
                     f"size", f"{o1['total']:,}", f"{o1['data']:,}", f"{s1 / o1['data'] / MiB:.0f} MiB",
                     f"{s1 / snap_bytes:.3f}x", f"{o1['total'] / 3500:.1f} s", f"${o1['total'] * 0.005 / 1000:.3f}"])
    tab.rows.append(["chunk per rank per parameter", f"{naive:,}", f"{naive:,}", f"{snap_bytes / naive / 1024:.0f} KiB",
                     "1.000x", f"{naive / 3500:.0f} s", f"${naive * 0.005 / 1000:.2f}"])
    res.tables.append(tab)
    over = s2["total"] - s2["data"]
    res.notes.append(
        f"{snap_bytes / GiB:,.0f} GiB per snapshot ({total * item / GiB:,.0f} GiB per profile, fp32); per rank and "
        f"profile {max(rank_bytes) / MiB:.0f} MiB (max) in one shard of {s2['chunks'] // s2['shards']:.0f} inner "
        f"chunks; {pieces:,} shard pieces in all ({pieces / world:.0f} per rank). Format 2 stores the data plus "
        f"{over / MiB:.1f} MiB per snapshot ({over / s2['data'] * 1e6:.1f} ppm): {s2['crc'] / MiB:.1f} MiB of "
        f"crc32c (4 B per inner chunk), {s2['index'] / MiB:.1f} MiB of shard index (16 B per inner chunk + 4 B "
        f"per shard), {s2['padding'] / 1024:.0f} KiB of padding (at most {s2['max_pad_vs_count']:.2f} elements per "
        f"inner chunk). Object count: {o2['data']:,} shards + {o2['array_meta']:,} array zarr.json + "
        f"{o2['snapshot']} (group zarr.json, commit.json; +2 with buffers).")

    # metadata: written once per layout (not per snapshot)
    pj = len(layout.params_json().encode())
    rj = [len(layout.rank_json(r).encode()) for r in range(world)]
    meta = Table("Metadata (written once per layout; snapshots only reference the layout id)",
                 ["object", "count", "bytes"])
    meta.rows.append(["layouts/<id>/params.json", 1, f"{pj / 1024:.0f} KiB"])
    meta.rows.append(["layouts/<id>/rank-<r>.json", world, f"{sum(rj) / MiB:.1f} MiB in all, {max(rj) / 1024:.1f} KiB "
                                                           f"max"])
    res.tables.append(meta)

    # synthesis: units of the newest layout, split over synthesis ranks, 100 snapshots x 2 profiles
    need_total = sum(u.numel for u in units) * item * snapshots * PROFILES
    syn = Table(f"Synthesis of 1 target from {snapshots} snapshots x 2 profiles ({need_total / 2**40:.1f} TiB to "
                f"read), units of {unit_bytes / MiB:.0f} MiB cut at inner chunks, at {bw_rank / GiB:.0f} GiB/s per "
                f"rank, {bw_total / GiB:.0f} GiB/s aggregate",
                ["synthesis ranks", "units / rank (max)", "load balance max/mean", "read / rank (TiB)",
                 "fetched / needed", "time at the bandwidth"])
    times = {}
    for sw in synth_worlds:
        t0 = time.perf_counter()
        split = assign_units(units, sw)
        loads = [sum(u.numel for u in part) * item for part in split]
        fetched = [fetched_bytes(layout, part, DTYPE) for part in split]
        bw = min(bw_rank, bw_total / sw)
        t_read = max(fetched) * snapshots * PROFILES / bw
        amp = sum(fetched) / sum(loads)
        times[sw] = {"read_s": t_read, "amplification": amp, "plan_s": time.perf_counter() - t0}
        syn.rows.append([sw, max(len(p) for p in split), f"{max(loads) / (sum(loads) / sw):.3f}",
                         f"{max(fetched) * snapshots * PROFILES / 2**40:.2f}", f"{amp:.6f}x", _hms(t_read)])
    res.tables.append(syn)

    res.goals.append(Goal(f"objects per snapshot <= ranks x (profiles + 1) + 4 = {bound:,}",
                          f"{o2['total']:,} (format 1: {o1['total']:,}; chunk per rank per parameter: {naive:,})",
                          o2["total"] <= bound))
    res.goals.append(Goal("stored bytes <= 1.01x the data bytes", f"{s2['total'] / snap_bytes:.6f}x (format 1: "
                          f"{s1 / snap_bytes:.3f}x)", s2["total"] <= 1.01 * snap_bytes))
    exact = s2["total"] == s2["data"] + 20 * s2["chunks"] + 4 * s2["shards"] + s2["padding"] and \
        s2["max_pad_vs_count"] < 1.0
    res.goals.append(Goal("stored = data + 20 B per inner chunk (crc32c 4 + index entry 16) + 4 B per shard + < 1 "
                          "element of padding per inner chunk", f"+{over:,} B: {20 * s2['chunks']:,} + "
                          f"{4 * s2['shards']:,} + {s2['padding']:,} padding", exact))
    amp = times[synth_worlds[0]]["amplification"]
    res.goals.append(Goal("fetched / needed bytes in synthesis <= 1.01x (plan_units on the inner chunks)",
                          f"{amp:.6f}x (format 1: {s1 / snap_bytes:.3f}x, whole padded objects)", amp <= 1.01))
    check = (context or {}).get("train")
    if check and check.get("layout") and check.get("objects_first_snapshot") is not None:
        small = Layout.from_json(_params_doc(check["layout"]), _rank_docs(check["layout"]))
        predicted = objects_v2(small, PROFILES)["total"]
        on_disk = check["objects_first_snapshot"]
        res.goals.append(Goal("object-count model matches a real store (benchmark 3, FSDP2, 2 ranks)",
                              f"predicted {predicted} (+2 with buffers), on disk {on_disk}",
                              on_disk in (predicted, predicted + 2)))
    run_nd(res, quick)
    res.data |= {"objects_v2": o2, "objects_v1": o1, "naive_objects": naive, "snapshot_bytes": snap_bytes,
                "stored_v2": s2, "stored_v1": s1, "params_json_bytes": pj, "rank_json_bytes": sum(rj),
                "synthesis": times, "pieces": pieces, "unit_bytes": unit_bytes}
    return res


def _params_doc(lay: dict) -> str:
    import json

    return json.dumps({"params": lay["params"], "engine": "fsdp2", "world_size": len(lay["ranks"])})


def _rank_docs(lay: dict) -> list[str]:
    import json

    return [json.dumps({"rank": r, "numel": sum(p[2] for p in pieces), "pieces": pieces})
            for r, pieces in enumerate(lay["ranks"])]


def _hms(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


# ---- N-d layouts: torchtitan-style tensor x pipeline x FSDP2 parallelism, from the shapes alone ----


@dataclass(frozen=True)
class Dense:
    """A Llama-3-class dense transformer, torchtitan's parameter names."""

    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


LLAMA3_405B = Dense("405B", 126, 16384, 53248, 128, 8, 128, 128256)
LLAMA3_70B = Dense("70B", 80, 8192, 28672, 64, 8, 128, 128256)
TINY = Dense("tiny", 6, 64, 160, 4, 2, 16, 250)  # the quick run: uneven vocab and kv rows


@dataclass(frozen=True)
class Mesh:
    """pp x dp x tp ranks, tp innermost as in torchtitan's mesh: rank = (pp_coord * dp + dp_coord) * tp + tp_coord."""

    tp: int
    dp: int
    pp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.dp * self.pp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp, dp, tp) coordinates of ``rank``."""
        s, rest = divmod(rank, self.dp * self.tp)
        return (s, *divmod(rest, self.tp))

    def label(self) -> str:
        parts = [f"TP {self.tp}"] if self.tp > 1 else []
        parts += [f"PP {self.pp}"] if self.pp > 1 else []
        return " x ".join(parts + [f"FSDP {self.dp}"]) + f" ({self.world:,} ranks)"


# Placement kinds (torchtitan's plan + FSDP2 on dp):
#   col:  ColwiseParallel (and the embedding's RowwiseParallel): tp Shard(0), FSDP2 _StridedShard(0) on dp:
#         one contiguous block of rows of the tp-local rows per rank
#   row:  RowwiseParallel linear: tp Shard(1), FSDP2 Shard(0) on dp: an N-d box per rank
#   norm: SequenceParallel norms, Replicate on tp, FSDP2 Shard(0) on dp: the tp replicas split the writing
PLACEMENTS = {"col": "(_StridedShard(0, split_factor=tp), Shard(0))", "row": "(Shard(0), Shard(1))",
              "norm": "(Shard(0), Replicate())"}


def titan_params(m: Dense) -> list[tuple[str, tuple[int, ...], str, str]]:
    """[(fqn, shape, dtype, placement kind)] in module order (torchtitan's Llama 3 ``Transformer``)."""
    h, q, kv = m.hidden, m.heads * m.head_dim, m.kv_heads * m.head_dim
    out = [("tok_embeddings.weight", (m.vocab, h), DTYPE, "col")]
    for i in range(m.layers):
        p = f"layers.{i}"
        out += [(f"{p}.attention.wq.weight", (q, h), DTYPE, "col"),
                (f"{p}.attention.wk.weight", (kv, h), DTYPE, "col"),
                (f"{p}.attention.wv.weight", (kv, h), DTYPE, "col"),
                (f"{p}.attention.wo.weight", (h, q), DTYPE, "row"),
                (f"{p}.feed_forward.w1.weight", (m.ffn, h), DTYPE, "col"),
                (f"{p}.feed_forward.w2.weight", (h, m.ffn), DTYPE, "row"),
                (f"{p}.feed_forward.w3.weight", (m.ffn, h), DTYPE, "col"),
                (f"{p}.attention_norm.weight", (h,), DTYPE, "norm"),
                (f"{p}.ffn_norm.weight", (h,), DTYPE, "norm")]
    return out + [("norm.weight", (h,), DTYPE, "norm"), ("output.weight", (m.vocab, h), DTYPE, "col")]


def stage_modules(layers: int, stages: int) -> list[list[str]]:
    """Module prefixes per pipeline stage, split as torchtitan's ``generate_llm_fqn_per_model_part``: the
    embeddings and the output each weigh one layer, ``(layers + 2) / stages`` per stage (the first
    ``(layers + 2) % stages`` stages one more); the first stage holds the embeddings, the last norm and output."""
    per, extra = divmod(layers + 2, stages)
    out, nxt = [], 0
    for s in range(stages):
        n = per + (s < extra) - (s == 0) - (s == stages - 1)
        mods = (["tok_embeddings"] if s == 0 else []) + [f"layers.{i}" for i in range(nxt, nxt + n)]
        out.append(mods + (["norm", "output"] if s == stages - 1 else []))
        nxt += n
    if nxt != layers:
        raise ValueError(f"{layers} layers do not split into {stages} stages")
    return out


def titan_box(kind: str, shape: tuple[int, ...], mesh: Mesh, d: int, t: int):
    """Box ``((starts), (sizes))`` of the parameter rank (dp ``d``, tp ``t``) holds, None when it holds nothing.

    torch.chunk semantics on every dimension, as DTensor computes shards (``check_against_torch``)."""
    if kind == "col":
        t0, tn = chunk(shape[0], mesh.tp, t)
        d0, dn = chunk(tn, mesh.dp, d)
        return ((t0 + d0, *(0,) * (len(shape) - 1)), (dn, *shape[1:])) if dn else None
    r0, rn = chunk(shape[0], mesh.dp, d)
    if kind == "norm":
        return ((r0,), (rn,)) if rn else None
    c0, cn = chunk(shape[1], mesh.tp, t)
    return ((r0, c0), (rn, cn)) if rn and cn else None


def stage_tables(m: Dense, mesh: Mesh) -> list[list[tuple]]:
    """Per pipeline stage, its parameters (``titan_params`` rows) in module order."""
    table = titan_params(m)
    out = []
    for mods in stage_modules(m.layers, mesh.pp):
        keep = set(mods)
        out.append([row for row in table if _module_of(row[0]) in keep])
    return out


def _module_of(fqn: str) -> str:
    """``layers.<i>`` for a layer's parameter, else the top-level module (``tok_embeddings``, ``norm``, ``output``)."""
    parts = fqn.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


def tracked_pieces(stages: list[list[tuple]], mesh: Mesh, rank: int) -> list[tuple]:
    """Every piece rank ``rank`` holds and tracks: [(fqn, start, numel, box, replicated over tp)], in its stage's
    module order, in canonical form (flat ranges where the elements are contiguous, as the FSDP2 adapter lists them)."""
    from dist_ema.store.layout import canonical_piece

    s, d, t = mesh.coords(rank)
    out = []
    for fqn, shape, _, kind in stages[s]:
        box = titan_box(kind, shape, mesh, d, t)
        if box is not None:
            start, numel, b = canonical_piece(shape, 0, math.prod(box[1]), box)
            out.append((fqn, start, numel, b, kind == "norm" and mesh.tp > 1))
    return out


def owner_pieces(tracked: list[tuple], replica: int, replicas: int) -> list[tuple]:
    """The (fqn, start, numel, box) a rank writes: its own pieces, and its part of the pieces its ``replicas``
    tp replicas hold too (all of one rank's replicated pieces have the same holders: one ``replica_cuts``)."""
    from dist_ema.sharding.base import replica_cuts

    rep = [p for p in tracked if p[4]]
    cuts = iter(replica_cuts([p[2] for p in rep], replica, replicas)) if rep else iter(())
    out = []
    for fqn, start, numel, box, replicated in tracked:
        if not replicated:
            out.append((fqn, start, numel, box))
            continue
        out.extend((fqn, start + x, y - x, box) for x, y, owned in next(cuts) if owned)
    return out


def titan_layout(m: Dense, mesh: Mesh):
    """(Layout of the store, the stage tables) of ``m`` on ``mesh``; under pipeline parallelism the parameter
    table is the stages' union sorted by name (what the layout check gives), else module order."""
    from dist_ema.store.layout import Layout

    stages = stage_tables(m, mesh)
    ranks = [owner_pieces(tracked_pieces(stages, mesh, r), mesh.coords(r)[2], mesh.tp) for r in range(mesh.world)]
    table = [(f, s, dt) for f, s, dt, _ in titan_params(m)]
    if mesh.pp > 1:
        table.sort()
    return Layout.build(table, ranks, "fsdp2"), stages


def check_against_torch(m: Dense, mesh: Mesh, ranks: list[int]) -> int:
    """Compare ``titan_box`` with DTensor's own per-dimension shard indices (``torch.distributed.tensor._utils.
    _get_shard_size_and_offsets``, placements as FSDP2 over tp makes them) for every parameter of ``ranks``;
    returns the number of (rank, parameter) pairs checked, raises on the first difference."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _get_shard_size_and_offsets
    from torch.distributed.tensor.placement_types import _StridedShard

    placements = {"col": (_StridedShard(0, split_factor=mesh.tp), Shard(0)), "row": (Shard(0), Shard(1)),
                  "norm": (Shard(0), Replicate())}
    stages = stage_tables(m, mesh)
    n = 0
    for r in ranks:
        s, d, t = mesh.coords(r)
        for fqn, shape, _, kind in stages[s]:
            local, index = list(shape), {}
            for pl, size, coord in zip(placements[kind], (mesh.dp, mesh.tp), (d, t)):
                if isinstance(pl, Replicate):
                    continue
                got, idx = _get_shard_size_and_offsets(local[pl.dim], size, coord, pl, index.get(pl.dim),
                                                       shape[pl.dim], False)
                local[pl.dim], index[pl.dim] = int(got), idx
            want = None if 0 in local else (
                tuple(int(index[k][0]) if k in index else 0 for k in range(len(shape))), tuple(local))
            if want is not None:
                for k, idx in index.items():
                    run = idx[: local[k]].tolist()
                    if run != list(range(run[0], run[0] + len(run))):
                        raise AssertionError(f"{fqn} on rank {r}: torch gives non-contiguous indices on dim {k}")
            mine = titan_box(kind, shape, mesh, d, t)
            if mine != want:
                raise AssertionError(f"{fqn} on rank {r} (pp {s}, dp {d}, tp {t}): box {mine}, torch gives {want}")
            n += 1
    return n


def rank_arrays(layout, values: dict) -> list:
    """Each rank's stored array, filled from full parameter ``values`` with numpy (independent of the planner)."""
    import numpy as np

    out = []
    for pieces in layout.ranks:
        parts = [_piece_values(values[layout.params[p][0]], s, n, b) for p, s, n, _, b in pieces]
        out.append(np.concatenate(parts) if parts else np.zeros(0))
    return out


def _piece_values(full, start: int, numel: int, box):
    """Elements [start, start + numel) of the row-major order of ``box`` of ``full`` (or of all of it)."""
    region = full if box is None else full[tuple(slice(a, a + n) for a, n in zip(*box))]
    return region.reshape(-1)[start:start + numel]


def execute(reads, arrays, numel: int):
    """Run planned reads (strided ones included) on in-memory rank arrays; counts how often each element is set."""
    import numpy as np

    out, hits = np.zeros(numel), np.zeros(numel, dtype=np.int64)
    for rd in reads:
        for i in range(rd.rows):
            a, b = rd.src + i * rd.src_stride, rd.dst + i * rd.dst_stride
            out[b:b + rd.numel] = arrays[rd.rank][a:a + rd.numel]
            hits[b:b + rd.numel] += 1
    return out, hits


def check_small(m: Dense, src_mesh: Mesh, dst_meshes: list[Mesh]) -> str:
    """On a small model: every element covered once (numpy count), and every rank of every ``dst_meshes`` layout
    resumed from a ``src_mesh`` store through ``plan_region`` gets exactly its values (numpy execution)."""
    import numpy as np

    from dist_ema.store.layout import merge_reads, plan_region

    rng = np.random.default_rng(0)
    values = {f: rng.standard_normal(s) for f, s, _, _ in titan_params(m)}
    src, _ = titan_layout(m, src_mesh)
    count = {f: np.zeros(math.prod(s), dtype=np.int64) for f, s, _, _ in titan_params(m)}
    for pieces in src.ranks:
        for p, s, n, _, b in pieces:
            fqn, shape, _ = src.params[p]
            np.add.at(count[fqn], _piece_values(np.arange(math.prod(shape)).reshape(shape), s, n, b), 1)
    bad = [f for f, c in count.items() if not np.all(c == 1)]
    if bad:
        raise AssertionError(f"{src_mesh.label()}: not covered exactly once: {bad[:3]}")
    arrays, index, fidx = rank_arrays(src, values), src.piece_index(), src.fqn_index()
    checked = 0
    for mesh in dst_meshes:
        stages = stage_tables(m, mesh)
        for r in range(mesh.world):
            for fqn, start, numel, box, _ in tracked_pieces(stages, mesh, r):
                got, hits = execute(merge_reads(plan_region(index[fidx[fqn]], start, start + numel, box)), arrays,
                                    numel)
                if not (np.all(hits == 1) and np.array_equal(got, _piece_values(values[fqn], start, numel, box))):
                    raise AssertionError(f"resume of {fqn} on rank {r} of {mesh.label()} from {src_mesh.label()}")
                checked += 1
    return f"{src_mesh.label()}: coverage exact; {checked} pieces of {', '.join(x.label() for x in dst_meshes)} " \
           f"resumed from it bit for bit"


def _rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure_layout(m: Dense, mesh: Mesh) -> dict:
    """Build, validate, serialize and index one N-d layout; objects and bytes per snapshot."""
    from dist_ema.store.layout import Layout

    (lay, stages), build_s = _timed(lambda: titan_layout(m, mesh))
    _, validate_s = _timed(lay.validate)
    pj = lay.params_json()
    rj, json_s = _timed(lambda: [lay.rank_json(r) for r in range(mesh.world)])
    _, id_s = _timed(lay.layout_id)
    _, load_s = _timed(lambda: Layout.from_json(pj, rj))
    index, index_s = _timed(lay.piece_index)
    pieces = [x for r in lay.ranks for x in r]
    total = lay.total_numel
    o2, s2 = objects_v2(lay, PROFILES), stored_v2(lay, PROFILES, DTYPE)
    return {"model": m, "mesh": mesh, "layout": lay, "stages": stages, "index": index, "params_b": total / 1e9,
            "pieces": len(pieces), "boxed": sum(1 for x in pieces if x[4] is not None),
            "pieces_per_rank": max(len(r) for r in lay.ranks), "objects": o2, "stored": s2,
            "data_bytes": total * 4 * PROFILES, "params_json": len(pj.encode()),
            "rank_json": sum(len(x.encode()) for x in rj), "rank_json_max": max(len(x.encode()) for x in rj),
            "build_s": build_s, "validate_s": validate_s, "json_s": json_s, "id_s": id_s, "from_json_s": load_s,
            "index_s": index_s, "rss_mib": _rss_mib()}


def measure_resume(src: dict, mesh: Mesh, ranks: list[int]) -> dict:
    """Plan the reads that resume ``ranks`` of ``mesh`` from a store of ``src``'s layout (the reader's
    ``read_pieces``: ``plan_region`` for every tracked piece, then ``merge_reads``)."""
    from dist_ema.store.layout import merge_reads, plan_region

    lay, index = src["layout"], src["index"]
    fidx = lay.fqn_index()
    stages = stage_tables(src["model"], mesh)
    out = {"mesh": mesh, "ranks": {}}
    for r in ranks:
        tracked = tracked_pieces(stages, mesh, r)
        t0 = time.perf_counter()
        reads = [rd for fqn, s, n, b, _ in tracked for rd in plan_region(index[fidx[fqn]], s, s + n, b)]
        merged = merge_reads(reads)
        dt = time.perf_counter() - t0
        out["ranks"][r] = {"pieces": len(tracked), "numel": sum(x[2] for x in tracked), "reads": len(reads),
                           "merged": len(merged), "strided": sum(1 for x in merged if x.rows > 1),
                           "runs": sum(x.rows for x in merged), "src_ranks": len({x.rank for x in merged}),
                           "plan_s": dt}
    return out


def measure_synthesis(src: dict, other: dict | None = None, synth_world: int = 64) -> dict:
    """Synthesis planning on ``src``'s layout: ``plan_units``, ``unit_segments`` of every unit, the output layout
    (``Layout.build`` of the units, as ``synthesis._plan``), ``translate`` of every unit into the same layout (what
    a snapshot of another layout id costs; same-layout snapshots take the identity read) and into ``other``'s
    layout, ``assign_units`` and ``units.index`` for one rank of ``synth_world``."""
    from dist_ema.store.layout import Layout, assign_units, merge_reads, translate, unit_segments

    lay = src["layout"]
    (units, unit_bytes), units_s = _timed(lambda: synthesis_units(lay, DTYPE))
    segs, segs_s = _timed(lambda: [unit_segments(lay, u) for u in units])
    out_pieces = [[(lay.params[p][0], s, n, b) for p, s, n, _, b in sg] for sg in segs]
    _, out_s = _timed(lambda: Layout.build(lay.params, out_pieces, "synthesized"))
    res = {"units": len(units), "unit_mib": unit_bytes / MiB, "plan_units_s": units_s, "segments_s": segs_s,
           "segments": sum(len(s) for s in segs), "out_layout_s": out_s}
    targets = [("same", src)] + ([("other", other)] if other else [])
    for name, tgt in targets:
        idx, idx_s = _timed(lambda tgt=tgt: tgt["layout"].piece_index(lay))
        reads, tr_s = _timed(lambda idx=idx: [merge_reads(translate(idx, sg)) for sg in segs])
        res[name] = {"mesh": tgt["mesh"], "index_s": idx_s, "translate_s": tr_s, "reads": sum(map(len, reads)),
                     "strided": sum(1 for rs in reads for x in rs if x.rows > 1)}
    split, res["assign_s"] = _timed(lambda: assign_units(units, synth_world))
    _, res["index_of_s"] = _timed(lambda: [units.index(u) for u in split[0]])
    res["synth_world"] = synth_world
    res["rss_mib"] = _rss_mib()
    return res


def run_nd(res: Result, quick: bool = False) -> None:
    """N-d layouts (tensor x pipeline x FSDP2, torchtitan-style), measured into ``res``."""
    t_start = time.perf_counter()
    if quick:
        cases = [(TINY, Mesh(2, 3, 2), [Mesh(2, 2, 2), Mesh(1, 5)]), (TINY, Mesh(4, 3), [Mesh(4, 2), Mesh(1, 7)])]
    else:
        cases = [(LLAMA3_405B, Mesh(8, 128, 16), [Mesh(8, 64, 16)]),
                 (LLAMA3_70B, Mesh(8, 128), [Mesh(8, 64), Mesh(1, 512)])]
    small = [check_small(TINY, Mesh(2, 3, 2), [Mesh(4, 5), Mesh(1, 7), Mesh(2, 2, 3), Mesh(3, 2, 2)]),
             check_small(TINY, Mesh(4, 3), [Mesh(2, 3, 2), Mesh(1, 5)])]
    lay_tab = Table("N-d layouts (torchtitan-style, built from the shapes: wq/wk/wv/w1/w3/embeddings/output "
                    "tp Shard(0) + FSDP2 _StridedShard(0), wo/w2 tp Shard(1) + FSDP2 Shard(0) = a box per rank, "
                    "norms Replicate on tp + FSDP2 Shard(0) split among the tp replicas)",
                    ["model on mesh", "pieces (of them boxes)", "pieces / rank (max)", "objects / snapshot (bound)",
                     "stored / data bytes", "params.json + rank JSON (max per rank)",
                     "pieces generated + Layout.build (of it validate)",
                     "from_json / layout_id / piece_index", "peak RSS"])
    res_tab = Table("Resume planning: one rank's tracked pieces read from the store (plan_region per piece + "
                    "merge_reads, as SnapshotReader.read_pieces)",
                    ["store layout", "resumed at", "rank", "pieces", "reads (strided; row runs)", "source ranks",
                     "plan time"])
    syn_tab = Table("Synthesis planning on the store layout (synthesis._plan: plan_units, unit_segments of every unit, "
                    "the output layout; translate of every unit into a layout: into the same layout only if the "
                    "identity read of _Sources.reads were not taken)",
                    ["store layout", "units (MiB)", "plan_units", "unit_segments (segments)", "output Layout.build",
                     "translate into", "piece_index(order)", "translate all units (reads; strided)",
                     "assign_units + units.index, 1 of N ranks"])
    checked = 0
    worst = {"step": "", "s": 0.0}
    goals_ok = {"objects": True, "bytes": True}
    for m, mesh, resumes in cases:
        ranks_to_check = sorted({0, mesh.world - 1, mesh.world // 2 + mesh.tp + 1, mesh.world - mesh.tp})
        checked += check_against_torch(m, mesh, ranks_to_check)
        src = measure_layout(m, mesh)
        for name in ("build_s", "from_json_s", "index_s"):
            if src[name] > worst["s"]:
                worst = {"step": f"{name[:-2]} of {m.name} {mesh.label()}", "s": src[name]}
        o, s = src["objects"], src["stored"]
        bound = mesh.world * (PROFILES + 1) + 4
        goals_ok["objects"] &= o["total"] <= bound
        goals_ok["bytes"] &= s["total"] <= 1.01 * src["data_bytes"]
        label = f"{m.name} ({src['params_b']:.1f}B params) on {mesh.label()}"
        lay_tab.rows.append([label, f"{src['pieces']:,} ({src['boxed']:,})", src["pieces_per_rank"],
                             f"{o['total']:,} ({bound:,})", f"{s['total'] / src['data_bytes']:.6f}x",
                             f"{(src['params_json'] + src['rank_json']) / MiB:.1f} MiB "
                             f"({src['rank_json_max'] / 1024:.1f} KiB)",
                             f"{src['build_s']:.1f} s ({src['validate_s']:.1f} s)",
                             f"{src['from_json_s']:.1f} / {src['id_s']:.2f} / {src['index_s']:.1f} s",
                             f"{src['rss_mib']:,.0f} MiB"])
        for target in resumes:
            rr = measure_resume(src, target, [0, target.world - 1])
            for r, x in rr["ranks"].items():
                res_tab.rows.append([f"{m.name} {mesh.label()}", target.label(), r, x["pieces"],
                                     f"{x['merged']:,} ({x['strided']:,}; {x['runs']:,})", x["src_ranks"],
                                     f"{x['plan_s'] * 1e3:.0f} ms"])
        other = measure_layout(m, resumes[-1]) if m is not LLAMA3_405B else None
        syn = measure_synthesis(src, other)
        for name in ("segments_s", "out_layout_s"):
            if syn[name] > worst["s"]:
                worst = {"step": f"{name[:-2]} of {m.name} {mesh.label()}", "s": syn[name]}
        for key in ("same", "other"):
            if key not in syn:
                continue
            x = syn[key]
            if x["translate_s"] > worst["s"]:
                worst = {"step": f"translate of every unit of {m.name} {mesh.label()} into {x['mesh'].label()}",
                         "s": x["translate_s"]}
            syn_tab.rows.append([f"{m.name} {mesh.label()}", f"{syn['units']:,} ({syn['unit_mib']:.0f})",
                                 f"{syn['plan_units_s']:.2f} s", f"{syn['segments_s']:.1f} s ({syn['segments']:,})",
                                 f"{syn['out_layout_s']:.1f} s", x["mesh"].label(), f"{x['index_s']:.1f} s",
                                 f"{x['translate_s']:.1f} s ({x['reads']:,}; {x['strided']:,})",
                                 f"{syn['assign_s'] + syn['index_of_s']:.2f} s (N = {syn['synth_world']})"])
        res.data.setdefault("nd", []).append(
            {"model": m.name, "mesh": mesh.label(), **{k: v for k, v in src.items()
                                                       if k not in ("model", "mesh", "layout", "index", "stages")},
             "synthesis": {k: (v if not isinstance(v, dict) else {**v, "mesh": v["mesh"].label()})
                           for k, v in syn.items()}})
        del src, other
    res.tables += [lay_tab, res_tab, syn_tab]
    res.goals.append(Goal("N-d layouts: objects per snapshot <= ranks x (profiles + 1) + 4",
                          "; ".join(r[3] for r in lay_tab.rows), goals_ok["objects"]))
    res.goals.append(Goal("N-d layouts: stored bytes <= 1.01x the data bytes", "; ".join(r[4] for r in lay_tab.rows),
                          goals_ok["bytes"]))
    res.goals.append(Goal("N-d boxes agree with DTensor's own shard indices (torch _get_shard_size_and_offsets)",
                          f"{checked:,} (rank, parameter) pairs of the measured layouts", True))
    res.goals.append(Goal("small N-d layouts: exact coverage (numpy count) and resume reads bit for bit (numpy)",
                          "; ".join(small), True))
    peak = _rss_mib()
    res.goals.append(Goal("every planning step < 60 s and peak memory < 8 GiB",
                          f"slowest: {worst['step']} {worst['s']:.1f} s; peak RSS {peak:,.0f} MiB",
                          worst["s"] < 60 and peak < 8 * 1024))
    res.config["nd_s"] = round(time.perf_counter() - t_start, 1)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.scale [--quick]``: this benchmark alone, written to bench/results/scale[-quick].md/.json."""
    import argparse
    import json
    import os

    from bench.common import ROOT, machine
    from bench.run import render_md

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--quick", action="store_true", help="small models and meshes: a smoke test")
    args = p.parse_args(argv)
    doc = {"command": "python -m bench.scale" + (" --quick" if args.quick else ""), "quick": args.quick,
           "threads": 1, "machine": machine()}
    t0 = time.perf_counter()
    res = run(args.quick)
    res.seconds = time.perf_counter() - t0
    doc["results"] = [res.to_json()]
    doc["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    stem = ROOT / "bench" / "results" / ("scale-quick" if args.quick else "scale")
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str))
    stem.with_suffix(".md").write_text(render_md(doc))
    print(render_md(doc))
    return 0 if all(g.met is not False for g in res.goals) else 1


if __name__ == "__main__":
    raise SystemExit(main())
