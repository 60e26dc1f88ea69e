"""Planning at scale, swapped() from every snapshot taken, load_synthesized with buffers and frozen stores.

Planning: thousands of snapshots plan in bounded memory, the reported error is the error of the
coefficients returned (checked by numerical quadrature of the profiles, independent of phema's
inner products), and below the bound the coefficients are bitwise those of the dense solve.

Models: a small BatchNorm CNN trained on 2 gloo ranks under DDP (swapped() right after a
snapshot, with the default process writer), and on one process with its backbone frozen and
``include_frozen=False``; both stores are loaded with ``load_synthesized`` into fresh models
(plain, and FSDP2 on 2 ranks) and compared with ``synthesize``'s safetensors files.
"""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dist_ema import phema
from dist_ema.synthesis import plan_coefficients
from tests.dist_harness import run_workers

PLAN_PEAK_MIB = 128  # a dense solve over 5,000 snapshots x 2 profiles needs 763 MiB per matrix


def _gamma(sigma_rel: float) -> float:
    """gamma of a sigma_rel by bisection on the closed form sigma_rel(gamma) (not phema's cubic)."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        s = math.sqrt((mid + 1) / ((mid + 2) ** 2 * (mid + 3)))
        lo, hi = (mid, hi) if s > sigma_rel else (lo, mid)
    return 0.5 * (lo + hi)


def _sources(n: int, every: float = 1000.0, sigma_rels=(0.05, 0.10)) -> list[tuple[float, list[float]]]:
    gs = [_gamma(s) for s in sigma_rels]
    return [(every * (i + 1), gs) for i in range(n)]


def _quadrature_error(x: np.ndarray, t: np.ndarray, g: np.ndarray, tr: float, gr: float) -> float:
    """||sum_i x_i p_i - p_r|| / ||p_r|| by Gauss-Legendre quadrature on every piece between snapshot times."""
    keep = x != 0
    x, t, g = x[keep], t[keep], g[keep]
    breaks = np.unique(np.concatenate([[0.0], t, [tr]]))
    nodes, weights = np.polynomial.legendre.leggauss(48)
    a, b = breaks[:-1, None], breaks[1:, None]
    tau = (a + (b - a) * (nodes[None, :] + 1) / 2).ravel()
    w = ((b - a) / 2 * weights[None, :]).ravel()
    rec = np.zeros_like(tau)
    for xi, ti, gi in zip(x, t, g):
        inside = tau <= ti
        rec[inside] += xi * (gi + 1) * (tau[inside] / ti) ** gi / ti
    target = (gr + 1) * (tau / tr) ** gr / tr
    return math.sqrt(np.sum(w * (rec - target) ** 2) / np.sum(w * target**2))


def _dense_solve(t, gamma, target_t, target_gamma):
    """The dense solve over every snapshot at or before each target time (the algorithm as it was
    before snapshot subsets): the reference the planner must match bitwise below its bound."""
    ts, gs = np.asarray(t, np.float64), np.asarray(gamma, np.float64)
    tr, gr = np.broadcast_arrays(np.atleast_1d(np.asarray(target_t, np.float64)),
                                 np.atleast_1d(np.asarray(target_gamma, np.float64)))
    m = tr.size
    X, err, cond = np.zeros((ts.size, m)), np.zeros(m), np.zeros(m)
    for t_j in np.unique(tr):
        cols = np.flatnonzero(tr == t_j)
        sel = np.flatnonzero(ts <= t_j)
        ti, gi = ts[sel], gs[sel]
        A = phema.p_dot_p(ti[:, None], gi[:, None], ti[None, :], gi[None, :])
        B = phema.p_dot_p(ti[:, None], gi[:, None], t_j, gr[None, cols])
        d = 1.0 / np.sqrt(np.diag(A))
        As = A * d[:, None] * d[None, :]
        ev = np.linalg.eigvalsh(As)
        cond[cols] = ev[-1] / ev[0] if ev[0] > 0 else np.inf
        try:
            Y = np.linalg.solve(As, B * d[:, None])
        except np.linalg.LinAlgError:
            Y = np.linalg.lstsq(As, B * d[:, None], rcond=None)[0]
        Xs = Y * d[:, None]
        for c, j in enumerate(cols):
            x = Xs[:, c] / Xs[:, c].sum()
            b = B[:, c]
            rr = float(phema.p_dot_p(tr[j], gr[j], tr[j], gr[j]))
            err[j] = math.sqrt(max(x @ A @ x - 2.0 * x @ b + rr, 0.0) / rr)
            X[sel, j] = x
    return X, err, cond


# ---------------------------------------------------------------------------------------------- planning


@pytest.mark.parametrize("n", [100_000, 5_000])
def test_thousands_of_snapshots_plan_in_bounded_memory(n):
    sources = _sources(n, every=1.0 if n == 100_000 else 1000.0)
    targets = [_gamma(0.15), _gamma(0.25)]
    tracemalloc.start()
    try:
        X, sol, rows = plan_coefficients(sources, sources[-1][0], targets)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert peak < PLAN_PEAK_MIB, f"planning {n} snapshots peaked at {peak:.0f} MiB"
    assert X.shape[1] == 2 and np.all(np.isfinite(X))
    np.testing.assert_allclose(X.sum(axis=0), 1.0, rtol=1e-9)
    assert np.all(sol.error < 0.02), sol.error  # a subset spread over time still reconstructs well


def test_reported_error_is_the_error_of_the_coefficients_returned():
    n = 5_000
    sources = _sources(n)
    t_mid = sources[n // 2][0] + 500.0  # between two snapshots: the newest ones are not at the target
    for target_t in (sources[-1][0], t_mid):
        gr = [_gamma(0.03), _gamma(0.10), _gamma(0.15), _gamma(0.25)]
        X, sol, rows = plan_coefficients(sources, target_t, gr)
        t = np.array([sources[i][0] for i, _ in rows])
        g = np.array([sources[i][1][k] for i, k in rows])
        assert np.all(t <= target_t)
        assert len(rows) <= phema.MAX_ROWS < 2 * n and sol.subset.all()
        for j, gj in enumerate(gr):
            want = _quadrature_error(X[:, j], t, g, target_t, gj)
            assert sol.error[j] == pytest.approx(want, rel=1e-3, abs=1e-7), (target_t, j)
            if target_t == sources[-1][0]:  # between snapshots narrow targets are far off, dense or not
                assert want < 0.02


def test_below_the_bound_the_coefficients_are_the_dense_solve_bitwise():
    n = phema.MAX_ROWS // 3  # 3 profiles: the most rows at or below the bound
    sources = _sources(n, sigma_rels=(0.05, 0.10, 0.2))
    t = np.array([s for s, gs in sources for _ in gs])
    g = np.array([x for _, gs in sources for x in gs])
    tr = np.array([t[-1], t[-1], t[-1], 0.5 * t[-1] + 10.0])
    gr = np.array([_gamma(0.04), _gamma(0.10), _gamma(0.17), _gamma(0.15)])
    sol = phema.solve_coefficients(t, g, tr, gr)
    X, err, cond = _dense_solve(t, g, tr, gr)
    assert np.array_equal(sol.coefficients, X)
    assert np.array_equal(sol.error, err)
    assert np.array_equal(sol.condition, cond)
    assert np.array_equal(sol.used, t[:, None] <= tr[None, :]) and not sol.subset.any()
    # one snapshot more and the last targets' solve is a subset: the bound is where it says
    t2, g2 = np.append(t, [t[-1] + 1000.0] * 3), np.append(g, g[:3])
    assert phema.solve_coefficients(t2, g2, t2[-1], gr[0]).subset.all()


def test_a_plan_holds_only_the_snapshots_it_uses(caplog):
    from dist_ema.synthesis import only_planned

    sources = _sources(3_000)
    X, sol, rows = plan_coefficients(sources, sources[-1][0], [_gamma(0.15)])
    with caplog.at_level("INFO", logger="dist_ema"):
        used, renumbered = only_planned(sources, rows)
    assert used[-1] == sources[-1] and len(used) == len({i for i, _ in rows}) < 3_000
    assert [(used[i][0], k) for i, k in renumbered] == [(sources[i][0], k) for i, k in rows]
    assert f"3000 snapshots at or before the target time: solved over {len(used)} of them" in caplog.text


def test_cli_error_on_a_long_schedule(capsys):
    from dist_ema.cli import main

    assert main(["error", "--snapshot-every", "1", "--steps", "100000", "--targets", "0.05", "0.15"]) == 0
    out = capsys.readouterr().out
    assert "100000 snapshots" in out and "subset" in out and "rel. error" in out
    assert main(["error", "--snapshot-every", "1", "--steps", "100000", "--targets", "0.15", "--json"]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    assert doc["snapshots"] == 100_000 and doc["snapshots_used"] <= phema.MAX_ROWS
    assert doc["targets"][0]["error"] < 0.02


# ---------------------------------------------------------------------------------- live models and stores

TRACKED = (0.05, 0.10)
TARGET = 0.15
SNAP_STEPS = (4, 8)  # snapshots taken by hand; the swap happens at step 10
SWAP_STEP = 10
FROZEN = ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias")


class BNNet(nn.Module):
    """Conv -> BatchNorm twice, then a linear head: running statistics are buffers that training changes."""

    def __init__(self, seed: int, frozen_backbone: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)
        self.head = nn.Linear(5, 2)
        if frozen_backbone:
            for m in (self.conv1, self.bn1):
                m.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean(dim=(2, 3)))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int, rank: int) -> None:
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.randn(6, 3, 8, 8, generator=g) * 2 + 0.5, torch.randint(0, 2, (6,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def worker_train_and_swap(rank: int, ws: int, out: str, url: str) -> None:
    from dist_ema import PostHocEMA

    model = nn.parallel.DistributedDataParallel(BNNet(seed=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    ema = PostHocEMA(model, sigma_rels=TRACKED, store=url)  # writer="process": commits at a later exchange
    for step in range(1, SWAP_STEP + 1):
        _train_step(model, opt, step, rank)
        ema.update()
        if step in SNAP_STEPS:
            ema.snapshot()
    with ema.swapped(sigma_rel=TARGET):
        swapped = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    live = {s: ema.full_state_dict(sigma_rel=s) for s in TRACKED}
    error = ema.last_synthesis_error
    ema.close()
    torch.save({"swapped": swapped, "live": live, "error": error}, Path(out) / f"swap{rank}.pt")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict (FSDP2 DTensors gathered)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def worker_load(rank: int, ws: int, out: str, url: str, frozen_url: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from dist_ema import load_synthesized

    got = {}
    for name, where, frozen in (("full", url, False), ("frozen", frozen_url, True)):
        model = BNNet(seed=99, frozen_backbone=frozen)
        fully_shard(model.conv2)
        fully_shard(model)
        before = _state(model)
        res = load_synthesized(model, where, sigma_rel=TARGET)
        got[name] = {"before": before, "after": _state(model), "result": res}
    if rank == 0:
        torch.save(got, Path(out) / "loaded.pt")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A DDP store (2 ranks, swapped() at step 10) and a frozen-backbone store, each synthesized to a file."""
    from safetensors.torch import load_file

    from dist_ema import PostHocEMA, synthesize

    tmp = tmp_path_factory.mktemp("stores")
    url, frozen_url = str(tmp / "ddp"), str(tmp / "frozen")
    run_workers("tests.test_planning_and_load:worker_train_and_swap", 2, tmp / "train", kwargs={"url": url})
    model = BNNet(seed=2, frozen_backbone=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    with PostHocEMA(model, sigma_rels=TRACKED, store=frozen_url, snapshot_every=4, include_frozen=False,
                    writer="sync") as ema:
        for step in range(1, 13):
            _train_step(model, opt, step, 0)
            ema.update()
    files = {}
    for name, where in (("full", url), ("frozen", frozen_url)):
        synthesize(where, sigma_rels=[TARGET], out=str(tmp / f"synth-{name}"), progress=False)
        files[name] = load_file(str(tmp / f"synth-{name}" / f"sigma_rel-{TARGET:.4f}" / "model.safetensors"))
    return {"url": url, "frozen_url": frozen_url, "train": tmp / "train", "files": files, "tmp": tmp}


def _profile(t: float, g: float, tau: np.ndarray) -> np.ndarray:
    return np.where(tau <= t, (g + 1) * (np.minimum(tau, t) / t) ** g / t, 0.0)


def _quadrature_coefficients(times, gammas, tr: float, gr: float) -> np.ndarray:
    """Least-squares coefficients of the profiles (times, gammas) for (tr, gr), normalized to sum 1;
    inner products by Gauss-Legendre quadrature on every piece between the times."""
    breaks = np.unique(np.concatenate([[0.0], times, [tr]]))
    nodes, weights = np.polynomial.legendre.leggauss(64)
    a, b = breaks[:-1, None], breaks[1:, None]
    tau = (a + (b - a) * (nodes[None, :] + 1) / 2).ravel()
    w = ((b - a) / 2 * weights[None, :]).ravel()
    P = np.stack([_profile(t, g, tau) for t, g in zip(times, gammas)])  # => [rows, nodes]
    x = np.linalg.solve((P * w) @ P.T, (P * w) @ _profile(tr, gr, tau))
    return x / x.sum()


def _brute_force(rows, tr: float, gr: float) -> dict[str, torch.Tensor]:
    """sum_i x_i value_i in float64 over rows [(t, sigma_rel, {name: value})]."""
    x = _quadrature_coefficients([t for t, _, _ in rows], [_gamma(s) for _, s, _ in rows], tr, gr)
    names = rows[0][2].keys()
    return {n: sum(float(xi) * r[2][n].double() for xi, r in zip(x, rows)) for n in names}


@pytest.mark.dist
def test_swapped_uses_every_snapshot_taken(stores):
    from dist_ema import open_store

    store = open_store(stores["url"])
    assert [s.step for s in store.snapshots()] == list(SNAP_STEPS)
    got = [torch.load(stores["train"] / f"swap{r}.pt") for r in range(2)]
    names = list(got[0]["swapped"])
    rows = [(float(step), s, {n: store.read(step, s, n) for n in names}) for step in SNAP_STEPS for s in TRACKED]
    rows += [(float(SWAP_STEP), s, got[0]["live"][s]) for s in TRACKED]
    want = _brute_force(rows, float(SWAP_STEP), _gamma(TARGET))
    # the same without the newest snapshot: what a plan from committed snapshots only would have used
    without = _brute_force([r for r in rows if r[0] != SNAP_STEPS[-1]], float(SWAP_STEP), _gamma(TARGET))
    assert max((want[n] - without[n]).abs().max().item() for n in names) > 1e-3
    for r in range(2):
        for n in names:
            torch.testing.assert_close(got[r]["swapped"][n].double(), want[n], rtol=1e-5, atol=2e-6, msg=n)


def _assert_state_is_file(state: dict, file: dict, skip=()) -> None:
    """Every tensor of the synthesized file equals the model's, bitwise (the dtypes match here)."""
    assert set(file) == set(state) - set(skip)
    for k, v in file.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


@pytest.mark.dist
def test_load_synthesized_writes_buffers_too(stores):
    from dist_ema import load_synthesized

    file = stores["files"]["full"]
    model = BNNet(seed=99)
    before = _state(model)
    assert not torch.equal(before["bn2.running_var"], file["bn2.running_var"])
    res = load_synthesized(model, stores["url"], sigma_rel=TARGET)
    _assert_state_is_file(_state(model), file)
    assert set(res.buffers) == {k for k in file if ".running_" in k or "num_batches" in k}
    assert res.kept_params == () and res.kept_buffers == ()
    # buffers=False: the parameters only, the model's buffers as they were (named in the result)
    model = BNNet(seed=99)
    res = load_synthesized(model, stores["url"], sigma_rel=TARGET, buffers=False)
    after = _state(model)
    for k in file:
        assert torch.equal(after[k], before[k] if k in res.kept_buffers else file[k]), k
    assert res.buffers == () and "bn1.running_mean" in res.kept_buffers


@pytest.mark.dist
def test_load_synthesized_from_a_store_without_frozen_parameters(stores):
    from dist_ema import load_synthesized
    from dist_ema.store.fs import StoreError

    file = stores["files"]["frozen"]
    assert not set(FROZEN) & set(file)  # include_frozen=False: the store holds no EMA of them
    model = BNNet(seed=99, frozen_backbone=True)
    before = _state(model)
    res = load_synthesized(model, stores["frozen_url"], sigma_rel=TARGET)
    after = _state(model)
    _assert_state_is_file(after, file, skip=FROZEN)
    assert res.kept_params == tuple(sorted(FROZEN))
    for k in FROZEN:
        assert torch.equal(after[k], before[k]), k
    # the same parameters trainable here: the store lacks what this model trains; refused, nothing written
    model = BNNet(seed=99)
    before = _state(model)
    with pytest.raises(StoreError, match=r"trainable .*conv1\.weight.*requires_grad_\(False\)"):
        load_synthesized(model, stores["frozen_url"], sigma_rel=TARGET)
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())
    model = BNNet(seed=99, frozen_backbone=True)
    model.head = nn.Linear(5, 3)
    with pytest.raises(StoreError, match=r"different shapes \['head\.bias', 'head\.weight'\]"):
        load_synthesized(model, stores["frozen_url"], sigma_rel=TARGET)


