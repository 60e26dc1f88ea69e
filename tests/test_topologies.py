"""Every layout the adapters accept, end to end: track, snapshot, resume, synthesize.

One case is one engine and layout on N real gloo ranks (real FSDP2/FSDP1/DDP/DeepSpeed):

1. this process seeds a store with a 1-rank plain TinyNet (3 steps; snapshots at steps 2, 3);
2. the layout under test resumes from it (another world size and layout), trains 3 steps with a
   snapshot every 2 updates (steps 4 and 6), records the full parameters after every step and the gathered EMA at
   every snapshot, and synthesizes two targets on its N ranks;
3. this process checks, from what the ranks saved and from the store:
   - track: the EMA == brute force over the whole trajectory (weights from the telescoped
     betas, computed here, nothing from dist_ema);
   - snapshot: every snapshot reads back == the gathered EMA when it was taken (bitwise);
   - resume: the resumed EMA == the seed's last snapshot (bitwise), and a 1-rank plain EMA
     resumed from the layout's last snapshot == that snapshot (bitwise);
   - synthesize: N-rank synthesis == 1-rank synthesis here (bitwise); the tracked target ==
     brute force; the untracked one == a least-squares reconstruction computed here;
   - writing: a rank that owns nothing writes no data object, the R replicas of a shard group
     write equal shares (at most one element apart), data objects <= ranks x profiles.

Cases that share a world size run in the same worker processes, one after the other (each
with its own store), so the processes start once per group. One group runs as a simulated
two-node job: two torchrun processes with ``--nnodes 2`` on 127.0.0.1, HSDP across the nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.dist_harness import ROOT, free_port, run_workers
from tests.engines import HYBRID, ND, build

SIGMAS = (0.05, 0.10)  # tracked
TARGETS = (0.10, 0.15)  # synthesized: one tracked, one not
SEED_STEPS, STEPS, EVERY = 3, 3, 2  # the layout's snapshots: steps 4 and 6 (its last step)


# ----------------------------------------------------------------------------- brute force (no dist_ema)


def gamma_of(sigma_rel: float) -> float:
    """Largest real root of g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2) = 0 (EDM2)."""
    s2 = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def brute_ema(traj: list[dict[str, torch.Tensor]], sigma_rel: float) -> dict[str, torch.Tensor]:
    """EMA after len(traj) unit steps: beta_t = (1 - 1/t)^(g+1), telescoped into per-step weights."""
    g = gamma_of(sigma_rel)
    w = np.zeros(len(traj))
    for t in range(1, len(traj) + 1):
        beta = (1.0 - 1.0 / t) ** (g + 1)
        w *= beta
        w[t - 1] = 1.0 - beta
    return {k: sum(float(wi) * th[k] for wi, th in zip(w, traj)) for k in traj[0]}


def inner(ta: float, ga: float, tb: float, gb: float) -> float:
    """<p_a, p_b> of two truncated power functions (DESIGN.md)."""
    return (ga + 1) * (gb + 1) * min(ta, tb) ** (ga + gb + 1) / ((ga + gb + 1) * ta ** (ga + 1) * tb ** (gb + 1))


def reconstruct(snaps: dict[int, dict[float, dict[str, torch.Tensor]]], sigma_rel: float, t: float):
    """Least squares over every (snapshot, profile) with t_i <= t, coefficients rescaled to sum 1."""
    basis = [(float(ti), s) for ti in sorted(snaps) if ti <= t for s in SIGMAS]
    A = np.array([[inner(ta, gamma_of(sa), tb, gamma_of(sb)) for tb, sb in basis] for ta, sa in basis])
    b = np.array([inner(ta, gamma_of(sa), t, gamma_of(sigma_rel)) for ta, sa in basis])
    x = np.linalg.solve(A, b)
    x /= x.sum()
    return {k: sum(float(xi) * snaps[int(ti)][s][k].double() for xi, (ti, s) in zip(x, basis))
            for k in snaps[int(basis[0][0])][SIGMAS[0]]}


# ----------------------------------------------------------------------------- training runs


def _gathered(ema) -> dict[float, dict[str, torch.Tensor]]:
    return {s: ema.full_state_dict(sigma_rel=s) for s in SIGMAS}


def seed_store(url: str) -> dict:
    """1-rank plain model, no process group: the store every case resumes from."""
    from dist_ema import PostHocEMA

    setup = build("replicated")
    ema = PostHocEMA(setup.target, sigma_rels=SIGMAS, store=url, snapshot_every=EVERY, writer="sync")
    traj, snaps = [], {}
    for _ in range(SEED_STEPS):
        setup.step()
        assert ema.update()
        traj.append(setup.full_params())
        if ema.updates % EVERY == 0:
            snaps[ema.step] = _gathered(ema)
    assert ema.snapshot() is not None
    snaps[ema.step] = _gathered(ema)
    ema.close()
    return {"traj": traj, "snaps": snaps}


def _canonical(ema) -> list[torch.Tensor]:
    """Each profile's EMA of every element this rank holds, ordered by (parameter, element)."""
    order = sorted(range(len(ema.pieces)), key=lambda i: (ema.pieces[i].fqn, ema.pieces[i].flat_start))
    return [torch.cat([prof.views[i] for i in order]) if order else prof.flat.clone() for prof in ema.profiles]


