"""Benchmark 7: scale model of a 70B-parameter model on 1,024 FSDP2 ranks, 2 profiles.

Nothing is trained or written: the project's own planning code is run on synthetic shard
records. Every rank's pieces come from FSDP2 ``Shard(0)`` chunking (``_chunk_rows`` of the
FSDP2 adapter, ``torch.chunk`` semantics) of a Llama-3-70B-like parameter table
(80 layers x 9 tensors + embeddings, final norm and head: 723 tensors, 70.6B parameters);
``Layout.build`` validates and indexes them; ``chunk_elems`` / ``plan_units`` give the
stored objects; ``plan_units`` + ``assign_units`` give the synthesis work split.

Objects per snapshot follow the writer (``store/writer.py``, ``store/io.py``): per rank and
profile, the rank array's data objects plus its ``zarr.json``; per rank a group
``zarr.json``; rank 0 adds the snapshot's ``zarr.json`` and ``commit.json``. The same count
is checked against a real 2-rank FSDP2 store written by benchmark 3 (when it ran).
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


def objects_per_snapshot(layout, profiles: int, dtype: str, max_object_bytes: int) -> dict:
    """Objects one snapshot writes, from the layout and the writer's rules."""
    from dist_ema.store.layout import plan_units

    data = len(plan_units(layout, dtype, max_object_bytes)) * profiles  # plan_units = the stored objects
    nonempty = sum(1 for r in range(layout.world_size) if layout.rank_numel(r))
    return {"data": data, "array_meta": nonempty * profiles, "rank_groups": layout.world_size, "snapshot": 2,
            "total": data + nonempty * profiles + layout.world_size + 2}