@pytest.mark.dist
def test_load_synthesized_on_two_fsdp2_ranks(stores, tmp_path):
    run_workers("tests.test_planning_and_load:worker_load", 2, tmp_path,
                kwargs={"url": stores["url"], "frozen_url": stores["frozen_url"]}, timeout=300)
    got = torch.load(tmp_path / "loaded.pt", weights_only=False)
    _assert_state_is_file(got["full"]["after"], stores["files"]["full"])
    frozen = got["frozen"]
    _assert_state_is_file(frozen["after"], stores["files"]["frozen"], skip=FROZEN)
    assert frozen["result"].kept_params == tuple(sorted(FROZEN))
    for k in FROZEN:
        assert torch.equal(frozen["after"][k], frozen["before"][k]), k


def test_planning_bad_input(capsys):
    from dist_ema.cli import main

    assert main(["error", "--snapshot-every", "1", "--steps", "1e9"]) == 2
    err = capsys.readouterr().err
    assert "1,000,000,000 snapshots" in err and "raise --snapshot-every" in err
    t = np.repeat(np.arange(1.0, 101.0), 2)
    with pytest.raises(ValueError, match="max_rows=10 is too small for snapshots of 2 profiles; give at least 16"):
        phema.solve_coefficients(t, np.tile([1.0, 2.0], 100), [100.0], [1.5], max_rows=10)
    with pytest.raises(ValueError, match="limit must be >= 8"):
        phema.choose_snapshots(np.arange(1.0, 101.0), 4)
