"""One error base class, and collective errors that are the same type on every rank and keep each rank's failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dist_ema
from tests.dist_harness import run_workers


def test_every_public_error_is_a_dist_ema_error():
    from dist_ema.config import ConfigError
    from dist_ema.errors import CollectiveError
    from dist_ema.sharding.base import UnsupportedEngineError
    from dist_ema.sharding.watch import ModelChangedError
    from dist_ema.store.format import ChecksumError
    from dist_ema.store.fs import StoreError, StoreUnreachableError
    from dist_ema.store.io import TruncatedObjectError

    for cls in (StoreError, StoreUnreachableError, ChecksumError, TruncatedObjectError, ConfigError,
                UnsupportedEngineError, CollectiveError, ModelChangedError):
        assert issubclass(cls, dist_ema.DistEMAError), cls
    assert issubclass(ConfigError, ValueError) and issubclass(StoreError, RuntimeError)
    assert dist_ema.ModelChangedError is ModelChangedError
    with pytest.raises(dist_ema.DistEMAError):
        dist_ema.PostHocEMA(object())


def worker(rank: int, ws: int, out: str, store: str) -> None:
    from dist_ema.collective import run_and_check
    from dist_ema.store.fs import StoreError

    seen = {}

    def fail_on_one() -> None:
        if rank == 1:
            raise PermissionError("rank 1 cannot write here")

    try:
        run_and_check(fail_on_one, "a step", None, StoreError)
    except dist_ema.DistEMAError as e:
        seen["step"] = [type(e).__name__, {str(k): v for k, v in e.failures.items()}]
    try:  # a planning error of synthesis (a bad target time): the same type on every rank
        dist_ema.synthesize(store, sigma_rels=[0.1], t=1e9, out=str(Path(out) / "o"), progress=False)
    except ValueError as e:
        seen["plan"] = [type(e).__name__, str(e)]
    (Path(out) / f"r{rank}.json").write_text(json.dumps(seen))


@pytest.mark.dist
def test_collective_errors_are_the_same_on_every_rank(tmp_path):
    import torch

    url = str(tmp_path / "s")
    m = torch.nn.Linear(3, 3)
    with dist_ema.PostHocEMA(m, store=url, writer="sync") as ema:
        for _ in range(3):
            ema.update()
        ema.snapshot()
    run_workers("tests.test_errors:worker", 2, tmp_path, kwargs={"store": url})
    seen = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    for s in seen:
        assert s["step"] == ["StoreError", {"1": "PermissionError: rank 1 cannot write here"}]
        assert s["plan"][0] == "TargetError" and "after the last snapshot" in s["plan"][1]