def fetched_bytes(layout, units, dtype: str, max_object_bytes: int) -> int:
    """Bytes synthesis fetches for these units from ONE profile of ONE same-layout snapshot.

    Objects carry a checksum over the whole object (crc32c codec), so reading any part of an
    object fetches all of it: a unit fetches every object it overlaps. zarr stores the last
    (edge) chunk of an array full-size, padded with the fill value, so every object is ``c`` elements.
    """
    from dist_ema.store.layout import STORAGE_DTYPES, chunk_elems

    item = STORAGE_DTYPES[dtype]
    total = 0
    for u in units:
        c = chunk_elems(layout.rank_numel(u.rank), dtype, max_object_bytes)
        total += ((u.start + u.numel - 1) // c - u.start // c + 1) * c * item
    return total


def stored_bytes(layout, profiles: int, dtype: str, max_object_bytes: int) -> int:
    """Bytes one snapshot stores: every object is a full chunk (zarr pads the edge chunk)."""
    from dist_ema.store.layout import STORAGE_DTYPES, chunk_elems

    total = 0
    for r in range(layout.world_size):
        n = layout.rank_numel(r)
        if n:
            c = chunk_elems(n, dtype, max_object_bytes)
            total += -(-n // c) * c
    return total * STORAGE_DTYPES[dtype] * profiles


def run(quick: bool = False, context: dict | None = None) -> Result:
    import dist_ema.synthesis as lib
    from dist_ema.store.layout import DEFAULT_MAX_OBJECT_BYTES, STORAGE_DTYPES, Layout, assign_units, plan_units

    # synthesis' default work unit: a fixed size in older versions, the stored objects now
    unit_bytes = getattr(lib, "DEFAULT_UNIT_BYTES", None) or DEFAULT_MAX_OBJECT_BYTES

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
    res.config = {"tensors": len(params), "params_b": round(total / 1e9, 2), "world": world, "profiles": PROFILES,
                  "storage_dtype": DTYPE, "max_object_bytes_mib": DEFAULT_MAX_OBJECT_BYTES / MiB,
                  "synthesis_unit_mib": unit_bytes / MiB, "layout_build_s": round(build_s, 1)}

    obj = objects_per_snapshot(layout, PROFILES, DTYPE, DEFAULT_MAX_OBJECT_BYTES)
    pieces = sum(len(r) for r in layout.ranks)
    snap_bytes = total * item * PROFILES
    rank_bytes = [layout.rank_numel(r) * item for r in range(world)]
    naive = pieces * PROFILES
    stored = stored_bytes(layout, PROFILES, DTYPE, DEFAULT_MAX_OBJECT_BYTES)
    tab = Table("Objects and bytes per snapshot", ["layout", "objects / snapshot", "data objects", "bytes / object "
                                                   "(mean)", "stored / data bytes", "PUT time at 3,500/s per prefix",
                                                   "PUT cost at $0.005 / 1k"])
    tab.rows.append([f"dist-ema: one flat array per rank and profile, objects <= "
                     f"{DEFAULT_MAX_OBJECT_BYTES / MiB:.0f} MiB", f"{obj['total']:,}", f"{obj['data']:,}",
                     f"{stored / obj['data'] / MiB:.0f} MiB", f"{stored / snap_bytes:.3f}x",
                     f"{obj['total'] / 3500:.1f} s", f"${obj['total'] * 0.005 / 1000:.2f}"])
    tab.rows.append(["chunk per rank per parameter", f"{naive:,}", f"{naive:,}", f"{snap_bytes / naive / 1024:.0f} KiB",
                     "1.000x", f"{naive / 3500:.0f} s", f"${naive * 0.005 / 1000:.2f}"])
    res.tables.append(tab)
    res.notes.append(
        f"{snap_bytes / GiB:,.0f} GiB per snapshot ({total * item / GiB:,.0f} GiB per profile, fp32); per rank and "
        f"profile {max(rank_bytes) / MiB:.0f} MiB (max) = {math.ceil(max(rank_bytes) / DEFAULT_MAX_OBJECT_BYTES)} "
        f"data objects; {pieces:,} shard pieces in all ({pieces / world:.0f} per rank). Object count per snapshot: "
        f"{obj['data']:,} data + {obj['array_meta']:,} array zarr.json + {obj['rank_groups']:,} rank groups + 2.")

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
    layout.layout_id()
    t0 = time.perf_counter()
    layout.layout_id()  # a repeated call: what synthesis' reader pays per read (it asks once per read)
    lid_s = time.perf_counter() - t0
    units = plan_units(layout, DTYPE, unit_bytes)
    need_total = sum(u.numel for u in units) * item * snapshots * PROFILES
    syn = Table(f"Synthesis of 1 target from {snapshots} snapshots x 2 profiles ({need_total / 2**40:.1f} TiB to "
                f"read), at {bw_rank / GiB:.0f} GiB/s per rank, {bw_total / GiB:.0f} GiB/s aggregate",
                ["synthesis ranks", "units / rank (max)", "load balance max/mean", "read / rank (TiB)",
                 "time, ideal reads", "fetched / needed (current reader)", "time, current reader",
                 "layout_id() CPU / rank (current reader)"])
    times = {}
    for sw in synth_worlds:
        t0 = time.perf_counter()
        split = assign_units(units, sw)
        loads = [sum(u.numel for u in part) * item for part in split]
        fetched = [fetched_bytes(layout, part, DTYPE, DEFAULT_MAX_OBJECT_BYTES) for part in split]
        bw = min(bw_rank, bw_total / sw)
        ideal = max(loads) * snapshots * PROFILES / bw
        current = max(fetched) * snapshots * PROFILES / bw
        amp = sum(fetched) / sum(loads)
        times[sw] = {"ideal_s": ideal, "current_s": current, "amplification": amp,
                     "plan_s": time.perf_counter() - t0}
        reads = max(len(p) for p in split) * snapshots * PROFILES
        times[sw]["layout_id_cpu_s"] = reads * lid_s
        syn.rows.append([sw, max(len(p) for p in split), f"{max(loads) / (sum(loads) / sw):.3f}",
                         f"{max(loads) * snapshots * PROFILES / 2**40:.2f}", _hms(ideal), f"{amp:.2f}x",
                         _hms(current), _hms(reads * lid_s)])
    res.tables.append(syn)

    res.goals.append(Goal("a snapshot stores its data bytes (no padding)", f"{stored / snap_bytes:.3f}x", stored <=
                          1.01 * snap_bytes, "zarr stores each rank array's last chunk full-size: a "
                          f"{max(rank_bytes) / MiB:.0f} MiB rank array in {DEFAULT_MAX_OBJECT_BYTES / MiB:.0f} MiB "
                          "chunks is written, stored and read as whole chunks; equal chunks (numel / ceil(bytes / "
                          "max_object_bytes)) would pad by < 1 element per object"))
    per = math.ceil(max(rank_bytes) / DEFAULT_MAX_OBJECT_BYTES)  # data objects of the largest rank array
    res.goals.append(Goal("objects per snapshot grow with ranks x profiles (a few per rank and profile), not "
                          "ranks x parameters", f"{obj['total']:,} vs {naive:,} chunk-per-rank-per-parameter "
                          f"({naive / obj['total']:.0f}x fewer)",
                          obj["total"] <= world * PROFILES * (per + 1) + world + 2 and obj["total"] * 10 < naive))
    amp = times[synth_worlds[0]]["amplification"]
    res.goals.append(Goal("synthesis reads each stored byte once", f"fetched/needed {amp:.2f}x", amp <= 1.05,
                          f"objects are fetched whole (one checksum per object), so a unit fetches every object it "
                          f"overlaps, padding included: units of {unit_bytes / MiB:.0f} MiB, objects of "
                          f"{DEFAULT_MAX_OBJECT_BYTES / MiB:.0f} MiB with the last one of each rank array padded "
                          f"to full size (measured in benchmark 5)"))
    res.goals.append(Goal("per-read CPU of the synthesis reader independent of the layout size",
                          f"layout_id() {lid_s * 1e3:.2f} ms per read", lid_s < 0.01,
                          "synthesis.py _map_units.read() asks layout.layout_id() on every read; uncached it "
                          "re-serializes and hashes the whole layout JSON (0.4-0.7 s at this size)"))
    check = (context or {}).get("train")
    if check and check.get("layout") and check.get("objects_first_snapshot") is not None:
        small = Layout.from_json(_params_doc(check["layout"]), _rank_docs(check["layout"]))
        predicted = objects_per_snapshot(small, PROFILES, DTYPE, check["max_object_bytes"])["total"]
        on_disk = check["objects_first_snapshot"]
        res.goals.append(Goal("object-count model matches a real store (benchmark 3, FSDP2, 2 ranks)",
                              f"predicted {predicted}, on disk {on_disk}", predicted == on_disk))
    res.data = {"objects": obj, "naive_objects": naive, "snapshot_bytes": snap_bytes, "stored_bytes": stored,
                "params_json_bytes": pj,
                "rank_json_bytes": sum(rj), "synthesis": times, "pieces": pieces, "layout_id_s": lid_s}
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
