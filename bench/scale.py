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


def fsdp2_pieces(params, world: int) -> list[list[tuple[str, int, int]]]:
    """Each rank's owned (fqn, flat_start, numel) under FSDP2 Shard(0), in parameter order."""
    from dist_ema.sharding.fsdp2 import _chunk_rows

    ranks: list[list[tuple[str, int, int]]] = [[] for _ in range(world)]
    for fqn, shape, _ in params:
        row = math.prod(shape[1:])
        for r in range(world):
            row0, rows = _chunk_rows(shape[0], world, r)
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
    res.data = {"objects_v2": o2, "objects_v1": o1, "naive_objects": naive, "snapshot_bytes": snap_bytes,
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