def _by_piece(ema) -> dict:
    """Each profile's EMA of every piece this rank tracks, by where the piece lies."""
    return {(p.fqn, p.flat_start, p.numel, p.box): [prof.views[i].clone() for prof in ema.profiles]
            for i, p in enumerate(ema.pieces)}


def run_case(rank: int, ws: int, out_dir: str, name: str, engine: str, url: str, mesh: list[int] | None = None,
             writer: str = "thread") -> None:
    """Resume the layout from ``url``, train, snapshot, synthesize on every rank; rank 0 saves the record."""
    from dist_ema import PostHocEMA, synthesize

    setup = build(engine, mesh_shape=None if mesh is None else tuple(mesh))
    ema = PostHocEMA(setup.target, sigma_rels=SIGMAS, store=url, snapshot_every=EVERY, resume=True, writer=writer)
    assert ema.step == SEED_STEPS, (name, ema.step)
    rec: dict = {"resumed": _gathered(ema), "traj": [], "snaps": {}}
    for _ in range(STEPS):
        setup.step()
        assert ema.update(), name
        rec["traj"].append(setup.full_params())
        if ema.updates % EVERY == 0:
            rec["snaps"][ema.step] = _gathered(ema)
    # the replicas of a piece (HSDP, tp/cp replicas) track bit-identical EMAs (each writes only its share)
    everyone: list = [None] * ws
    dist.all_gather_object(everyone, _by_piece(ema))
    seen: dict = {}
    for part in everyone:
        for key, vals in part.items():
            ref = seen.setdefault(key, vals)
            assert all(torch.equal(a, b) for a, b in zip(vals, ref)), (name, "replicas' EMAs differ", key)
    ema.close()
    synthesize(url, sigma_rels=list(TARGETS), out=f"{out_dir}/{name}-synth", progress=False)
    if engine in ND:  # the synthesized EMA written into the training layout itself
        from dist_ema import load_synthesized

        load_synthesized(setup.target, url, sigma_rel=TARGETS[1])
        rec["loaded"] = setup.full_params()
    if rank == 0:
        torch.save(rec, f"{out_dir}/{name}.pt")


def worker_cases(rank: int, ws: int, out_dir: str, cases: list[dict]) -> None:
    for case in cases:
        run_case(rank, ws, out_dir, **case)


# ----------------------------------------------------------------------------- checks


