"""``offload=True``: the EMA in host memory, updated on a worker thread, bitwise the device path.

In-process: a BatchNorm CNN and a transformer block trained twice from the same seed, one EMA
with offload and one without: the EMA buffers after every update, the snapshots' stored bytes
(read as plain files), the state dicts, a swap of an untracked profile and the synthesized
outputs are bitwise equal; the update really runs off the training thread (it can be held while
update() returns, and every reader waits for it); back-pressure; a worker's error is raised.

Multi-process (2 gloo ranks): the same bitwise comparison under every engine (replicated, DDP,
FSDP2 fp32 and bf16, FSDP1 per-parameter and flat, ZeRO 1/2/3): EMA buffers after every update,
full state dicts, swaps of a synthesized profile, snapshot bytes and synthesized outputs.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_ema import PostHocEMA, synthesize
from dist_ema.offload import HostUpdate, mirrors_of
from tests.dist_harness import run_workers
from tests.engines import ENGINES, build
from tests.zoo import BNCNN

SIGMAS = (0.05, 0.10)


def snapshot_bytes(store: Path) -> dict[tuple[str, str], bytes]:
    """{(snapshot dir, data file path below the job folder): bytes} of every stored chunk: a plain read."""
    out = {}
    for f in sorted((store / "snapshots").glob("step-*/*/**/c/**/*")):
        if f.is_file():
            snap, _job, *rest = f.relative_to(store / "snapshots").parts
            out[(snap, "/".join(rest))] = f.read_bytes()
    assert out, f"no snapshot data under {store}"
    return out


def output_bytes(folder: Path) -> dict[str, dict[str, bytes]]:
    """{file: {tensor name: its bytes}} of the synthesized safetensors files (their metadata names the store)."""
    from safetensors.torch import load_file

    return {str(f.relative_to(folder)): {k: v.numpy().tobytes() for k, v in load_file(f).items()}
            for f in sorted(folder.rglob("*.safetensors"))}


class Block(nn.Module):
    """A pre-norm transformer block with a tied embedding/head and a frozen positional table."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.pos = nn.Parameter(torch.randn(16, 32), requires_grad=False)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.emb(idx) + self.pos[: idx.shape[1]]))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    if isinstance(model, BNCNN):
        return model(torch.randn(4, 3, 8, 8, generator=g)).square().mean()
    idx = torch.randint(0, 50, (2, 16), generator=g)
    return nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())


@pytest.mark.parametrize("arch", ["bncnn", "block"])
@pytest.mark.parametrize("update_impl", ["auto", "foreach"])
def test_offload_is_bitwise_the_device_path(tmp_path: Path, arch: str, update_impl: str) -> None:
    runs = {}
    for offload in (False, True):
        torch.manual_seed(0)
        model = BNCNN() if arch == "bncnn" else Block()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
        ema = PostHocEMA(model, sigma_rels=SIGMAS, update_impl=update_impl, offload=offload,
                         store=str(tmp_path / f"s{int(offload)}"), snapshot_every=4, writer="thread")
        runs[offload] = (model, opt, ema)
    for step in range(13):
        for model, opt, ema in runs.values():
            _loss(model, step).backward()
            opt.step()
            opt.zero_grad()
            assert ema.update()
        runs[True][2].wait_update()
        for a, b in zip(runs[False][2].profiles, runs[True][2].profiles):
            assert b.flat.device.type == "cpu"
            assert torch.equal(a.flat, b.flat), f"step {step}: the offloaded EMA differs"
    dev, host = runs[False][2], runs[True][2]
    for k in range(len(SIGMAS)):
        sa, sb = dev.full_state_dict(sigma_rel=SIGMAS[k]), host.full_state_dict(sigma_rel=SIGMAS[k])
        assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)
    saved = []
    for ema in (dev, host):  # the state dicts as torch.save writes them (plain tensors and lists)
        buf = io.BytesIO()
        torch.save(ema.state_dict(), buf)
        buf.seek(0)
        saved.append(torch.load(buf, weights_only=True))
    profiles = [k for k in saved[0] if k.startswith("sigma_rel")]
    assert len(profiles) == len(SIGMAS)
    for key in profiles:
        for n, entry in saved[0][key].items():
            assert all(torch.equal(x, y) for x, y in zip(entry["values"], saved[1][key][n]["values"]))
    swapped = []
    for model, _, ema in runs.values():  # an untracked profile: synthesized from the snapshots and the live EMA
        with ema.swapped(sigma_rel=0.07):
            swapped.append({n: p.detach().clone() for n, p in model.state_dict().items()})
    assert all(torch.equal(swapped[0][n], swapped[1][n]) for n in swapped[0])
    for _, _, ema in runs.values():
        ema.close()
    a, b = snapshot_bytes(tmp_path / "s0"), snapshot_bytes(tmp_path / "s1")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), "stored snapshot bytes differ"
    outs = []
    for i in range(2):
        synthesize(str(tmp_path / f"s{i}"), sigma_rels=[0.08], out=str(tmp_path / f"o{i}"), progress=False)
        outs.append(output_bytes(tmp_path / f"o{i}"))
    assert outs[0] and outs[0] == outs[1], "synthesized outputs differ"


