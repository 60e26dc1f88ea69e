"""params= and PEFT export on 2 real gloo ranks (FSDP2, DDP, ZeRO-2, FSDP1 flat, TP x FSDP2, pipeline).

One launch trains TinyNet under each engine (the N-d layouts as tensor parallel 1 x 2, and FSDP2 pipeline
stages, two per rank, where each rank's choice is a part of the whole) with three EMAs side by side (every
parameter; glob patterns with a store; a predicate) and checks in the test process, against the gathered
trajectory: the tracked set is exactly the chosen one, its EMA is a float64 lerp of the trajectory and
bitwise the EMA tracked without params=; the snapshots and the synthesized files hold exactly that set;
load_synthesized writes exactly it and leaves the rest of the sharded model alone. The same launch has ranks
that choose differently (other patterns, a predicate deciding otherwise on one rank, one rank's invalid
value, a pattern matching nothing): every rank raises the same ConfigError.

The other launch trains a real peft LoRA model under FSDP2 (params="*lora_*") and DDP (include_frozen=False,
the base frozen), synthesizes with format="peft" on both ranks, and loads the result with
``PeftModel.from_pretrained`` on a fresh base model (tests/test_params.py: check_adapter).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from dist_ema import PostHocEMA, load_synthesized, open_store, synthesize
from tests.dist_harness import run_workers
from tests.test_params import brute_lerp, check_adapter, lora_model

pytestmark = pytest.mark.dist

# (engine, mesh) on 2 ranks: the N-d layouts as tensor parallel 1 x 2 (boxes) and 2 pipeline stages per rank
# and FSDP1 with flat parameters (no per-parameter tensor registered: a predicate gets a meta tensor)
ENGINES = {"fsdp2": None, "ddp": None, "zero2": None, "fsdp1_flat": None, "fsdp2_tp": (1, 2), "pp_fsdp2": (2, 1)}
SIGMAS = (0.05, 0.10)
STEPS, EVERY = 4, 2
GLOBS = ["fc*", "scale"]
CHOSEN = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def _chosen(name: str, p: torch.Tensor) -> bool:
    return name.startswith("fc") or (name == "scale" and p.dim() == 1)


def worker_engines(rank: int, ws: int, out: str) -> None:
    from dist_ema.config import ConfigError
    from tests.engines import build

    for engine, mesh in ENGINES.items():
        setup = build(engine, seed=3, mesh_shape=mesh)
        url = f"{out}/{engine}/store"
        emas = {"all": PostHocEMA(setup.target, sigma_rels=SIGMAS),
                "globs": PostHocEMA(setup.target, sigma_rels=SIGMAS, params=GLOBS, store=url, snapshot_every=EVERY,
                                    writer="sync"),
                "predicate": PostHocEMA(setup.target, sigma_rels=SIGMAS, params=_chosen)}
        layouts = {k: sorted(e.layout.global_params) for k, e in emas.items()}
        traj = []
        for _ in range(STEPS):
            setup.step()
            for ema in emas.values():
                ema.update()
            traj.append({k: v.float() for k, v in setup.full_params().items()})
        tracked = {k: {s: e.full_state_dict(sigma_rel=s) for s in SIGMAS} for k, e in emas.items()}
        for ema in emas.values():
            ema.close()
        res = synthesize(url, sigma_rels=[0.07], out=f"{out}/{engine}/synth", progress=False)
        before = setup.full_params()
        load_synthesized(setup.target, url, sigma_rel=0.07)
        after = setup.full_params()
        if rank == 0:
            torch.save({"layouts": layouts, "traj": traj, "tracked": tracked, "files": res.files, "before": before,
                        "after": after}, f"{out}/{engine}.pt")
        dist.barrier()

    # ranks that choose differently: the same ConfigError on every rank, nothing hangs
    setup = build("fsdp2", seed=3)
    cases = {"patterns": ["fc*"] if rank == 0 else ["fc1.*"],
             "predicate": lambda n, p: n.startswith("fc") or (rank == 1 and n == "head.weight"),
             "invalid": ["fc*"] if rank == 0 else 3,
             "nothing": ["fc*", "nope.*"]}
    said = {}
    for case, params in cases.items():
        try:
            PostHocEMA(setup.target, params=params)
            said[case] = "no error"
        except ConfigError as e:
            said[case] = str(e)
    Path(f"{out}/refusals-{rank}.json").write_text(json.dumps(said))


@pytest.fixture(scope="module")
def engines_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("params_dist")
    run_workers("tests.test_params_dist:worker_engines", 2, tmp, timeout=420)
    return tmp


@pytest.mark.parametrize("engine", list(ENGINES))
def test_the_chosen_set_under_every_engine(engines_run, engine: str) -> None:
    got = torch.load(engines_run / f"{engine}.pt")
    assert set(got["layouts"]["globs"]) == set(got["layouts"]["predicate"]) == CHOSEN
    assert set(got["layouts"]["all"]) == set(got["traj"][0])
    traj64 = [{k: v.double() for k, v in th.items()} for th in got["traj"]]
    for s in SIGMAS:
        brute = brute_lerp(traj64, s)
        for form in ("globs", "predicate"):
            mine, full = got["tracked"][form][s], got["tracked"]["all"][s]
            assert set(mine) == CHOSEN | {"scale"}, form
            for k in CHOSEN:
                assert torch.equal(mine[k], full[k]), (engine, form, s, k)  # bitwise: same shards, same updates
                torch.testing.assert_close(mine[k].double(), brute[k], rtol=1e-5, atol=1e-6)
    store = open_store(str(engines_run / engine / "store"))
    for snap in store.snapshots():
        assert set(store.params(snap)) == CHOSEN and [b[0] for b in snap.meta["buffers"]] == ["scale"]
        assert snap.meta["params"] == {"patterns": GLOBS}
    synthesized = load_file(got["files"][0])
    assert set(synthesized) == CHOSEN | {"scale"}
    for k, v in got["after"].items():  # load_synthesized: the chosen set written, everything else untouched
        if k in CHOSEN:
            torch.testing.assert_close(v.float(), synthesized[k], rtol=0, atol=0)
        else:
            assert torch.equal(v, got["before"][k]), k


def test_ranks_that_choose_differently_fail_together(engines_run) -> None:
    said = [json.loads((engines_run / f"refusals-{r}.json").read_text()) for r in range(2)]
    assert said[0] == said[1]  # the same message on every rank
    msg = said[0]
    assert "settings differ across ranks: params: rank 0: \"['fc*']\", rank 1: \"['fc1.*']\"" in msg["patterns"]
    assert "params=a callable chose different parameters on different ranks: 'head.weight' is tracked on rank 1 " \
           "but left out on rank 0" in msg["predicate"]
    assert "settings are invalid on 1 of 2 rank(s): rank 1: ConfigError: params must be a glob pattern, a list of " \
           "them or a callable (name, param) -> bool; got 3" in msg["invalid"]
    assert "pattern ['nope.*'] matches no parameter or buffer name" in msg["nothing"]
    assert "'emb.weight'" in msg["nothing"]


# ----------------------------------------------------------------------------- PEFT


def worker_peft(rank: int, ws: int, out: str) -> None:
    for engine in ("fsdp2", "ddp"):
        pm, base_sd = lora_model(seed=1)
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=0.05)
        url = f"{out}/{engine}/store"
        if engine == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            fully_shard(pm)
            model, kw = pm, {"params": "*lora_*"}
        else:
            model, kw = torch.nn.parallel.DistributedDataParallel(pm), {"include_frozen": False}
        with PostHocEMA(model, sigma_rels=SIGMAS, store=url, snapshot_every=EVERY, writer="sync", **kw) as ema:
            for i in range(STEPS):
                x = torch.randn(8, 6, generator=torch.Generator().manual_seed(10 * i + rank))
                model(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                ema.update()
            names = sorted(ema.layout.params)
        adapters = synthesize(url, sigma_rels=[0.07, 0.10], out=f"{out}/{engine}/peft", format="peft",
                              progress=False)
        plain = synthesize(url, sigma_rels=[0.07, 0.10], out=f"{out}/{engine}/st", progress=False)
        if rank == 0:
            torch.save({"names": names, "base": base_sd, "adapters": adapters.files, "plain": plain.files},
                       f"{out}/{engine}.pt")


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    pytest.importorskip("peft")
    tmp = tmp_path_factory.mktemp("peft_dist")
    run_workers("tests.test_params_dist:worker_peft", 2, tmp, timeout=300)
    return tmp


@pytest.mark.parametrize("engine", ["fsdp2", "ddp"])
def test_a_lora_adapter_trained_on_two_ranks_loads_with_peft(peft_run, engine: str) -> None:
    got = torch.load(peft_run / f"{engine}.pt")
    assert got["names"] == sorted(f"base_model.model.{m}.lora_{ab}.default.weight" for m in ("fc1", "fc2")
                                  for ab in "AB")
    for j, s in enumerate((0.07, 0.10)):
        folder = str(Path(got["adapters"][2 * j]).parent)
        assert folder.endswith(f"sigma_rel-{s:.4f}")
        check_adapter(folder, load_file(got["plain"][j]), got["base"])
