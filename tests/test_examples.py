"""The minimal training example a user copies (launch/minimal_train.py), run as a user runs it.

torchrun starts it on 2 CPU ranks (FSDP2, gloo). The store must hold a snapshot every 20 steps,
and what the example synthesizes must be the EMA of its own training: the training is replayed in
this process without FSDP (the 2 ranks' mean gradient, the same batches) and the EMA of that
trajectory is computed by brute force from the EDM2 formula, with numpy. The command the example
prints for a later synthesis is run as printed, on 1 rank.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dist_ema import open_store

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))
import minimal_train as example  # noqa: E402

TAIL = 60  # lines of output shown when a launch fails
RANKS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], timeout: float = 300) -> str:
    """Run ``cmd`` in its own process group (killed as a whole on timeout); its output, or a failure with the tail."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="",  # CPU ranks, gloo
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    p = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"{shlex.join(cmd)} did not finish within {timeout:.0f} s:\n"
                    + "\n".join(out.decode(errors="replace").splitlines()[-TAIL:]))
    text = out.decode(errors="replace")
    assert p.returncode == 0, f"{shlex.join(cmd)} exited with {p.returncode}:\n" + "\n".join(text.splitlines()[-TAIL:])
    return text


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}"]


def replay() -> list[dict[str, torch.Tensor]]:
    """The example's training in one process: weights after each step (the ranks' mean gradient, as FSDP2 reduces)."""
    model = example.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=example.LR)
    trajectory = []
    for step in range(1, example.STEPS + 1):
        losses = [F.mse_loss(model(x), y) for x, y in (example.batch(step, r) for r in range(RANKS))]
        (sum(losses) / RANKS).backward()
        opt.step()
        opt.zero_grad()
        trajectory.append({k: v.detach().double().clone() for k, v in model.state_dict().items()})
    return trajectory


def gamma_of(sigma_rel: float) -> float:
    """Largest real root of g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2) = 0 (EDM2, Eq. 3's inverse)."""
    s2 = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def brute_ema(trajectory: list[dict[str, torch.Tensor]], sigma_rel: float) -> dict[str, torch.Tensor]:
    """EMA after len(trajectory) unit steps: beta_t = (1 - 1/t)^(g+1), telescoped into per-step weights."""
    g = gamma_of(sigma_rel)
    w = np.zeros(len(trajectory))
    for t in range(1, len(trajectory) + 1):
        beta = (1.0 - 1.0 / t) ** (g + 1)
        w *= beta
        w[t - 1] = 1.0 - beta
    return {k: sum(float(wi) * th[k] for wi, th in zip(w, trajectory)) for k in trajectory[0]}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 distance of two state dicts over all their tensors."""
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a) ** 0.5)


def weights(path: Path) -> dict[str, torch.Tensor]:
    """A synthesized safetensors file, checked to load strictly into the example's plain (unsharded) model."""
    sd = load_file(str(path))
    example.build_model().load_state_dict(sd, strict=True)
    return sd


@pytest.mark.dist
def test_minimal_example_under_torchrun(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = launch([*torchrun(RANKS), "launch/minimal_train.py", str(run_dir)])
    store = run_dir / "snapshots"
    assert [s.step for s in open_store(str(store)).snapshots()] == list(range(20, example.STEPS + 1, 20)), out
    assert f"step {example.STEPS}/{example.STEPS}" in out

    trajectory = replay()
    for sigma_rel in example.SWEEP:
        assert f"sigma_rel={sigma_rel:.2f}  reconstruction error" in out, out
        got = weights(run_dir / "synth" / f"sigma_rel-{sigma_rel:.4f}" / "model.safetensors")
        want = brute_ema(trajectory, sigma_rel)
        if sigma_rel in example.SIGMA_RELS:  # tracked, with a snapshot at the last step: the EMA itself
            for k in want:
                torch.testing.assert_close(got[k].double(), want[k], rtol=1e-5, atol=1e-6, msg=f"{sigma_rel} {k}")
        else:  # reconstructed from the snapshots: far nearer the true EMA than the nearest tracked one is
            nearest = brute_ema(trajectory, max(example.SIGMA_RELS))
            assert distance(got, want) < 0.1 * distance(nearest, want), (sigma_rel, distance(got, want))

    # the command printed for later runs, as printed, on 1 rank
    (line,) = [x for x in out.splitlines() if x.startswith("later, at any world size: ")]
    words = shlex.split(line.split(": ", 1)[1])
    assert words[:3] == ["torchrun", "--nproc-per-node", "N"], line
    launch([*torchrun(1), *words[3:]])
    got = weights(run_dir / "synth-0.12" / "sigma_rel-0.1200" / "model.safetensors")
    want = brute_ema(trajectory, 0.12)
    assert distance(got, want) < 0.1 * distance(brute_ema(trajectory, 0.10), want), distance(got, want)


def test_a_refused_rerun_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    """Rerunning an example into its old run directory is refused the same way every time.

    The refusal names the committed snapshots; a refused start must not leave an ownership record
    behind, or the next start is told that another job owns the store (and other hosts are
    refused for STALE_AFTER seconds even with resume=True).
    """
    from dist_ema import PostHocEMA, StoreError

    store = str(tmp_path / "snapshots")
    model = torch.nn.Linear(4, 2)
    with PostHocEMA(model, store=store, snapshot_every=2, writer="sync") as ema:
        for _ in range(4):
            ema.update()
    for _ in range(2):  # the second refusal must read as the first
        with pytest.raises(StoreError, match="already holds 2 committed snapshot"):
            PostHocEMA(model, store=store, snapshot_every=2, writer="sync")
    assert not (tmp_path / "snapshots" / "owner.json").exists()