def _params(sd: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    return {k: sd[k] for k in names}


def _data_objects(store_dir: Path, snap_id: str) -> dict[int, int]:
    """Data objects (shards: one per profile) of each rank in one snapshot."""
    counts: dict[int, int] = {}
    for f in (store_dir / "snapshots" / snap_id).glob("j*/r*/c/*/0"):
        r = int(f.parts[-4][1:])
        counts[r] = counts.get(r, 0) + 1
    return counts


def check_case(case: dict, ws: int, seed: dict, out_dir: Path) -> None:
    from safetensors.torch import load_file

    from dist_ema import PostHocEMA, open_store, synthesize
    from dist_ema.synthesis import target_folder

    name, url = case["name"], case["url"]
    rec = torch.load(out_dir / f"{name}.pt")
    names = sorted(seed["traj"][0])
    traj = seed["traj"] + rec["traj"]
    snaps = {**seed["snaps"], **rec["snaps"]}
    last_seed, last = max(seed["snaps"]), max(rec["snaps"])
    assert sorted(rec["snaps"]) == [4, 6] and len(traj) == last, (name, sorted(rec["snaps"]))

    # resume: the layout resumed the seed's last snapshot exactly
    for s in SIGMAS:
        for k in names:
            assert torch.equal(rec["resumed"][s][k], seed["snaps"][last_seed][s][k]), (name, "resume", s, k)
    # track: the EMA at the last snapshot == brute force over the whole trajectory
    for s in SIGMAS:
        ref = brute_ema(traj, s)
        for k in names:
            torch.testing.assert_close(snaps[last][s][k].double(), ref[k], rtol=2e-5, atol=2e-6,
                                       msg=f"{name}: tracked EMA {k} sigma_rel={s}")
    # snapshot: every snapshot reads back exactly what the ranks held when it was taken
    store = open_store(url)
    listed = store.snapshots()
    assert [x.step for x in listed] == sorted(snaps), (name, [x.step for x in listed])
    for x in listed:
        for s in SIGMAS:
            for k in names:
                assert torch.equal(store.read(x.step, s, k), snaps[x.step][s][k]), (name, "read back", x.step, s, k)
    # writing: ranks that own nothing write no data; replicas share; data objects <= ranks x profiles
    newest = listed[-1]
    assert newest.world_size == ws, (name, newest.world_size)
    lay = store.layout(newest)
    objects = _data_objects(Path(url), newest.id)
    for r in range(ws):
        expected = len(SIGMAS) if lay.rank_numel(r) else 0
        assert objects.get(r, 0) == expected, (name, "data objects of rank", r, lay.rank_numel(r), objects)
    assert sum(objects.values()) <= ws * len(SIGMAS)
    bufs = store.read_buffers(newest)  # buffers="copy": pipeline stages gather theirs on rank 0
    assert set(bufs) == {"scale"} and np.array_equal(bufs["scale"], np.ones(1, np.float32)), (name, bufs)
    if case["engine"] in ("fsdp2_tp", "hsdp_tp", "fsdp2_shard1"):  # column blocks: N-d boxes, format 3
        assert lay.has_boxes and newest.version == 3, (name, newest.version)
    elif case["engine"] not in ("fsdp2_cp", "fsdp2_dp_cp", "pp_fsdp2"):
        assert not lay.has_boxes and newest.version == 2, (name, newest.version)
    if case["engine"] in HYBRID:
        replicas, shards = case["mesh"]
        for c in range(shards):
            share = [lay.rank_numel(r * shards + c) for r in range(replicas)]
            assert max(share) - min(share) <= 1 and min(share) > 0, (name, "replica shares", c, share)
    # synthesize: N ranks == 1 rank (bitwise); tracked target == brute force; untracked == reconstruction
    here = out_dir / f"{name}-synth-1"
    synthesize(url, sigma_rels=list(TARGETS), out=str(here), progress=False)
    t_last = float(newest.t)
    for s in TARGETS:
        theirs = load_file(str(out_dir / f"{name}-synth" / target_folder(s) / "model.safetensors"))
        mine = load_file(str(here / target_folder(s) / "model.safetensors"))
        for k in names:
            assert torch.equal(theirs[k], mine[k]), (name, "synthesis differs between world sizes", s, k)
        ref = brute_ema(traj, s) if s in SIGMAS else reconstruct(snaps, s, t_last)
        for k in names:
            torch.testing.assert_close(mine[k].double(), ref[k], rtol=1e-4, atol=1e-5,
                                       msg=f"{name}: synthesized {k} sigma_rel={s}")
    if "loaded" in rec:  # load_synthesized into the layout == the synthesized file (float64 sums, one rounding)
        synth = load_file(str(here / target_folder(TARGETS[1]) / "model.safetensors"))
        for k in names:
            torch.testing.assert_close(rec["loaded"][k], synth[k].double(), rtol=1e-6, atol=1e-7,
                                       msg=f"{name}: load_synthesized {k}")
    # resume from this layout at 1 rank (plain model): the layout's last snapshot exactly
    plain = build("replicated")
    ema = PostHocEMA(plain.target, sigma_rels=SIGMAS, store=url, resume=True, writer="sync")
    try:
        assert ema.step == last, (name, ema.step)
        for s in SIGMAS:
            got = ema.full_state_dict(sigma_rel=s)
            for k in names:
                assert torch.equal(got[k], snaps[last][s][k]), (name, "1-rank resume", s, k)
    finally:
        ema.close()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> tuple[Path, dict]:
    """One seed store for every case (copied per case): a 1-rank plain run."""
    base = tmp_path_factory.mktemp("seed") / "store"
    return base, seed_store(str(base))


def _cases(tmp_path: Path, seed_dir: Path, specs: list[tuple]) -> list[dict]:
    cases = []
    for spec in specs:
        name, engine, mesh = spec[0], spec[1], spec[2] if len(spec) > 2 else None
        url = tmp_path / f"{name}-store"
        shutil.copytree(seed_dir, url)
        case = {"name": name, "engine": engine, "url": str(url)}
        if mesh is not None:
            case["mesh"] = list(mesh)
        cases.append(case)
    return cases


# (name, engine, mesh) per world size; mesh = (replicas, shards) for the engines in HYBRID
GROUPS = {
    "4-hsdp-hybrid": (4, [("fsdp2_hsdp_2x2", "fsdp2_hsdp", (2, 2)), ("fsdp1_hybrid_2x2", "fsdp1_hybrid", (2, 2)),
                          ("fsdp1_hybrid_zero2_2x2", "fsdp1_hybrid_zero2", (2, 2))]),
    "2-replicas": (2, [("fsdp2_hsdp_2x1", "fsdp2_hsdp", (2, 1)), ("fsdp1_no_shard", "fsdp1_no_shard"),
                       ("ddp", "ddp")]),
    "3-uneven": (3, [("fsdp2", "fsdp2"), ("fsdp1", "fsdp1"), ("fsdp1_flat", "fsdp1_flat")]),
    "1-rank": (1, [("fsdp2_1", "fsdp2"), ("fsdp1_1", "fsdp1"), ("ddp_1", "ddp")]),
    # emb has 7 rows, head 1 row: ranks 5-7 of FSDP2 over 8 ranks hold no element at all
    "8-empty-ranks": (8, [("fsdp2_8", "fsdp2"), ("fsdp2_hsdp_2x4", "fsdp2_hsdp", (2, 4))]),
}
# the layouts of training at scale (tests/engines.py ND): DTensor boxes, replicas over tp/cp, stages
ND_GROUPS = {
    "4-tp": (4, [("fsdp2_tp_2x2", "fsdp2_tp", (2, 2)), ("fsdp2_cp_2x2", "fsdp2_cp", (2, 2)),
                 ("fsdp2_dp_cp_2x2", "fsdp2_dp_cp", (2, 2)), ("pp_fsdp2_2x2", "pp_fsdp2", (2, 2))]),
    "2-shard1": (2, [("fsdp2_shard1", "fsdp2_shard1"), ("fsdp2_tp_1x2", "fsdp2_tp", (1, 2))]),
    "8-hsdp-tp": (8, [("hsdp_tp_2x2x2", "hsdp_tp", (2, 2, 2))]),
}
DEEPSPEED = {
    "4-zero": (4, [("zero1", "zero1"), ("zero2", "zero2"), ("zero3", "zero3")]),
}


@pytest.mark.dist
@pytest.mark.timeout(600)
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_topologies(group: str, seeded, tmp_path: Path) -> None:
    ws, specs = GROUPS[group]
    cases = _cases(tmp_path, seeded[0], specs)
    run_workers("tests.test_topologies:worker_cases", ws, tmp_path, {"cases": cases}, timeout=400)
    for case in cases:
        check_case(case, ws, seeded[1], tmp_path)


@pytest.mark.dist
@pytest.mark.timeout(900)
@pytest.mark.parametrize("group", sorted(ND_GROUPS))
def test_topologies_nd(group: str, seeded, tmp_path: Path) -> None:
    ws, specs = ND_GROUPS[group]
    cases = _cases(tmp_path, seeded[0], specs)
    run_workers("tests.test_topologies:worker_cases", ws, tmp_path, {"cases": cases}, timeout=800)
    for case in cases:
        check_case(case, ws, seeded[1], tmp_path)


@pytest.mark.dist
@pytest.mark.timeout(600)
@pytest.mark.parametrize("group", sorted(DEEPSPEED))
def test_topologies_deepspeed(group: str, seeded, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    ws, specs = DEEPSPEED[group]
    cases = _cases(tmp_path, seeded[0], specs)
    run_workers("tests.test_topologies:worker_cases", ws, tmp_path, {"cases": cases}, timeout=400)
    for case in cases:
        check_case(case, ws, seeded[1], tmp_path)


@pytest.mark.parametrize("replicas", [1, 2, 3, 7])
def test_replicas_split_ownership_evenly(replicas: int) -> None:
    from dist_ema.sharding.base import ShardPiece, share_among_replicas

    src = torch.arange(10.0)
    target = torch.arange(10.0) + 100
    pieces = [ShardPiece("a", (4,), torch.float32, 0, 4, src[:4], load_target=target[:4]),
              ShardPiece("b", (2, 3), torch.float32, 0, 6, src[4:], load_target=target[4:])]
    owned = []
    for i in range(replicas):
        split = share_among_replicas(pieces, i, replicas)
        # every replica still holds everything, as views of the same storage
        assert [(q.fqn, q.flat_start, q.numel) for q in split if q.numel] == [
            (q.fqn, q.flat_start, q.numel) for q in split]
        for p in ("a", "b"):
            mine = [q for q in split if q.fqn == p]
            assert sum(q.numel for q in mine) == (4 if p == "a" else 6)
            for q in mine:
                base = 0 if p == "a" else 4
                assert torch.equal(q.source, src[base + q.flat_start : base + q.flat_end])
                assert torch.equal(q.load_target, target[base + q.flat_start : base + q.flat_end])
        owned.append({(q.fqn, e) for q in split if q.owner for e in range(q.flat_start, q.flat_end)})
    sizes = [len(o) for o in owned]
    assert sum(sizes) == 10 and max(sizes) - min(sizes) <= 1, sizes
    assert set().union(*owned) == {("a", e) for e in range(4)} | {("b", e) for e in range(6)}


def test_layouts_with_parameters_in_another_order_are_one_model() -> None:
    """FSDP1 lists parameters unit by unit, a plain model in module order: a store holds both.

    Synthesis maps the newest snapshot's parameters into older layouts by name, not by position.
    """
    from dist_ema.store.layout import Layout, plan_region, plan_units, translate, unit_segments

    params = [("a", (4,), "float32"), ("b", (2, 3), "float32")]
    plain = Layout.build(params, [[("a", 0, 4), ("b", 0, 6)]], "replicated")
    fsdp1 = Layout.build(params[::-1], [[("b", 0, 3), ("a", 0, 2)], [("b", 3, 3), ("a", 2, 2)]], "fsdp1")
    assert plain.model_fingerprint() == fsdp1.model_fingerprint()
    # every element of the fsdp1 layout's units, read from the plain layout: the same parameter's elements
    src = plain.piece_index(fsdp1)
    for unit in plan_units(fsdp1, [1, 1], 1 << 20):  # chunks of 1 element: every unit boundary allowed
        for p, start, numel, _, _box in unit_segments(fsdp1, unit):
            fqn = fsdp1.params[p][0]
            want = [(rd.src, rd.numel) for rd in plan_region(plain.piece_index()[plain.fqn_index()[fqn]], start,
                                                             start + numel)]
            got = [(rd.src, rd.numel) for rd in translate(src, [(p, start, numel, 0)])]
            assert got == want, (fqn, start, numel, got, want)


# ----------------------------------------------------------------------------- two nodes


def _torchrun_main() -> None:
    """Entry point of the torchrun workers of the two-node test."""
    out_dir, cases = sys.argv[1], json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    code = 0
    try:
        worker_cases(dist.get_rank(), dist.get_world_size(), out_dir, cases)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # gloo threads can abort at interpreter exit after all work finished


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_two_nodes_hsdp(seeded, tmp_path: Path) -> None:
    """Two torchrun "nodes" on 127.0.0.1, 2 ranks each; HSDP replicates across them, shards within."""
    cases = _cases(tmp_path, seeded[0], [("two_nodes_hsdp_2x2", "fsdp2_hsdp", (2, 2))])
    cases[0]["writer"] = "process"  # the default writer, as a real job runs it
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs, logs = [], []
    for node in (0, 1):
        log = open(tmp_path / f"node{node}.log", "w+b")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
             "-m", "tests.test_topologies", str(tmp_path), json.dumps(cases)],
            env=env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read().decode(errors="replace"))
        log.close()
    assert codes == [0, 0], "\n".join(f"--- node {n} (exit {c}) ---\n" + "\n".join(o.splitlines()[-40:])
                                      for n, (c, o) in enumerate(zip(codes, outs)))
    check_case(cases[0], 4, seeded[1], tmp_path)


