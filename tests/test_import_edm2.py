"""dist-ema import edm2: EDM2's network-snapshot pickles, imported only with --allow-pickle and unpickled only in a
child process that gets the code folder through --edm2-code.

EDM2's own code cannot be installed or vendored here (CC BY-NC-SA), so the run is a stand-in: a tiny package
written into tmp_path (``edm2like``: a small conv net with a buffer, and an EasyDict), never importable from this
process's path, pickled with the standard pickle module the way EDM2's training loop pickles its snapshots (an
EasyDict with ``ema`` = the EMA network in float16, plus ``encoder``, ``loss_fn``, ``dataset_kwargs``; one file
per std, ``network-snapshot-{nimg // 1000:07d}-{std:.3f}.pkl``, also at nimg 0). The EMAs are a power-function
EMA run here with EDM2's update rule written out (beta = (1 - batch / nimg)^(gamma + 1) after every step of 1024
samples). The synthesized EMA is checked against a least-squares reconstruction written out here from the float16
values the pickles hold (closed-form inner products of power functions, gamma by bisection).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dist_ema
from dist_ema import cli, open_store, phema
from dist_ema.errors import ConfigError
from dist_ema.importers import edm2
from tests.test_import import _gamma, _refused  # the other importers' tests' independent gamma, refusal check

B = 1024  # samples per training step
STEPS, EVERY = 160, 32  # a snapshot every 32 steps (32768 samples): kimg 32, 65, 98, 131, 163
STDS = (0.050, 0.100)
TARGET = 0.08
NIMGS = tuple(EVERY * B * k for k in range(1, STEPS // EVERY + 1))
KIMGS = tuple(n // 1000 for n in NIMGS)

STANDIN = {
    "__init__.py": '"""A stand-in for EDM2\'s code in dist-ema\'s tests (not EDM2\'s code)."""\n',
    "util.py": '''
class EasyDict(dict):
    """A dict with attribute access, like the one EDM2's snapshots are."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value
''',
    "net.py": '''
import torch
from torch import nn


class Net(nn.Module):
    """A small conv net with a float buffer (EDM2's networks hold buffers too, e.g. MPFourier's)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.register_buffer("freqs", torch.linspace(0.5, 2.0, 4))

    def forward(self, x):
        return self.fc((torch.relu(self.conv(x)) * self.freqs[:, None, None]).flatten(1))
''',
}


