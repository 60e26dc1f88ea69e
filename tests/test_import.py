"""dist-ema import: real runs of ema-pytorch, nitrous-ema and pytorch-posthoc-ema, written by the libraries
themselves, turned into stores that ls, synthesize and load_synthesized use.

Each library trains a small conv net with BatchNorm for 40 steps and writes its own folder
(sigma_rels 0.05 and 0.10, a file per profile every 5 steps). The synthesized EMA is checked
against (a) the library's own ``synthesize_ema_model`` and (b) a least-squares reconstruction
written out here from the files alone (power-function inner products by Gauss-Legendre quadrature,
gamma by bisection on the sigma_rel formula). The libraries' conventions are checked on a one-hot
trajectory: the file holds the weight of every step directly.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import socket

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import dist_ema
from dist_ema import cli, open_store
from dist_ema.importers import profiles

pytest.importorskip("ema_pytorch")
pytest.importorskip("nitrous_ema")
pytest.importorskip("posthoc_ema")

SIGMA_RELS = (0.05, 0.10)
TARGET = 0.08
STEPS, EVERY = 40, 5
POSTHOC_U = 3  # pytorch-posthoc-ema's update_after_step in the runs here: its EMA starts at step 3
KINDS = ("ema-pytorch", "nitrous-ema", "posthoc-ema")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _library_ema(kind: str, model: nn.Module, folder: str, k: int = 1, every: int = EVERY, u: int = POSTHOC_U,
                 **kw):
    """The library's PostHocEMA writing into ``folder``, and its per-step update call."""
    if kind == "ema-pytorch":
        from ema_pytorch import PostHocEMA

        ema = PostHocEMA(model, sigma_rels=SIGMA_RELS, update_every=k, checkpoint_every_num_steps=every,
                         checkpoint_folder=folder, **kw)
        return ema, ema.update
    if kind == "nitrous-ema":
        from nitrous_ema.ema import PostHocEMA

        ema = PostHocEMA(model, sigma_rels=SIGMA_RELS, update_every=k, checkpoint_every_num_steps=every,
                         checkpoint_folder=folder, **kw)
        return ema, ema.update
    from posthoc_ema import PostHocEMA

    ema = PostHocEMA.from_model(model, folder, sigma_rels=SIGMA_RELS, update_every=k, checkpoint_every=every,
                                update_after_step=u, **kw)
    return ema, lambda: ema.update_(model)