if __name__ == "__main__":
    _torchrun_main()


# ----------------------------------------------------------------------------- resume across N-d layouts

CHAIN = [("fsdp2_tp", (2, 2)), ("fsdp2", None), ("fsdp2_tp", (1, 4)), ("fsdp2_tp", (2, 2))]


def worker_chain(rank: int, ws: int, out_dir: str, url: str) -> None:
    """One store, the run restarted under another layout each time: TP 2 x FSDP 2 -> plain FSDP2 4 ->
    TP 4 -> TP 2 x FSDP 2. Each start resumes the previous one's last snapshot, trains 2 steps, and
    snapshots; the gathered EMAs are saved for the checks."""
    from dist_ema import PostHocEMA

    rec = []
    for i, (engine, mesh) in enumerate(CHAIN):
        setup = build(engine, seed=i, mesh_shape=mesh)
        ema = PostHocEMA(setup.target, sigma_rels=SIGMAS, store=url, snapshot_every=EVERY, resume=i > 0,
                         writer="sync")
        entry = {"resumed": _gathered(ema), "traj": [], "step0": ema.step}
        for _ in range(EVERY):
            setup.step()
            assert ema.update()
            entry["traj"].append(setup.full_params())
        entry["last"] = _gathered(ema)
        entry["step"] = ema.step
        ema.close()
        rec.append(entry)
    if rank == 0:
        torch.save(rec, f"{out_dir}/chain.pt")