def _standin_modules(code: Path) -> dict:
    """Import the stand-in package from its files under its own name (sys.modules only, never sys.path)."""
    mods = {}
    pkg = code / "edm2like"
    spec = importlib.util.spec_from_file_location("edm2like", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    mods["edm2like"] = importlib.util.module_from_spec(spec)
    sys.modules["edm2like"] = mods["edm2like"]
    spec.loader.exec_module(mods["edm2like"])
    for name in ("util", "net"):
        spec = importlib.util.spec_from_file_location(f"edm2like.{name}", pkg / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules[f"edm2like.{name}"] = mods[name]
        spec.loader.exec_module(mods[name])
    return mods


class Run:
    """The stand-in run: its folder, its code folder, the float16 values each pickle holds, the net class."""

    def __init__(self, base: Path) -> None:
        self.base, self.code, self.src = base, base / "edm2", base / "edm2-run"
        (self.code / "edm2like").mkdir(parents=True)
        for name, text in STANDIN.items():
            (self.code / "edm2like" / name).write_text(text)
        self.src.mkdir()
        mods = _standin_modules(self.code)
        try:
            self.Net, self.EasyDict = mods["net"].Net, mods["util"].EasyDict
            self.values = self._train()
        finally:
            for name in ("edm2like", "edm2like.util", "edm2like.net"):
                sys.modules.pop(name, None)
        for name in ("training-state-0000163.pt", "stats.jsonl", "log.txt"):  # EDM2's other files: ignored
            (self.src / name).write_bytes(b"")

    def _train(self) -> dict:
        """A power-function EMA per std with EDM2's rule; pickles as EDM2's training loop writes them."""
        torch.manual_seed(0)
        net = self.Net()
        emas = [copy.deepcopy(net) for _ in STDS]  # the EMA starts as a copy of the network (beta 0 at step 1)
        gen = torch.Generator().manual_seed(1)
        values, nimg = {}, 0

        def snapshot() -> None:
            for std, ema in zip(STDS, emas):
                for b_net, b_ema in zip(net.buffers(), ema.buffers()):
                    b_ema.copy_(b_net)
                half = copy.deepcopy(ema).eval().requires_grad_(False).to(torch.float16)
                data = self.EasyDict(encoder=None, dataset_kwargs={"class_name": "edm2like.data"}, loss_fn=None)
                data.ema = half
                with open(self.src / f"network-snapshot-{nimg // 1000:07d}-{std:.3f}.pkl", "wb") as f:
                    pickle.dump(data, f)
                values[(nimg, std)] = {n: v.clone() for n, v in half.state_dict().items()}

        with torch.no_grad():
            snapshot()  # EDM2 writes one at nimg 0 too
            for _ in range(STEPS):
                for p in net.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen) + 0.01)
                net.freqs.add_(0.01)
                nimg += B
                for std, ema in zip(STDS, emas):
                    beta = (1.0 - B / nimg) ** (_gamma(std) + 1.0)
                    for p_net, p_ema in zip(net.parameters(), ema.parameters()):
                        p_ema.lerp_(p_net, 1.0 - beta)
                if nimg % (EVERY * B) == 0:
                    snapshot()
        return values

    def copy(self, dst: Path) -> Path:
        shutil.copytree(self.src, dst)
        return dst


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    return Run(tmp_path_factory.mktemp("edm2"))


def _no_child(monkeypatch) -> None:
    def boom(*a, **kw):
        raise AssertionError(f"a process was started: {a[:1]}")

    monkeypatch.setattr(subprocess, "Popen", boom)


# ----------------------------------------------------------------------------- conventions (in process)


@pytest.mark.parametrize("batch", [1024, 1536])
def test_edm2_beta_is_the_power_function_profile_in_samples(batch):
    """EDM2's PowerFunctionEMA, written out (beta = (1 - batch/nimg)^(exp+1) after each step, nimg counting that
    step's samples): on a one-hot trajectory the EMA after N steps weighs step n's weights by the power-function
    profile at t = N * batch integrated over ((n-1) batch, n batch]: dist-ema's own profile with time in samples."""
    n = 12
    for std in STDS:
        g = _gamma(std)
        ema = np.zeros(n)  # the network at nimg 0 (not in x): the first update replaces it (beta 0)
        for step in range(1, n + 1):
            x = np.zeros(n)
            x[step - 1] = 1.0
            beta = (1.0 - batch / (step * batch)) ** (g + 1.0)
            ema = beta * ema + (1.0 - beta) * x
            assert beta == pytest.approx(phema.power_beta(phema.sigma_rel_to_gamma(std), step * batch, batch),
                                         rel=1e-12)
        t = batch * np.arange(1, n + 1, dtype=np.float64)
        np.testing.assert_allclose(ema, phema.step_weights(phema.sigma_rel_to_gamma(std), t), rtol=1e-10)
        edges = np.concatenate([[0.0], t]) / t[-1]
        np.testing.assert_allclose(ema, np.diff(edges ** (g + 1.0)), rtol=1e-10, atol=1e-15)