def test_update_runs_off_the_training_thread_and_readers_wait(tmp_path: Path, monkeypatch) -> None:
    """An update held on the worker: update() has returned, the buffers are not written yet; every reader
    (wait_update, state_dict, a snapshot, a swap) blocks until the update finished; the next update waits."""
    torch.manual_seed(0)
    model = BNCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = PostHocEMA(model, sigma_rels=SIGMAS, offload=True, store=str(tmp_path / "s"), writer="thread")
    gate, started, threads = threading.Event(), threading.Event(), []
    run = HostUpdate._run

    def held(self, weights, event):
        threads.append(threading.current_thread())
        started.set()
        assert gate.wait(30)
        run(self, weights, event)

    def step(i: int) -> None:
        _loss(model, i).backward()
        opt.step()
        opt.zero_grad()
        assert ema.update()

    step(0)  # the first update runs on the calling thread (it compiles there)
    monkeypatch.setattr(HostUpdate, "_run", held)
    before = ema.profiles[0].flat.clone()
    step(1)
    assert started.wait(30)
    assert threads[-1] is not threading.current_thread()
    assert torch.equal(ema.profiles[0].flat, before), "the buffers changed while the update was held"
    assert ema._host.busy()
    done = []
    reader = threading.Thread(target=lambda: (ema.snapshot(), done.append(True)))
    reader.start()
    reader.join(0.5)
    assert not done, "a snapshot read the EMA while an update was in flight"
    gate.set()
    reader.join(30)
    assert done and not ema._host.busy()
    assert not torch.equal(ema.profiles[0].flat, before)
    gate.clear()
    started.clear()
    step(2)
    assert started.wait(30)
    waits = ema.update_waits
    t = threading.Thread(target=step, args=(3,))  # back-pressure: the next update waits for the held one
    t.start()
    t.join(0.5)
    assert t.is_alive(), "update() did not wait for the update in flight"
    gate.set()
    t.join(30)
    assert not t.is_alive() and ema.update_waits == waits + 1
    ema.close()
    assert ema.step == 4 and ema.updates == 4


def test_worker_error_is_raised(monkeypatch) -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = PostHocEMA(model, sigma_rels=SIGMAS, offload=True)

    def step() -> None:
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        ema.update()

    step()

    def broken(self, weights, event):
        raise RuntimeError("host memory gone")

    monkeypatch.setattr(HostUpdate, "_run", broken)
    step()
    with pytest.raises(RuntimeError, match="host memory gone"):
        ema.wait_update()
    ema.close()