def worker_synthesize(rank: int, ws: int, out_dir: str, url: str, out: str) -> None:
    from dist_ema import synthesize

    synthesize(url, sigma_rels=list(TARGETS), out=out, progress=False)


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_resume_across_nd_layouts(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from dist_ema import open_store, synthesize
    from dist_ema.synthesis import target_folder

    url = str(tmp_path / "store")
    run_workers("tests.test_topologies:worker_chain", 4, tmp_path, {"url": url}, timeout=500)
    rec = torch.load(tmp_path / "chain.pt")
    names = sorted(rec[0]["traj"][0])
    traj = []
    for i, entry in enumerate(rec):
        if i:  # resumed exactly what the previous layout stored last
            assert entry["step0"] == rec[i - 1]["step"]
            for s in SIGMAS:
                for k in names:
                    assert torch.equal(entry["resumed"][s][k], rec[i - 1]["last"][s][k]), (CHAIN[i], s, k)
        traj += entry["traj"]
        for s in SIGMAS:  # and goes on exactly: the brute force over the whole trajectory, all layouts
            ref = brute_ema(traj, s)
            for k in names:
                torch.testing.assert_close(entry["last"][s][k].double(), ref[k], rtol=2e-5, atol=2e-6,
                                           msg=f"{CHAIN[i]}: tracked {k} sigma_rel={s}")
    store = open_store(url)
    snaps = store.snapshots()
    assert [x.step for x in snaps] == [2 * (i + 1) for i in range(len(CHAIN))]
    assert [x.version for x in snaps] == [3, 2, 3, 3]  # the 1-d layout's snapshot stays format 2
    for x, entry in zip(snaps, rec):
        assert store.verify(x) == []
        for s in SIGMAS:
            for k in names:
                assert torch.equal(store.read(x.step, s, k), entry["last"][s][k]), (x.id, s, k)
    # synthesis over the mixed layouts (boxes and flat) is the same on 3 ranks (uneven units) and in 1 process
    run_workers("tests.test_topologies:worker_synthesize", 3, tmp_path / "s3",
                {"url": url, "out": str(tmp_path / "o3")}, timeout=300)
    synthesize(url, sigma_rels=list(TARGETS), out=str(tmp_path / "o1"), progress=False)
    for s in TARGETS:
        three = load_file(str(tmp_path / "o3" / target_folder(s) / "model.safetensors"))
        one = load_file(str(tmp_path / "o1" / target_folder(s) / "model.safetensors"))
        assert sorted(three) == sorted(one) and all(torch.equal(three[k], one[k]) for k in one), s