def test_kimg_maps_back_to_nimg():
    """EDM2's snapshots are at multiples of 1024 samples; kimg = nimg // 1000 names exactly one of them."""
    for nimg in range(0, 1 << 22, 1024):
        assert edm2.kimg_to_nimg(nimg // 1000) == nimg
    assert edm2.kimg_to_nimg(42) is None  # 41984 // 1000 = 41 and 43008 // 1000 = 43: no file is named kimg 42
    assert [edm2.kimg_to_nimg(k) for k in KIMGS] == list(NIMGS)


def test_scan_and_plan(run):
    names = sorted(os.listdir(run.src))
    scan = edm2.scan_edm2(names)
    assert scan.kimgs == KIMGS and scan.nimgs == NIMGS and scan.stds == ("0.050", "0.100")
    assert scan.prefix == "network-snapshot"
    assert scan.left_out == ("network-snapshot-0000000-0.050.pkl", "network-snapshot-0000000-0.100.pkl")
    assert set(scan.ignored) == {"training-state-0000163.pt", "stats.jsonl", "log.txt"}
    assert scan.files[-1] == ("network-snapshot-0000163-0.050.pkl", "network-snapshot-0000163-0.100.pkl")
    plan = edm2.plan_edm2(scan)
    assert [s.step for s in plan.steps] == list(KIMGS) and [s.t for s in plan.steps] == list(map(float, NIMGS))
    assert plan.sigma_rels == STDS and plan.warnings == ()
    assert edm2.plan_edm2(scan, sigma_rels=[0.1, 0.05]).sigma_rels == STDS  # given ones must match (any order)
    with pytest.raises(ConfigError, match="does not match the stds of EDM2's file names"):
        edm2.plan_edm2(scan, sigma_rels=[0.05, 0.2])
    other = edm2.scan_edm2([n.replace("network-snapshot", "phema") for n in names])
    assert "may be reconstructions" in edm2.plan_edm2(other).warnings[0]
    rounded = edm2.scan_edm2(["network-snapshot-0000032-0.013.pkl"])  # a std of 0.0125 is named 0.013
    assert edm2.plan_edm2(rounded).sigma_rels == (0.013,)


def test_refusals_start_no_child(run, tmp_path, capsys, monkeypatch):
    """Everything refused before a child would start: no process, no store."""
    _no_child(monkeypatch)
    src = run.copy(tmp_path / "src")
    store = str(tmp_path / "store")
    ok = ["--allow-pickle", "--edm2-code", str(run.code)]
    err = _refused(capsys, ["edm2", str(src), store], "--allow-pickle", "does not unpickle", "--edm2-code")
    assert "network-snapshot" in err
    _refused(capsys, ["edm2", str(src), store, "--sigma-rels", "0.05", "0.2", *ok], "does not match",
             "0.050 0.100")
    _refused(capsys, ["edm2", str(src), store, "--update-every", "5", *ok], "update_every=5")
    _refused(capsys, ["edm2", str(src), store, "--average-buffers", *ok], "does not average buffers")
    _refused(capsys, ["edm2", str(src), store, "--allow-pickle", "--edm2-code", str(tmp_path / "nope")],
             "is not a folder", "dnnlib/")
    _refused(capsys, ["ema-pytorch", str(src), store, "--sigma-rels", "0.05", *ok], "kind 'edm2'")
    _refused(capsys, ["ema-pytorch", str(src), store], "--sigma-rels is required for ema-pytorch")
    _refused(capsys, ["edm2", str(src), str(src / "store"), *ok], "inside the checkpoint folder")

    def variant(name: str, change) -> str:
        d = run.copy(tmp_path / name)
        change(d)
        return str(d)

    trad = variant("trad", lambda d: (d / "network-snapshot-0000032.pkl").write_bytes(b""))
    _refused(capsys, ["edm2", trad, store, *ok], "TraditionalEMA", "network-snapshot-0000032.pkl")
    part = variant("part", lambda d: (d / "network-snapshot-0000098-0.100.pkl").unlink())
    _refused(capsys, ["edm2", part, store, *ok], "kimg 98: no std 0.100")
    mixed = variant("mixed", lambda d: (d / "phema-0000163-0.150.pkl").write_bytes(b""))
    _refused(capsys, ["edm2", mixed, store, *ok], "2 name prefixes", "'phema'")
    badk = variant("badk", lambda d: (d / "network-snapshot-0000042-0.050.pkl").write_bytes(b""))
    _refused(capsys, ["edm2", badk, store, *ok], "no multiple of 1024 samples has kimg 0000042")
    other = variant("other", lambda d: (d / "model.pkl").write_bytes(b""))
    _refused(capsys, ["edm2", other, store, *ok], "not named like EDM2's snapshots", "model.pkl")
    start = tmp_path / "start"
    start.mkdir()
    for n in run.src.glob("network-snapshot-0000000-*.pkl"):
        shutil.copy(n, start)
    _refused(capsys, ["edm2", str(start), store, *ok], "only the snapshots at nimg 0")
    (tmp_path / "empty").mkdir()
    _refused(capsys, ["edm2", str(tmp_path / "empty"), store, *ok], "no EDM2 snapshots")
    assert not os.path.exists(store)
    with pytest.raises(ConfigError, match="--allow-pickle"):
        dist_ema.import_run("edm2", str(src), store)


# ----------------------------------------------------------------------------- through the child process


def _inner(ta: float, ga: float, tb: float, gb: float) -> float:
    """<p_a, p_b> of p(tau) = (g+1) tau^g / t^(g+1) on [0, t]: the integral over [0, min(ta, tb)], in logs."""
    m = min(ta, tb)
    log = (math.log(ga + 1) + math.log(gb + 1) + (ga + gb + 1) * math.log(m) - math.log(ga + gb + 1)
           - (ga + 1) * math.log(ta) - (gb + 1) * math.log(tb))
    return math.exp(log)


def _independent(run: Run, sigma_rel: float) -> dict:
    """The target EMA at the newest nimg from the pickles' float16 values: least squares over the power-function
    profiles at t = nimg, coefficients normalized to sum 1 (as EDM2's reconstruction does)."""
    rows = [(nimg, std) for nimg in NIMGS for std in STDS]
    t = [float(nimg) for nimg, _ in rows]
    g = [_gamma(std) for _, std in rows]
    A = np.array([[_inner(ta, ga, tb, gb) for tb, gb in zip(t, g)] for ta, ga in zip(t, g)])
    b = np.array([_inner(ta, ga, max(t), _gamma(sigma_rel)) for ta, ga in zip(t, g)])
    x = np.linalg.solve(A, b)
    x /= x.sum()
    names = [n for n, _ in run.Net().named_parameters()]
    return {n: sum(xi * run.values[r][n].double().numpy() for xi, r in zip(x, rows)) for n in names}


# the README's block (README text of the EDM2 import): run here, on the stand-in run
README_BLOCK = """\
# EDM2's run folder (network-snapshot-<kimg>-<std>.pkl files) and EDM2's code: git clone https://github.com/NVlabs/edm2
dist-ema import edm2 edm2-run runs/edm2/snapshots --allow-pickle --edm2-code edm2
dist-ema ls runs/edm2/snapshots
dist-ema synthesize runs/edm2/snapshots --sigma-rels 0.08 --out runs/edm2/synth
"""


@pytest.mark.dist
def test_import_through_the_child(run, tmp_path, monkeypatch, capsys):
    """The README block's commands, in process (the import starts its child): ls shows the nimg times and the
    stds, synthesis is the independent least squares, the output and load_synthesized load into the net, the
    temporary folder is gone, and this process never imported the stand-in code or the child's module."""
    readme = Path(__file__).parent.parent / "README.md"
    if "dist-ema import edm2" in readme.read_text():
        assert README_BLOCK in readme.read_text(), "the README's edm2 block differs from README_BLOCK here"
    work = tmp_path / "work"
    work.mkdir()
    run.copy(work / "edm2-run")
    shutil.copytree(run.code, work / "edm2")
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.chdir(work)
    for name in ("edm2like", "dist_ema.importers.edm2_child"):  # (a module scan of another test may import it)
        monkeypatch.delitem(sys.modules, name, raising=False)
    capsys.readouterr()
    for line in README_BLOCK.splitlines():
        if line.startswith("dist-ema "):
            assert cli.main(shlex.split(line)[1:]) == 0, line
    out = capsys.readouterr().out
    print(out)
    assert "imported 5 snapshot(s) of edm2" in out and "t 32768..163840 samples" in out
    assert "left out 2 file(s) at nimg 0" in out and "5 committed snapshot(s)" in out
    assert "163840 samples" in out and "0.05,0.1" in out and "import:edm2" in out
    assert not [n for n in os.listdir(temp) if n.startswith("dist-ema-edm2-")]  # the child's folder is removed
    assert "edm2like" not in sys.modules and "dist_ema.importers.edm2_child" not in sys.modules

    store = str(work / "runs/edm2/snapshots")
    snaps = open_store(store).snapshots()
    assert [s.step for s in snaps] == list(KIMGS) and [s.t for s in snaps] == list(map(float, NIMGS))
    assert all(s.unit == "samples" and s.sigma_rels == STDS for s in snaps)
    meta = snaps[-1].meta["imported"]
    assert meta["kind"] == "edm2" and meta["nimg"] == NIMGS[-1] and meta["kimg"] == KIMGS[-1]
    assert meta["files"] == ["network-snapshot-0000163-0.050.pkl", "network-snapshot-0000163-0.100.pkl"]
    assert meta["file_dtype"] == "float16" and meta["ema_class"] == "edm2like.net.Net"
    assert open_store(store).read(KIMGS[1], 0.1, "fc.weight").equal(run.values[(NIMGS[1], 0.1)]["fc.weight"].float())

    got = load_file(str(work / "runs/edm2/synth/sigma_rel-0.0800/model.safetensors"))
    want = _independent(run, TARGET)
    scale = max(np.abs(v).max() for v in want.values())
    worst = max(np.abs(got[n].double().numpy() - w).max() for n, w in want.items()) / scale
    print(f"edm2: dist-ema vs independent least squares: max |diff| / max |w| = {worst:.2e}")
    assert worst < 1e-6

    net = run.Net()
    net.load_state_dict(got, strict=True)  # the safetensors output is the net's state dict
    fresh = run.Net()
    res = dist_ema.load_synthesized(fresh, store, sigma_rel=TARGET)
    assert set(res.buffers) == {"freqs"}
    for n, p in fresh.named_parameters():
        assert torch.equal(p.detach(), got[n]), n
    newest = run.values[(NIMGS[-1], STDS[0])]["freqs"]
    assert torch.equal(fresh.freqs, newest.float()) and torch.equal(got["freqs"], newest.float())
    x = torch.randn(2, 2, 6, 6)
    assert torch.equal(fresh(x), net(x))


@pytest.mark.dist
def test_child_failures_commit_nothing(run, tmp_path, capsys, monkeypatch):
    """The child's errors name the file, the reason and the fix (exit 2), and nothing is committed: the code
    folder not given (the stand-in package cannot be imported), a pickle without 'ema', a damaged newest
    pickle (after every other file's data was written)."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    src = run.copy(tmp_path / "src")
    store = str(tmp_path / "store")
    first = src / "network-snapshot-0000032-0.050.pkl"
    errs = [_refused(capsys, ["edm2", str(src), store, "--allow-pickle"], str(first), "No module named 'edm2like'",
                     "no --edm2-code was given", "--edm2-code PATH", "Nothing was imported")]
    ok = ["--allow-pickle", "--edm2-code", str(run.code)]
    with open(first, "wb") as f:
        pickle.dump({"net": None, "loss_fn": None}, f)
    errs.append(_refused(capsys, ["edm2", str(src), store, *ok], str(first), "without an 'ema' entry",
                         "['loss_fn', 'net']"))
    shutil.copy(run.src / first.name, first)
    last = src / "network-snapshot-0000163-0.100.pkl"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    errs.append(_refused(capsys, ["edm2", str(src), store, *ok], str(last), "cannot be loaded",
                         "damaged or truncated"))
    print("\n".join(errs))
    assert open_store(store).snapshots() == []
    assert os.listdir(os.path.join(store, "snapshots")) == ["zarr.json"]  # no attempt data left
    assert not os.path.exists(os.path.join(store, "owner.json"))  # the claim is released
    assert not [n for n in os.listdir(temp) if n.startswith("dist-ema-edm2-")]