def test_mirrors_keep_the_runs_of_the_sources() -> None:
    """Neighbouring sources share one host buffer in the same order; others get their own."""
    flat = torch.arange(10.0)
    other = torch.arange(3, dtype=torch.bfloat16)
    sources = [flat[0:4], flat[4:7], other, flat[8:10]]
    mirrors, copies = mirrors_of(sources, torch.device("cpu"))
    assert [m.numel() for m in mirrors] == [4, 3, 3, 2] and len(copies) == 3
    assert mirrors[0].untyped_storage().data_ptr() == mirrors[1].untyped_storage().data_ptr()
    assert mirrors[2].dtype == torch.bfloat16
    for buf, span in copies:
        buf.copy_(span)
    assert all(torch.equal(m, s) for m, s in zip(mirrors, sources))


# ------------------------------------------------------------------ every engine, 2 ranks


def worker_offload_every_engine(rank: int, ws: int, out: str, engines: list[str]) -> None:
    import torch.distributed as dist

    for engine in engines:
        runs = []
        for offload in (False, True):
            setup = build(engine, seed=4)
            ema = PostHocEMA(setup.target, sigma_rels=SIGMAS, offload=offload, snapshot_every=3, writer="thread",
                             store=f"{out}/{engine}-{int(offload)}")
            runs.append((setup, ema))
        for step in range(8):
            for setup, ema in runs:
                setup.step()
                assert ema.update()
            runs[1][1].wait_update()
            for a, b in zip(runs[0][1].profiles, runs[1][1].profiles):
                assert b.flat.device.type == "cpu"
                assert torch.equal(a.flat, b.flat), f"{engine} step {step}: rank {rank}'s offloaded EMA differs"
        full = [ema.full_state_dict(sigma_rel=0.10) for _, ema in runs]
        assert full[0].keys() == full[1].keys() and all(torch.equal(full[0][k], full[1][k]) for k in full[0])
        swapped = []
        for setup, ema in runs:
            with ema.swapped(sigma_rel=0.07):
                swapped.append(setup.full_params())
        assert all(torch.equal(swapped[0][k], swapped[1][k]) for k in swapped[0]), f"{engine}: swaps differ"
        for _, ema in runs:
            ema.close()
        dist.barrier()
    if rank == 0:
        Path(out, "engines.json").write_text(json.dumps(engines))


@pytest.mark.dist
def test_offload_is_bitwise_on_every_engine(tmp_path: Path) -> None:
    run_workers("tests.test_offload:worker_offload_every_engine", 2, tmp_path, {"engines": list(ENGINES)},
                timeout=420)
    assert json.loads((tmp_path / "engines.json").read_text()) == list(ENGINES)
    for engine in ENGINES:
        a, b = snapshot_bytes(tmp_path / f"{engine}-0"), snapshot_bytes(tmp_path / f"{engine}-1")
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), f"{engine}: stored snapshot bytes differ"
        outs = []
        for i in range(2):
            synthesize(str(tmp_path / f"{engine}-{i}"), sigma_rels=[0.08], out=str(tmp_path / f"o-{engine}-{i}"),
                       progress=False)
            outs.append(output_bytes(tmp_path / f"o-{engine}-{i}"))
        assert outs[0] and outs[0] == outs[1], f"{engine}: synthesized outputs differ"


def test_close_stops_the_worker_and_an_update_after_close_starts_it_again() -> None:
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    ref = nn.Linear(64, 64)
    ref.load_state_dict(model.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref)]
    host, dev = PostHocEMA(model, sigma_rels=SIGMAS, offload=True), PostHocEMA(ref, sigma_rels=SIGMAS)

    def steps(n: int) -> None:
        for i in range(n):
            x = torch.randn(2, 64, generator=torch.Generator().manual_seed(i))
            for m, opt, ema in ((model, opts[0], host), (ref, opts[1], dev)):
                m(x).square().sum().backward()
                opt.step()
                opt.zero_grad()
                ema.update()

    steps(3)
    host.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("dist-ema-offload")]
    steps(3)
    host.wait_update()
    assert host.updates == dev.updates == 6
    assert all(torch.equal(a.flat, b.flat) for a, b in zip(host.profiles, dev.profiles))
    host.close()
    dev.close()