def _train(kind: str, folder: str, steps: int = STEPS, **kw):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    ema, update = _library_ema(kind, model, folder, **kw)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    for step in range(steps):
        b = slice(8 * (step % 8), 8 * (step % 8 + 1))
        loss = nn.functional.cross_entropy(model(x[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        update()
    return model, ema


def _t_of(kind: str, step: int) -> float:
    """The time of a file (update_every 1), written out: the EMA's own calls + 1."""
    calls = step - POSTHOC_U + 1 if kind == "posthoc-ema" else step
    return calls + 1.0


@pytest.fixture(scope="module", params=KINDS)
def run(request, tmp_path_factory):
    """A library's real run, its folder, and that folder imported (in process, through the CLI)."""
    kind = request.param
    base = tmp_path_factory.mktemp(kind)
    src, store = str(base / "ckpt"), str(base / "store")
    model, ema = _train(kind, src)
    rc = cli.main(["import", kind, src, store, "--sigma-rels", *map(str, SIGMA_RELS), "--update-every", "1"])
    assert rc == 0
    out = str(base / "synth")
    res = dist_ema.synthesize(store, sigma_rels=[TARGET], out=out, progress=False)
    (f,) = [os.path.join(d, n) for d, _, ns in os.walk(out) for n in ns if n.endswith(".safetensors")]
    return kind, src, store, model, ema, res, load_file(f)


def test_ls_lists_every_step_with_its_time(run, capsys):
    kind, src, store, *_ = run
    steps = list(range(EVERY, STEPS + 1, EVERY))
    snaps = open_store(store).snapshots()
    assert [s.step for s in snaps] == steps
    assert [s.t for s in snaps] == [_t_of(kind, s) for s in steps]
    assert all(s.sigma_rels == SIGMA_RELS and s.world_size == 1 and s.version == 2 for s in snaps)
    capsys.readouterr()
    assert cli.main(["ls", store, "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"{len(steps)} committed snapshot(s)" in out and f"import:{kind}" in out
    assert f"{_t_of(kind, 40):g} steps" in out
    meta = snaps[-1].meta["imported"]
    assert meta["kind"] == kind and meta["update_every"] == 1 and meta["profile"].startswith("exact")
    assert meta["files"] == ["0.40.pt", "1.40.pt"]
    assert meta["update_after_step"] == (POSTHOC_U if kind == "posthoc-ema" else 1)


# ----------------------------------------------------------------------------- an independent reconstruction


def _gamma(sigma_rel: float) -> float:
    """gamma with sqrt((g+1) / ((g+2)^2 (g+3))) = sigma_rel, by bisection (sigma decreases in g)."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.sqrt((mid + 1) / ((mid + 2) ** 2 * (mid + 3))) > sigma_rel:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _inner(ta: float, ga: float, tb: float, gb: float) -> float:
    """<p_a, p_b> of p(tau) = (g+1) tau^g / t^(g+1) on [0, t], by 64-point Gauss-Legendre quadrature."""
    x, w = np.polynomial.legendre.leggauss(64)
    m = min(ta, tb)
    tau = 0.5 * m * (x + 1.0)
    pa = (ga + 1) * tau**ga / ta ** (ga + 1)
    pb = (gb + 1) * tau**gb / tb ** (gb + 1)
    return float(0.5 * m * np.sum(w * pa * pb))


def _files(src: str) -> list[tuple[int, int, dict]]:
    """(profile, step, {name: float64 array}) of every file, the library's own prefix and entries dropped."""
    out = []
    for n in sorted(os.listdir(src)):
        k, step = map(int, n[:-3].split("."))
        sd = torch.load(os.path.join(src, n), weights_only=True)
        tensors = {key.removeprefix("ema_model."): v.double().numpy() for key, v in sd.items()
                   if torch.is_tensor(v) and key not in ("initted", "step") and v.is_floating_point()
                   and v.dim() > 0 and not key.endswith(("running_mean", "running_var"))}
        out.append((k, step, tensors))
    return out


def _combine(files, x) -> dict:
    return {name: sum(xi * f[name] for xi, (_, _, f) in zip(x, files)) for name in files[0][2]}


def _independent(kind: str, src: str, sigma_rel: float) -> dict:
    """The target EMA from the files: least squares over the power-function profiles, normalized (EDM2)."""
    files = _files(src)
    t = [_t_of(kind, s) for _, s, _ in files]
    g = [_gamma(SIGMA_RELS[k]) for k, _, _ in files]
    tr, gr = max(t), _gamma(sigma_rel)
    A = np.array([[_inner(ta, ga, tb, gb) for tb, gb in zip(t, g)] for ta, ga in zip(t, g)])
    b = np.array([_inner(ta, ga, tr, gr) for ta, ga in zip(t, g)])
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    return _combine(files, x / x.sum())


def test_synthesis_matches_an_independent_least_squares(run):
    """dist-ema's synthesized EMA is the least-squares combination of the files at t = the EMA's calls + 1:
    the same to float32 rounding (the output is float32; the solves differ by conditioning only)."""
    kind, src, _, _, _, res, got = run
    want = _independent(kind, src, TARGET)
    scale = max(np.abs(v).max() for v in want.values())
    worst = max(np.abs(got[n].double().numpy() - w).max() for n, w in want.items()) / scale
    print(f"{kind}: dist-ema vs independent least squares: max |diff| / max |w| = {worst:.2e}; "
          f"reconstruction error {100 * res.targets[0]['error']:.3f}%")
    assert worst < 2e-6


# ----------------------------------------------------------------------------- the library's own synthesis


def _library_synthesized(kind: str, ema, src: str, sigma_rel: float) -> dict:
    if kind == "ema-pytorch":
        m = ema.synthesize_ema_model(sigma_rel=sigma_rel).ema_model
        return {n: v.detach().double().numpy() for n, v in m.named_parameters()}
    if kind == "nitrous-ema":
        m = ema.synthesize_ema_model(sigma_rel=sigma_rel, device="cpu").ema_model
        return {n: v.detach().double().numpy() for n, v in m.named_parameters()}
    with ema.state_dict(sigma_rel=sigma_rel) as sd:
        return {n: v.double().numpy() for n, v in sd.items() if v.is_floating_point() and "running" not in n}


def _library_coefficients(kind: str, files, sigma_rel: float) -> np.ndarray:
    """The library's own coefficients, written out: t = the file's step, A x = b as solved there, not
    normalized; pytorch-posthoc-ema solves in float32 by default."""
    t = np.array([float(s) for _, s, _ in files])
    g = np.array([_gamma(SIGMA_RELS[k]) for k, _, _ in files])
    A = np.array([[_inner(ta, ga, tb, gb) for tb, gb in zip(t, g)] for ta, ga in zip(t, g)])
    b = np.array([_inner(ta, ga, t.max(), _gamma(sigma_rel)) for ta, ga in zip(t, g)])
    if kind == "posthoc-ema":
        return np.linalg.solve(A.astype(np.float32), b.astype(np.float32)).astype(np.float64)
    return np.linalg.solve(A, b)


def test_synthesis_against_the_library_own(run):
    """Both are combinations of the same files; they differ only in the coefficients: the library takes
    t = the file's step (one step early for every file: the EMA after call i is the profile at i + 1;
    pytorch-posthoc-ema's step also counts the steps before its EMA started) and does not normalize them.
    So |dist-ema - library| <= sum |x_dist-ema - x_library| * max |file| (the tolerance asserted), and the
    library's output is its coefficients applied to the files (checked, which shows that this is the whole
    difference)."""
    kind, src, _, _, ema, res, got = run
    files = _files(src)
    lib = _library_synthesized(kind, ema, src, TARGET)
    x_lib = _library_coefficients(kind, files, TARGET)
    replay = _combine(files, x_lib)
    names = sorted(replay)
    rel = lambda a, b: max(np.abs(a[n] - b[n]).max() for n in names) / max(np.abs(b[n]).max() for n in names)  # noqa: E731
    assert rel(lib, replay) < (2e-3 if kind == "posthoc-ema" else 1e-5)  # float32 sums (and solve) of the library
    t = np.array([_t_of(kind, s) for _, s, _ in files])
    g = np.array([_gamma(SIGMA_RELS[k]) for k, _, _ in files])
    A = np.array([[_inner(ta, ga, tb, gb) for tb, gb in zip(t, g)] for ta, ga in zip(t, g)])
    bb = np.array([_inner(ta, ga, t.max(), _gamma(TARGET)) for ta, ga in zip(t, g)])
    x_ours = np.linalg.lstsq(A, bb, rcond=None)[0]
    x_ours /= x_ours.sum()
    ours = {n: got[n].double().numpy() for n in names}
    bound = np.abs(x_ours - x_lib).sum() * max(np.abs(f[n]).max() for _, _, f in files for n in names)
    worst = max(np.abs(ours[n] - lib[n]).max() for n in names)
    print(f"{kind}: dist-ema vs the library's own synthesis: max |diff| / max |w| = {rel(ours, lib):.2e} "
          f"(bound from the coefficients {bound / max(np.abs(lib[n]).max() for n in names):.2e}); "
          f"sum of the library's coefficients {x_lib.sum():.4f}")
    assert worst <= bound + 1e-5
    assert rel(ours, lib) < (0.5 if kind == "posthoc-ema" else 0.05)


def test_load_synthesized_into_the_model(run):
    """load_synthesized writes the synthesized EMA into a fresh model: the exported file's weights, and the
    buffers of the newest snapshot (the smallest sigma_rel's file)."""
    kind, src, store, *_, got = run
    model = Net()
    res = dist_ema.load_synthesized(model, store, sigma_rel=TARGET)
    assert set(res.buffers) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), got[n]), n
    newest = torch.load(os.path.join(src, "0.40.pt"), weights_only=True)
    prefix = "" if kind == "posthoc-ema" else "ema_model."
    assert torch.equal(model.bn.running_mean, newest[prefix + "bn.running_mean"].float())
    assert model.bn.num_batches_tracked.dtype == torch.int64
    assert torch.equal(got["bn.running_var"], newest[prefix + "bn.running_var"].float())


# ----------------------------------------------------------------------------- conventions, on a one-hot run


class OneHot(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))


def _one_hot_run(kind: str, folder: str, n: int, k: int, u: int = 1, **kw) -> None:
    """The model's weights at step c are e_c, so a file holds the weight of every step."""
    model = OneHot(n)
    extra = {"checkpoint_dtype": torch.float32} if kind == "ema-pytorch" else {}
    if kind == "posthoc-ema":
        extra["max_checkpoints"] = 100
    ema, update = _library_ema(kind, model, folder, k=k, every=1, u=u, **extra, **kw)
    for c in range(1, n + 1):
        with torch.no_grad():
            model.w.zero_()
            model.w[c - 1] = 1.0
        update()


@pytest.mark.parametrize("kind,k,u,corr", [("ema-pytorch", 1, 1, False), ("nitrous-ema", 1, 1, False),
                                           ("posthoc-ema", 1, 4, False), ("ema-pytorch", 3, 1, False),
                                           ("posthoc-ema", 4, 2, False), ("nitrous-ema", 2, 1, True)])
def test_applied_weights_are_the_library_own(kind, k, u, corr, tmp_path):
    """What profiles.py says each library applied is what the library applied (its own one-hot run); with
    update_every 1 that is the power-function profile at t = (the EMA's calls) + 1, the first step's weights
    on [0, 2]: the time every imported snapshot gets."""
    n = 14
    _one_hot_run(kind, str(tmp_path), n, k, u, **({"step_size_correction": True} if corr else {}))
    for p, s in enumerate(SIGMA_RELS):
        g = _gamma(s)
        for step in (u + 3, n):
            sd = torch.load(tmp_path / f"{p}.{step}.pt", weights_only=True)
            (w,) = [v.double().numpy() for key, v in sd.items() if torch.is_tensor(v) and v.numel() == n]
            calls = step - u + 1
            upd, applied = profiles.applied_weights(g, calls, k, corr)
            want = np.zeros(n)
            want[upd + u - 2] = applied
            np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-7)
            if k == 1:  # the nominal profile at t = calls + 1: steps cover [c, c + 1], the first [0, 2]
                edges = np.concatenate([[0.0], np.arange(2, calls + 2, dtype=np.float64)])
                nominal = np.diff((edges / (calls + 1)) ** (g + 1))
                np.testing.assert_allclose(w[u - 1: step], nominal, rtol=1e-5, atol=1e-7)


def test_update_every_above_one_is_warned_and_recorded(tmp_path, caplog):
    """ema-pytorch with update_every=3: the one-step beta once per 3 steps. The import warns with the
    measured errors, records the rule and the effective sigma_rels (checked against the std of the weights
    the library applied), leaves out the files whose EMA had not moved, and t is the last update's + 1."""
    n, k = 14, 3
    src, store = str(tmp_path / "ckpt"), str(tmp_path / "store")
    _one_hot_run("ema-pytorch", src, n, k)
    with caplog.at_level(logging.WARNING, logger="dist_ema"):
        res = dist_ema.import_run("ema-pytorch", src, store, sigma_rels=SIGMA_RELS, update_every=k)
    assert not res.exact
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "one-step beta" in warned and "do NOT hold the nominal" in warned and "effective sigma_rels" in warned
    snaps = open_store(store).snapshots()
    assert [s.step for s in snaps] == [1, 4, 7, 10, 13]  # the updates are at calls 1, 4, 7, ...; 2, 3, 5, ... left out
    assert res.repeated == (2, 3, 5, 6, 8, 9, 11, 12, 14)
    assert [s.t for s in snaps] == [2.0, 5.0, 8.0, 11.0, 14.0]
    meta = snaps[-1].meta
    assert meta["update_every"] == 3 and "update_every=3" in meta["t_delta_rule"]
    assert meta["imported"]["profile"].startswith("NOT the nominal")
    for p, s in enumerate(SIGMA_RELS):
        w = torch.load(os.path.join(src, f"{p}.13.pt"), weights_only=True)["ema_model.w"].double().numpy()
        tau = np.arange(1, n + 1) + 0.5
        tau[0] = 1.0
        mean = (w * tau).sum()
        sigma = np.sqrt((w * (tau - mean) ** 2).sum()) / 14.0
        assert meta["imported"]["effective_sigma_rels"][p] == pytest.approx(sigma, rel=1e-6)
        assert sigma > 1.5 * s  # much wider than the nominal profile
    for c in res.targets:
        assert c.applied_error > c.error  # what was applied reconstructs worse than the solver's nominal error
    assert max(meta["imported"]["profile_errors"]) > 0.1


def test_float16_steps_are_taken_from_the_file_names(tmp_path):
    """ema-pytorch casts its step counter to float16 with the weights: above 2048 not exact, above 65504 inf.
    The steps come from the file names."""
    for start in (2990, 65530):
        src, store = str(tmp_path / f"ckpt{start}"), str(tmp_path / f"store{start}")
        torch.manual_seed(0)
        model = Net()
        ema, update = _library_ema("ema-pytorch", model, src)
        for m in ema.ema_models:
            m.step.fill_(start)  # as if the run were that far
        for _ in range(10):
            update()
        sd = torch.load(os.path.join(src, f"0.{start + 5 - start % 5}.pt"), weights_only=True)
        assert sd["step"].dtype == torch.float16
        assert float(sd["step"]) != start + 5 - start % 5  # not the step: rounded (2995 -> 2996) or inf
        assert cli.main(["import", "ema-pytorch", src, store, "--sigma-rels", "0.05", "0.1", "--update-every",
                         "1"]) == 0
        snaps = open_store(store).snapshots()
        first = start + 5 - start % 5
        assert [s.step for s in snaps] == [first, first + 5]
        assert [s.t for s in snaps] == [first + 1.0, first + 6.0]


def test_posthoc_ema_keeps_only_the_last_files_warned(tmp_path, caplog):
    """pytorch-posthoc-ema keeps the last 20 files per profile: a run of 60 checkpoints has lost its first 40,
    and the import says what that costs (reconstruction errors with the files left, and with a full run's)."""
    src, store = str(tmp_path / "ckpt"), str(tmp_path / "store")
    _train("posthoc-ema", src, steps=60, every=1, u=1)
    with caplog.at_level(logging.WARNING, logger="dist_ema"):
        res = dist_ema.import_run("posthoc-ema", src, store, sigma_rels=SIGMA_RELS, update_every=1)
    assert res.steps == tuple(range(41, 61)) and res.update_after_step == 1
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "only the end of the run" in warned and "keeps only the last 20 files" in warned
    wide = [c for c in res.targets if c.sigma_rel == 0.15][0]
    assert wide.full_run_error is not None and wide.error > 3 * wide.full_run_error
    print(f"posthoc-ema, the last 20 of 60 files: sigma_rel 0.15 error {100 * wide.error:.2f}% "
          f"(full run {100 * wide.full_run_error:.3f}%)")


# ----------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small real ema-pytorch folder (3 steps of 2 profiles), copied by each refusal test."""
    src = str(tmp_path_factory.mktemp("refusals") / "ckpt")
    _train("ema-pytorch", src, steps=15)
    return src


def _copy(folder: str, tmp_path) -> str:
    dst = str(tmp_path / "src")
    shutil.copytree(folder, dst)
    return dst


def _refused(capsys, args: list[str], *needles: str) -> str:
    capsys.readouterr()
    assert cli.main(["import", *args]) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def test_refusals(folder, tmp_path, capsys):
    src = _copy(folder, tmp_path)
    store = str(tmp_path / "store")
    sr = ["--sigma-rels", "0.05", "0.1", "--update-every", "1"]
    _refused(capsys, ["ema-pytorch", src, store, "--sigma-rels", "0.05", "0.1", "0.15"],
             "holds 2 profile(s)", "3 sigma_rel(s) were given")
    os.makedirs(tmp_path / "empty")
    _refused(capsys, ["ema-pytorch", str(tmp_path / "empty"), store, *sr], "holds no ema-pytorch checkpoint files")
    _refused(capsys, ["timm", src, store, *sr], "unknown kind 'timm'")
    _refused(capsys, ["edm2", src, store, *sr], "network-snapshot", "does not unpickle")
    _refused(capsys, ["nitrous-ema", src, store, *sr], "looks like a ema-pytorch checkpoint")
    _refused(capsys, ["ema-pytorch", src, store, "--sigma-rels", "0.05", "0.3"], "sigma_rels must be in")
    _refused(capsys, ["ema-pytorch", src, os.path.join(src, "s"), *sr], "inside the checkpoint folder")
    assert not os.path.exists(store)  # nothing was written by any refusal
    assert cli.main(["import", "ema-pytorch", src, store, *sr]) == 0
    _refused(capsys, ["ema-pytorch", src, store, *sr], "already holds 3 committed snapshot(s)", "new STORE")
    os.remove(os.path.join(src, "1.10.pt"))
    _refused(capsys, ["ema-pytorch", src, str(tmp_path / "s2"), *sr], "step 10: no 1.10.pt")


def test_mixed_folders_are_refused(folder, tmp_path, capsys):
    src = _copy(folder, tmp_path)
    sr = ["--sigma-rels", "0.05", "0.1", "--update-every", "1"]
    open(os.path.join(src, "network-snapshot-0001000-0.050.pkl"), "wb").close()
    _refused(capsys, ["ema-pytorch", src, str(tmp_path / "s1"), *sr], "EDM2 snapshots", "does not unpickle")
    os.remove(os.path.join(src, "network-snapshot-0001000-0.050.pkl"))
    torch.save({"w": torch.zeros(3)}, os.path.join(src, "model.pt"))
    _refused(capsys, ["ema-pytorch", src, str(tmp_path / "s2"), *sr], "not named like ema-pytorch's", "model.pt")
    os.remove(os.path.join(src, "model.pt"))
    shutil.copy(os.path.join(src, "0.5.pt"), os.path.join(src, "3.5.pt"))
    _refused(capsys, ["ema-pytorch", src, str(tmp_path / "s3"), *sr], "profile indices", "[0, 1, 3]")
    os.remove(os.path.join(src, "3.5.pt"))
    for k in (0, 1):  # files renamed to another step: their own step entry (15) says otherwise
        os.rename(os.path.join(src, f"{k}.15.pt"), os.path.join(src, f"{k}.20.pt"))
    _refused(capsys, ["ema-pytorch", src, str(tmp_path / "s4"), *sr], "0.20.pt", "says 15 EMA calls, its name 20")
    assert open_store(str(tmp_path / "s4")).snapshots() == []


def test_a_failed_import_commits_nothing(folder, tmp_path, capsys):
    """A file that fails late (the newest step's, after the other steps' data is written) leaves no committed
    snapshot and no uncommitted data; the same store then takes a good import."""
    src = _copy(folder, tmp_path)
    store = str(tmp_path / "store")
    sd = torch.load(os.path.join(src, "1.15.pt"), weights_only=True)
    sd["ema_model.fc.weight"] = torch.zeros(5, 5, dtype=torch.float16)  # another model's tensor
    torch.save(sd, os.path.join(src, "1.15.pt"))
    sr = ["--sigma-rels", "0.05", "0.1", "--update-every", "1"]
    _refused(capsys, ["ema-pytorch", src, store, *sr], "1.15.pt", "fc.weight", "import one run's folder")
    assert open_store(store).snapshots() == []
    assert os.listdir(os.path.join(store, "snapshots")) == ["zarr.json"]
    assert not os.path.exists(os.path.join(store, "owner.json"))  # the claim is released
    shutil.copy(os.path.join(folder, "1.15.pt"), os.path.join(src, "1.15.pt"))
    # and an import killed mid-way: its claim (a process gone on this host) and its uncommitted data
    dead = {"job": "j20000101T000000Z-dead", "host": socket.gethostname(), "pid": 2**22 + 12345, "started": 0.0}
    with open(os.path.join(store, "owner.json"), "w") as f:
        json.dump(dead, f)
    os.makedirs(os.path.join(store, "snapshots", "step-000000000005", dead["job"], "r00000"))
    assert cli.main(["import", "ema-pytorch", src, store, *sr]) == 0
    assert [s.step for s in open_store(store).snapshots()] == [5, 10, 15]
    assert not os.path.exists(os.path.join(store, "snapshots", "step-000000000005", dead["job"]))
    assert not os.path.exists(os.path.join(store, "owner.json"))


def test_import_into_s3(folder, s3_env):
    """The store is any fsspec URL: here a real S3 protocol server (moto, in this process)."""
    _, bucket = s3_env
    url = f"s3://{bucket}/imported"
    res = dist_ema.import_run("ema-pytorch", folder, url, sigma_rels=SIGMA_RELS, update_every=1)
    assert res.steps == (5, 10, 15)
    snaps = open_store(url).snapshots()
    assert [s.t for s in snaps] == [6.0, 11.0, 16.0]
    w = open_store(url).read(15, 0.05, "fc.weight")
    want = torch.load(os.path.join(folder, "0.15.pt"), weights_only=True)["ema_model.fc.weight"]
    assert torch.equal(w, want.float())


# the README's block (README.md, "Importing runs of other post-hoc EMA libraries"): run here
README_BLOCK = """\
# a run of ema-pytorch: PostHocEMA(model, sigma_rels=(0.05, 0.10), update_every=1, checkpoint_folder="ckpts")
dist-ema import ema-pytorch ckpts runs/old/snapshots --sigma-rels 0.05 0.10 --update-every 1
dist-ema ls runs/old/snapshots
dist-ema synthesize runs/old/snapshots --sigma-rels 0.15 --out runs/old/synth
"""


def test_readme_import_block(folder, tmp_path, monkeypatch, capsys):
    """The README block's commands, in process, on a real ema-pytorch folder named as there; the README holds
    this block once the section is in it."""
    readme = os.path.join(os.path.dirname(__file__), "..", "README.md")
    with open(readme) as f:
        text = f.read()
    if "dist-ema import ema-pytorch" in text:
        assert README_BLOCK in text, "the README's import block differs from tests/test_import.py README_BLOCK"
    shutil.copytree(folder, tmp_path / "ckpts")
    monkeypatch.chdir(tmp_path)
    for line in README_BLOCK.splitlines():
        if line.startswith("dist-ema "):
            assert cli.main(shlex.split(line)[1:]) == 0, line
    out = capsys.readouterr().out
    assert "imported 3 snapshot(s) of ema-pytorch" in out and "3 committed snapshot(s)" in out
    assert (tmp_path / "runs/old/synth/sigma_rel-0.1500/model.safetensors").exists()


@pytest.mark.parametrize("run", ["posthoc-ema"], indirect=True)
def test_posthoc_update_after_step_is_read_from_the_files(run, tmp_path, capsys):
    kind, src, *_ = run
    _refused(capsys, [kind, src, str(tmp_path / "s"), "--sigma-rels", "0.05", "0.1", "--update-every", "1",
                      "--update-after-step", "100"], "update_after_step=100, but the files say 3")


@pytest.mark.parametrize("run", ["ema-pytorch"], indirect=True)
def test_average_buffers_synthesizes_the_running_statistics(run, tmp_path):
    """--average-buffers: the norm layers' running statistics are averaged tensors (as the libraries' own
    synthesis treats them): the synthesized running_mean is the one the independent least squares gives."""
    kind, src, *_ = run
    store = str(tmp_path / "store")
    res = dist_ema.import_run(kind, src, store, sigma_rels=SIGMA_RELS, update_every=1, average_buffers=True)
    assert res.buffers == ("bn.num_batches_tracked",)
    out = dist_ema.synthesize(store, sigma_rels=[TARGET], out=str(tmp_path / "out"), progress=False)
    got = load_file(out.files[0])
    files = [(k, s, {"m": torch.load(os.path.join(src, f"{k}.{s}.pt"), weights_only=True)
                     ["ema_model.bn.running_mean"].double().numpy()}) for k, s, _ in _files(src)]
    t = [_t_of(kind, s) for _, s, _ in files]
    g = [_gamma(SIGMA_RELS[k]) for k, _, _ in files]
    A = np.array([[_inner(ta, ga, tb, gb) for tb, gb in zip(t, g)] for ta, ga in zip(t, g)])
    b = np.array([_inner(ta, ga, max(t), _gamma(TARGET)) for ta, ga in zip(t, g)])
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    want = _combine(files, x / x.sum())["m"]
    np.testing.assert_allclose(got["bn.running_mean"].double().numpy(), want, rtol=1e-5, atol=1e-6)
