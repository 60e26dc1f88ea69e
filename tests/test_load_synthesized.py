"""load_synthesized: the EMA for any sigma_rel written straight into a live sharded model.

A store written by 2 FSDP2 ranks is loaded into FSDP2 and ZeRO-3 models on 3 ranks (and a plain
model in one process); the full parameters every rank then computes with are compared with
the offline ``synthesize`` output of the same store and target.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_ema import PostHocEMA, load_synthesized, synthesize
from dist_ema.store.fs import StoreError
from tests.dist_harness import run_workers

pytestmark = pytest.mark.dist

TARGET = 0.15


def worker_train(rank: int, ws: int, out: str, url: str) -> None:
    from tests.engines import build

    setup = build("fsdp2", seed=5)
    with PostHocEMA(setup.target, sigma_rels=(0.05, 0.20), store=url, snapshot_every=4, writer="sync") as ema:
        for _ in range(16):
            setup.step()
            ema.update()


def worker_load(rank: int, ws: int, out: str, url: str, engine: str) -> None:
    from tests.engines import build

    setup = build(engine, seed=9)  # other weights: everything must come from the store
    res = load_synthesized(setup.target, url, sigma_rel=TARGET)
    full = setup.full_params()  # what every rank computes with, gathered
    if rank == 0:
        torch.save({"full": {k: v.float() for k, v in full.items()}, "error": res.error,
                    "snapshots": list(res.snapshots)}, Path(out) / "loaded.pt")


@pytest.fixture(scope="module")
def fsdp2_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load")
    url = str(tmp / "store")
    run_workers("tests.test_load_synthesized:worker_train", 2, tmp / "train", kwargs={"url": url})
    res = synthesize(url, sigma_rels=[TARGET], out=str(tmp / "offline"), progress=False)
    return url, load_file(str(tmp / "offline" / f"sigma_rel-{TARGET:.4f}" / "model.safetensors")), res


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_three_ranks_load_what_two_wrote(fsdp2_store, tmp_path, engine):
    url, offline, res = fsdp2_store
    run_workers("tests.test_load_synthesized:worker_load", 3, tmp_path, kwargs={"url": url, "engine": engine},
                timeout=300)
    got = torch.load(tmp_path / "loaded.pt")
    assert got["snapshots"] == res.snapshots
    assert abs(got["error"] - res.targets[0]["error"]) < 1e-12
    for name, v in got["full"].items():
        torch.testing.assert_close(v, offline[name].float(), rtol=1e-6, atol=1e-7, msg=name)


def test_plain_model_in_one_process_and_errors(fsdp2_store):
    from tests.engines import TinyNet

    url, offline, _ = fsdp2_store
    model = TinyNet()
    res = load_synthesized(model, url, sigma_rel=TARGET)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), offline[name], rtol=1e-6, atol=1e-7)
    assert len(res.coefficients) == len(res.rows) and res.bytes_read > 0
    with pytest.raises(StoreError, match="does not match the snapshots"):
        load_synthesized(torch.nn.Linear(3, 3), url, sigma_rel=TARGET)
    with pytest.raises(StoreError, match="after the last snapshot"):  # the same type on every rank
        load_synthesized(TinyNet(), url, sigma_rel=TARGET, t=1e9)
    assert json.dumps(res.snapshots)
