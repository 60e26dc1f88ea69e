"""Every zoo model (tests/zoo.py) under every engine, 2 ranks: track, snapshot, resume, swap, synthesize, load.

One multi-process run per engine trains each model in turn for 6 steps with two EMAs on the same
parameters: a control EMA (store ``control``, snapshots at steps 2, 4, 6) and one closed after step 4
and resumed from its store (``resumed``). Rank 0 checks, against computations written here:

- the tracked EMA (``full_state_dict``) = sum_j w_j theta_j over the recorded full parameters, the
  weights w_j from the telescoping product of the per-update betas (float64);
- the resumed EMA = the control EMA, bit for bit;
- every snapshot, read plainly (zarr arrays of each rank + the store's JSON index, decoded here), holds
  the control EMA of its step (step 6: bitwise the tracked one) and the model's buffers of that step;
- ``synthesize`` (sigma_rel 0.07 at t=6) = sum_i x_i snapshot_i, with x solved here by numpy lstsq
  on the closed-form inner products of power-function profiles; its buffers = the model's at step 6;
  the file loads with a strict ``load_state_dict`` into a fresh model;
- ``swapped(sigma_rel=0.07)`` puts the synthesized weights in the live model, and the training weights
  come back bit for bit;
- ``load_synthesized`` at step 4 puts the EMA of t=4 (x solved here) and the buffers of step 4 into
  the live sharded model on every rank.

Each failed check is recorded (model, check, traceback) and the run goes on with the next model; the
test fails listing all of them.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist_harness import run_workers

pytestmark = pytest.mark.zoo

SIGMAS = (0.05, 0.10)
TARGET = 0.07  # an untracked profile: synthesized
STEPS, RESUME_AFTER, EVERY = 6, 4, 2
LIB_TIMEOUT_S, AGREE_S = 30.0, 120.0  # the library's collectives give up first, then the ranks agree


# ----------------------------------------------------------------------------- independent references


def gamma_of(sigma_rel: float) -> float:
    """The largest real root of g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2) = 0 (EDM2, Eq. for sigma_rel)."""
    s2 = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def update_weights(gamma: float, n: int) -> np.ndarray:
    """Weight of the parameters after update j (1..n) in the EMA after n updates, one update per step:
    w_j = (1 - beta_j) * prod_{k > j} beta_k with beta_k = (1 - 1/k)^(gamma+1)."""
    beta = np.array([(1.0 - 1.0 / k) ** (gamma + 1.0) for k in range(1, n + 1)], dtype=np.float64)
    return np.array([(1.0 - beta[j]) * np.prod(beta[j + 1:]) for j in range(n)], dtype=np.float64)


def brute_force_ema(trajectory: list[dict[str, torch.Tensor]], gamma: float) -> dict[str, torch.Tensor]:
    w = update_weights(gamma, len(trajectory))
    return {k: sum(float(w[j]) * theta[k].double() for j, theta in enumerate(trajectory)) for k in trajectory[0]}


def inner(ta: float, ga: float, tb: float, gb: float) -> float:
    """<p_a, p_b> of two power-function profiles p(tau) = (g+1) tau^g / t^(g+1) on [0, t]."""
    return (ga + 1) * (gb + 1) * min(ta, tb) ** (ga + gb + 1) / ((ga + gb + 1) * ta ** (ga + 1) * tb ** (gb + 1))


def coefficients(sources: list[tuple[float, float]], t_r: float, g_r: float) -> np.ndarray:
    """Least-squares coefficients of the sources (t_i, g_i), t_i <= t_r, for the target (t_r, g_r), summing to 1."""
    A = np.array([[inner(ti, gi, tj, gj) for tj, gj in sources] for ti, gi in sources])  # => [n, n]
    b = np.array([inner(ti, gi, t_r, g_r) for ti, gi in sources])  # => [n]
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    return x / x.sum()


def plain_snapshots(root: Path) -> dict[int, dict]:
    """Every committed snapshot of a format-2 store, read without dist-ema: {step: {t, gammas, params, buffers}}.

    The store's JSON (commit marker, layout index) is decoded here; each rank's array
    ``[profiles, numel]`` is read with zarr-python; every element of every parameter must be covered.
    """
    import zarr

    out = {}
    for marker in sorted((root / "snapshots").glob("step-*/commit.json")):
        meta = json.loads(marker.read_text())
        attempt = marker.parent / meta["attempt"]
        index = root / "layouts" / meta["layout"]
        names = json.loads((index / "params.json").read_text())["params"]  # [[fqn, shape, dtype], ...]
        flat = [np.full(math.prod(shape), np.nan, dtype=np.float64) for _, shape, _ in names]
        per_profile = [[f.copy() for f in flat] for _ in meta["profiles"]]
        for r in range(meta["world_size"]):
            pieces = json.loads((index / f"rank-{r:05d}.json").read_text())["pieces"]
            if not pieces:
                continue
            arr = zarr.open_array(str(attempt / f"r{r:05d}"), mode="r", zarr_format=3)[...]
            for k, values in enumerate(per_profile):
                for param, start, numel, offset in pieces:
                    values[param][start:start + numel] = arr[k, offset:offset + numel]
        params = []
        for values in per_profile:
            assert not any(np.isnan(v).any() for v in values), f"{marker}: parameter elements no rank stored"
            params.append({fqn: torch.from_numpy(v.reshape(shape)) for (fqn, shape, _), v in zip(names, values)})
        buffers = {}
        if meta.get("buffers"):
            raw = zarr.open_array(str(attempt / "buffers"), mode="r", zarr_format=3)[...].tobytes()
            for name, shape, dtype, off, nb in meta["buffers"]:
                buffers[name] = torch.from_numpy(np.frombuffer(raw[off:off + nb], dtype=dtype).reshape(shape).copy())
        out[int(meta["step"])] = {"t": float(meta["t"]), "gammas": [p["gamma"] for p in meta["profiles"]],
                                  "params": params, "buffers": buffers}
    return out


def expected_synthesis(snaps: dict[int, dict], t_r: float, sigma_rel: float) -> dict[str, torch.Tensor]:
    """sum_i x_i snapshot_i over the snapshots at or before t_r (float64), x from :func:`coefficients`."""
    rows = [(s["t"], g, s["params"][k]) for s in snaps.values() if s["t"] <= t_r for k, g in enumerate(s["gammas"])]
    x = coefficients([(t, g) for t, g, _ in rows], t_r, gamma_of(sigma_rel))
    return {name: sum(float(xi) * vals[name] for xi, (_, _, vals) in zip(x, rows)) for name in rows[0][2]}


# ----------------------------------------------------------------------------- comparisons


def close(got: dict, want: dict, what: str, rtol: float = 2e-5, atol: float = 2e-6) -> None:
    for k, v in want.items():
        assert k in got, f"{what}: {k} missing (has {sorted(got)[:8]})"
        torch.testing.assert_close(got[k].double(), v.double(), rtol=rtol, atol=atol, msg=f"{what}: {k}")


def equal(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: keys {sorted(set(got) ^ set(want))} differ"
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, f"{what}: {k} {got[k].dtype}{tuple(got[k].shape)}"
        assert torch.equal(got[k], v), f"{what}: {k} differs (max {(got[k].double() - v.double()).abs().max():.3g})"


# ----------------------------------------------------------------------------- the worker


class Checks:
    """Runs named checks; a failure is recorded with its traceback and the run goes on.

    A collective step (``rank0=False``) ends with every rank agreeing whether it passed on all ranks,
    over a gloo group of its own with a timeout: an error raised on one rank only (itself a defect:
    the library must raise it on every rank) then skips the rest of the model on every rank, instead
    of leaving the ranks in different collectives.
    """

    def __init__(self, rank: int, engine: str) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        self.rank, self.engine, self.model, self.failures = rank, engine, "", []
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=AGREE_S))

    def __call__(self, name: str, fn, *, rank0: bool = True) -> bool:
        if rank0 and self.rank != 0:
            return True
        try:
            fn()
            ok = True
        except Exception:
            tail = "\n".join(traceback.format_exc().strip().splitlines()[-12:])
            self.failures.append({"engine": self.engine, "model": self.model, "check": name, "rank": self.rank,
                                  "error": tail})
            ok = False
        return ok if rank0 else self.agree(ok)

    def agree(self, ok: bool) -> bool:
        import torch.distributed as dist

        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, ok, group=self.group)
        return all(flags)


def zoo_worker(rank: int, world_size: int, out_dir: str, engine: str, models: list[str]) -> None:
    from tests.zoo import MODELS

    checks, timings = Checks(rank, engine), {}
    for name in models:
        checks.model = name
        print(f"zoo {engine}/{name}", flush=True)
        start, ema = time.perf_counter(), {}
        try:
            _one_model(rank, Path(out_dir) / name, engine, MODELS[name], checks, ema)
        finally:
            for e in ema.values():  # left open by a failed check: stop its writer, free the store
                if e.snapshots is not None:
                    e.snapshots.abandon()
        timings[name] = round(time.perf_counter() - start, 2)
    (Path(out_dir) / f"failures-{rank}.json").write_text(json.dumps(checks.failures))
    (Path(out_dir) / f"timings-{rank}.json").write_text(json.dumps(timings))


def _one_model(rank: int, out: Path, engine: str, spec, checks: Checks, ema: dict) -> None:
    from safetensors.torch import load_file

    from dist_ema import PostHocEMA, load_synthesized, synthesize
    from tests.zoo import wrap

    run = wrap(engine, spec, seed=0)
    # the library's own collectives give up after LIB_TIMEOUT_S: a rank left alone in one fails in bounded time
    kw = dict(sigma_rels=SIGMAS, snapshot_every=EVERY, writer="sync", timeout=LIB_TIMEOUT_S, **spec.ema_kwargs)
    control, resumed = str(out / "control"), str(out / "resumed")
    if not checks("create", lambda: ema.update(c=PostHocEMA(run.target, store=control, **kw),
                                               r=PostHocEMA(run.target, store=resumed, **kw)), rank0=False):
        return
    trajectory, buffers = [], {}
    for step in range(1, STEPS + 1):
        run.step(step)
        if not checks("update", lambda: (ema["c"].update(), ema["r"].update()), rank0=False):
            return
        trajectory.append(run.full_params())
        buffers[step] = run.buffers()
        if step == RESUME_AFTER and not checks("resume", lambda: (ema["r"].close(), ema.update(
                r=PostHocEMA(run.target, store=resumed, resume=True, **kw))), rank0=False):
            return
    tracked, again = {}, {}
    if not checks("flush and gather", lambda: (ema["c"].flush(), ema["r"].flush(), [
            (tracked.update({s: ema["c"].full_state_dict(sigma_rel=s)}),
             again.update({s: ema["r"].full_state_dict(sigma_rel=s)})) for s in SIGMAS]), rank0=False):
        return
    names = {n for n, p in run.net.named_parameters()}
    if spec.ema_kwargs.get("include_frozen") is False:
        names = {n for n, p in run.net.named_parameters() if p.requires_grad}
    names = {n.replace("_fsdp_wrapped_module.", "") for n in names}
    tracked_traj = [{k: v for k, v in theta.items() if k in names} for theta in trajectory]

    def check_tracked() -> None:
        for s in SIGMAS:
            close(tracked[s], brute_force_ema(tracked_traj, gamma_of(s)), f"tracked sigma_rel={s}")
            last = tracked_traj[-1]
            assert max((tracked[s][k].double() - last[k]).abs().max().item() for k in last) > 1e-5, "raw weights"

    checks("tracked EMA = brute force", check_tracked)
    checks("resumed EMA = control, bitwise", lambda: [equal(again[s], tracked[s], f"sigma_rel={s}") for s in SIGMAS])

    # swap: the synthesized profile in the live model, the training weights back exactly
    before, inside = run.full_params(), {}
    swapped_ok = checks("swapped", lambda: _swap(ema["c"], run, inside), rank0=False)
    after = run.full_params()
    checks("swap restores the training weights", lambda: equal(after, before, "after swap"))
    if not checks("close", lambda: [e.close() for e in ema.values()], rank0=False):
        return

    syn = out / "synthesized"
    if not checks("synthesize", lambda: synthesize(control, sigma_rels=[TARGET], out=str(syn), progress=False,
                                                   timeout=LIB_TIMEOUT_S), rank0=False):
        return
    snaps = {}
    checks("plain read of the snapshots", lambda: snaps.update(plain_snapshots(Path(control))))

    def check_snapshots() -> None:
        assert sorted(snaps) == [2, 4, 6], sorted(snaps)
        for step, snap in snaps.items():
            equal(snap["buffers"], buffers[step], f"buffers of snapshot {step}")
            for k, s in enumerate(SIGMAS):
                want = brute_force_ema(tracked_traj[:step], gamma_of(s))
                close(snap["params"][k], want, f"snapshot {step} sigma_rel={s}")
        final = {k: v.float() for k, v in snaps[6]["params"][0].items()}
        equal(final, {k: v for k, v in tracked[SIGMAS[0]].items() if k in final}, "snapshot 6 = tracked EMA")

    checks("snapshots hold the EMA and the buffers of their step", check_snapshots)
    files = list(syn.rglob("*.safetensors"))
    file = {}
    checks("one output file", lambda: (len(files) == 1 or _fail(f"files {files}"), file.update(load_file(files[0]))))

    def check_file() -> None:
        close(file, expected_synthesis(snaps, 6.0, TARGET), "synthesized file", rtol=1e-5, atol=1e-6)
        equal({k: file[k] for k in buffers[6]}, buffers[6], "buffers in the synthesized file")
        fresh = _fresh(spec)
        missing, unexpected = fresh.load_state_dict(file, strict=False)
        frozen = {n for n, p in fresh.named_parameters(remove_duplicate=False) if not p.requires_grad}
        allowed = frozen if spec.ema_kwargs.get("include_frozen") is False else set()
        assert not unexpected and set(missing) <= allowed, f"missing {missing}, unexpected {unexpected}"

    checks("synthesized file = independent weighted sum of the snapshots", check_file)
    if swapped_ok:
        checks("swapped weights = synthesized file", lambda: close(inside, {k: file[k] for k in names}, "swapped",
                                                                    rtol=1e-6, atol=1e-7))

    # load_synthesized at step 4: the parameters of t=4 and the buffers of step 4 on every rank
    if checks("load_synthesized", lambda: load_synthesized(run.target, control, sigma_rel=TARGET, step=4),
              rank0=False):
        loaded, loaded_buffers = run.full_params(), run.buffers()
        if snaps:
            checks("load_synthesized parameters = independent sum at t=4", lambda: close(
                {k: v for k, v in loaded.items() if k in names}, expected_synthesis(snaps, 4.0, TARGET),
                "loaded", rtol=1e-5, atol=1e-6))
        want = [buffers[4]]  # the snapshot holds rank 0's buffers (ranks may differ: BatchNorm under FSDP)
        torch.distributed.broadcast_object_list(want, src=0, group=checks.group)
        checks("load_synthesized buffers = the buffers of step 4", lambda: equal(
            loaded_buffers, want[0], f"buffers on rank {rank}"), rank0=False)


def _swap(ema, run, inside: dict) -> None:
    with ema.swapped(sigma_rel=TARGET):
        inside.update(run.full_params())


def _fresh(spec):
    torch.manual_seed(0)
    return spec.make()


def _fail(msg: str):
    raise AssertionError(msg)


# ----------------------------------------------------------------------------- the tests


@pytest.mark.dist
@pytest.mark.timeout(900)
@pytest.mark.parametrize("engine", ["replicated", "ddp", "fsdp2", "fsdp1", "zero1", "zero2", "zero3"])
def test_zoo(tmp_path, engine):
    from tests.zoo import MODELS

    run_workers("tests.test_zoo:zoo_worker", 2, tmp_path, kwargs={"engine": engine, "models": list(MODELS)},
                timeout=600)
    failures = [f for r in range(2) for f in json.loads((tmp_path / f"failures-{r}.json").read_text())]
    timings = json.loads((tmp_path / "timings-0.json").read_text())
    print(f"zoo {engine}: seconds per model {timings}")
    if failures:
        report = "\n\n".join(f"[{f['engine']}/{f['model']}] {f['check']} (rank {f['rank']}):\n{f['error']}"
                             for f in failures)
        pytest.fail(f"{len(failures)} zoo check(s) failed under {engine}:\n\n{report}", pytrace=False)


def test_references_are_independent_and_right():
    """The references themselves: the betas' weights sum to 1 and match the closed form; coefficients that
    reproduce a tracked profile exactly pick that profile."""
    for s in SIGMAS:
        g = gamma_of(s)
        assert abs(math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) - s) < 1e-12
        w = update_weights(g, 6)
        assert abs(w.sum() - 1.0) < 1e-12
        closed = [(j / 6) ** (g + 1) - ((j - 1) / 6) ** (g + 1) for j in range(1, 7)]
        np.testing.assert_allclose(w, closed, rtol=1e-12, atol=1e-15)
    g = [gamma_of(s) for s in SIGMAS]
    x = coefficients([(4.0, g[0]), (4.0, g[1]), (6.0, g[0]), (6.0, g[1])], 6.0, g[1])
    np.testing.assert_allclose(x, [0, 0, 0, 1], atol=1e-8)
