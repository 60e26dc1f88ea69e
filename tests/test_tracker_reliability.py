"""The tracker when the model changes under it, when ranks disagree on settings, and with a kept state dict.

The EMA is always checked against a brute-force weighted sum of the recorded parameter trajectory
(``tests.test_tracker.reference_ema``), computed apart from the tracker.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_ema import phema
from dist_ema.errors import DistEMAError
from dist_ema.tracker import PostHocEMA
from tests.dist_harness import run_workers
from tests.engines import TinyNet, batch
from tests.test_tracker import reference_ema

SIGMAS = (0.05, 0.10)


def _wrap(engine: str, frozen: tuple[str, ...] = ()) -> tuple[nn.Module, nn.Module]:
    """TinyNet (seed 0) under ``engine``: (the user's module, what the EMA and the optimizer get)."""
    torch.manual_seed(0)
    net = TinyNet()
    for name in frozen:
        net.get_parameter(name).requires_grad_(False)
    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(net.fc1)
        fully_shard(net.fc2)
        fully_shard(net)
        return net, net
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        net.fc1 = FSDP(net.fc1, use_orig_params=True, device_id=torch.device("cpu"))
        return net, FSDP(net, use_orig_params=True, device_id=torch.device("cpu"))
    if engine == "ddp":
        return net, nn.parallel.DistributedDataParallel(net)
    return net, net


class Run:
    """A model trained with plain SGD (no optimizer state: a dtype change needs no new optimizer), its EMA and
    the recorded trajectory (full parameters in float64 after each update, and the update times)."""

    def __init__(self, engine: str, rank: int, **ema_kwargs) -> None:
        self.engine, self.rank = engine, rank
        self.net, self.model = _wrap(engine)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.ema = PostHocEMA(self.model, sigma_rels=SIGMAS, **ema_kwargs)
        self.traj: list[dict[str, torch.Tensor]] = []
        self.times: list[float] = []
        self.n = 0

    def full(self) -> dict[str, torch.Tensor]:
        if self.engine == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.summon_full_params(self.model, writeback=False):
                return {n.replace("_fsdp_wrapped_module.", ""): p.detach().double().clone()
                        for n, p in self.model.named_parameters()}
        out = {}
        for n, p in self.net.named_parameters():
            out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().clone()
        return out

    def train(self, steps: int, eval_forward: bool = False) -> None:
        for _ in range(steps):
            # every rank takes the same batch: DDP does not synchronize gradients of parameters it was not
            # built with (after .double()), and the replicas must stay equal for the brute-force reference
            x, y = batch(self.n, 0)
            self.n += 1
            out = self.model(x)
            ((out - y.to(out.dtype)) ** 2).mean().backward()
            if self.engine == "replicated" and dist.is_initialized():
                for p in self.model.parameters():
                    dist.all_reduce(p.grad)
            self.opt.step()
            self.opt.zero_grad()
            if eval_forward:  # FSDP keeps the root's parameters unsharded after a forward without backward
                with torch.no_grad():
                    self.model(x)
            assert self.ema.update()
            self.traj.append(self.full())
            self.times.append(self.ema.t)

    def check(self, what: str) -> None:
        """The EMA of every profile == the brute-force sum over the trajectory; buffers == the live ones."""
        for s in SIGMAS:
            got = self.ema.full_state_dict(sigma_rel=s)
            if self.rank != 0:
                continue
            ref = reference_ema(self.traj, self.times, phema.sigma_rel_to_gamma(s))
            for k, v in ref.items():
                torch.testing.assert_close(got[k].double(), v, rtol=2e-5, atol=2e-6,
                                           msg=f"{self.engine}, after {what}: {k} sigma_rel={s}")
            assert torch.equal(got["scale"], self.net.scale) and got["scale"].dtype == self.net.scale.dtype, what


def _refused(ema: PostHocEMA, opt: torch.optim.Optimizer, *needles: str) -> None:
    """The next update refuses with an error naming ``needles`` and the fix, and changes nothing."""
    clock = copy.copy(ema.clock)
    flats = [p.flat.clone() for p in ema.profiles]
    opt.step()  # an optimizer step (no gradients: nothing moves), so that update() would update
    with pytest.raises(DistEMAError) as e:
        ema.update()
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert ema.clock == clock and all(torch.equal(a, p.flat) for a, p in zip(flats, ema.profiles))


def _model_changes(engine: str, rank: int) -> None:
    """Every trigger on one engine; after each, the next updates follow the model the optimizer trains."""
    if engine == "fsdp2":
        # FSDP2 converts dtypes only before its lazy init (the first forward): convert right after the EMA
        for convert, what in ((lambda m: m.double(), ".double()"), (lambda m: m.to(torch.float64), ".to(float64)")):
            r = Run(engine, rank)
            convert(r.model)
            r.train(3)
            r.check(what)
    else:
        r = Run(engine, rank)
        r.train(2, eval_forward=True)
        r.model.double()
        r.train(2)
        r.check(".double()")
        r.model.to(torch.float32)
        r.train(2)
        r.check(".to(float32)")
    w = r.net.fc1.weight
    w.data = w.detach().clone()  # the optimizer steps the new tensor from now on
    r.train(2)
    r.check("param.data = ...")
    # a new head: refused, and nothing lost: with the old head back, training and the EMA go on
    old = r.net.head
    r.net.head = nn.Linear(5, 1).to(old.weight.dtype)
    _refused(r.ema, r.opt, "head.weight", "head.bias", "replaced", "new PostHocEMA", "resume=True")
    r.net.head = old
    r.train(1)
    r.check("a refused new head, put back")
    # a layer unfrozen later, with include_frozen=False
    r.net.fc2.weight.requires_grad_(False)
    partial = PostHocEMA(r.model, sigma_rels=SIGMAS, include_frozen=False)
    assert "fc2.weight" not in partial.layout.params
    r.opt.step()
    assert partial.update()
    r.net.fc2.weight.requires_grad_(True)
    _refused(partial, r.opt, "fc2.weight", "newly trainable", "include_frozen", "new PostHocEMA")
    # the first EMA tracks everything: a frozen-then-unfrozen parameter is no change for it
    r.train(1)
    r.check("fc2.weight frozen and unfrozen")
    partial.close()
    r.ema.close()


def _no_relist_in_training(engine: str, rank: int) -> None:
    """Ordinary training (with an eval forward between step and update) never re-lists the views."""
    r = Run(engine, rank)
    r.train(3, eval_forward=True)
    r.check("ordinary training")
    assert r.ema.relisted == 0, engine
    r.ema.close()


def _dcp_rollback(engine: str, rank: int, out: Path) -> None:
    """DCP loads into the state dict's views in place, then calls load_state_dict: a rollback, not refused."""
    import torch.distributed.checkpoint as dcp

    r = Run(engine, rank)
    r.train(2)
    clock, values = copy.copy(r.ema.clock), [p.flat.clone() for p in r.ema.profiles]
    dcp.save({"ema": r.ema}, checkpoint_id=str(out / f"dcp-{engine}"))
    r.train(2)
    dcp.load({"ema": r.ema}, checkpoint_id=str(out / f"dcp-{engine}"))
    assert r.ema.clock == clock and all(torch.equal(a, p.flat) for a, p in zip(values, r.ema.profiles))
    r.ema.close()


def worker_model_changes(rank, ws, out):
    _model_changes("ddp", rank)
    _model_changes("fsdp2", rank)
    _dcp_rollback("fsdp2", rank, Path(out))
    _no_relist_in_training("fsdp1", rank)
    _no_relist_in_training("fsdp2", rank)


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_model_changes_ddp_fsdp2(tmp_path):
    run_workers("tests.test_tracker_reliability:worker_model_changes", 2, tmp_path)


def test_model_changes_plain():
    _model_changes("replicated", 0)


def test_relist_is_logged(caplog):
    r = Run("replicated", 0)
    r.train(1)
    with caplog.at_level("INFO", logger="dist_ema"):
        r.model.double()
        r.train(1)
    text = caplog.text
    assert "fc1.weight" in text and "float32 cpu -> float64 cpu" in text, text
    assert r.ema.relisted == 1


def test_a_model_split_over_devices_is_refused():
    r = Run("replicated", 0)
    r.train(1)
    r.net.fc1.to("meta")  # shards on two devices: the EMA cannot follow; it stays as it was
    _refused(r.ema, r.opt, "moved to ['cpu', 'meta']", "one device")


# ----------------------------------------------------------------------------- settings across ranks

_MISMATCHES = [
    ("sigma_rels", dict(sigma_rels=(0.05, 0.10)), dict(sigma_rels=(0.05, 0.20))),
    ("storage_dtype", dict(storage_dtype="float32"), dict(storage_dtype="bfloat16")),
    ("snapshot_every", dict(snapshot_every=10), dict(snapshot_every=20)),
    ("update_every", dict(update_every=1), dict(update_every=2)),
]


def worker_settings(rank, ws, out):
    from dist_ema.config import ConfigError

    for name, a, b in _MISMATCHES:
        url = Path(out) / f"store-{name}"
        kw = a if rank == 0 else b
        with pytest.raises(ConfigError) as e:
            PostHocEMA(TinyNet(), store=str(url), writer="sync", timeout=60, **kw)
        msg = str(e.value)
        for needle in (name, f"rank 0: {next(iter(a.values()))!r}", f"rank 1: {next(iter(b.values()))!r}",
                       "every rank"):
            assert needle in msg, (needle, msg)
        assert not url.exists(), f"{name}: the store was written before the settings were compared"
    # a setting that is wrong on one rank only: both ranks raise (none waits for the other)
    with pytest.raises(ConfigError, match=r"rank 1: ConfigError: sigma_rels must each be in"):
        PostHocEMA(TinyNet(), sigma_rels=(0.05,) if rank == 0 else (0.5,), store=str(Path(out) / "s-bad"),
                   writer="sync", timeout=60)
    # the same settings: start-up works and snapshots commit
    with PostHocEMA(TinyNet(), store=str(Path(out) / "s-ok"), writer="sync", snapshot_every=1, timeout=60) as ema:
        ema.update()


@pytest.mark.dist
@pytest.mark.timeout(200)
def test_settings_compared_across_ranks(tmp_path):
    run_workers("tests.test_tracker_reliability:worker_settings", 2, tmp_path)


# ----------------------------------------------------------------------------- a kept state dict


def _nudge(m: nn.Module, ema: PostHocEMA, steps: int) -> None:
    for _ in range(steps):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        ema.update()


def test_state_dict_kept_in_memory(tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    m = TinyNet()
    ema = PostHocEMA(m, sigma_rels=SIGMAS)
    _nudge(m, ema, 3)
    clock = copy.copy(ema.clock)
    values = [p.flat.clone() for p in ema.profiles]
    live = ema.state_dict()
    kept = copy.deepcopy(ema.state_dict())
    _nudge(m, ema, 2)
    moved = [p.flat.clone() for p in ema.profiles]
    with pytest.raises(ValueError, match=r"live views.*copy\.deepcopy"):
        ema.load_state_dict(live)  # values of step 5 with the clock of step 3: refused
    assert ema.step == 5 and all(torch.equal(a, p.flat) for a, p in zip(moved, ema.profiles))
    ema.load_state_dict(kept)  # a copy rolls back: values and clock of step 3
    assert ema.clock == clock and all(torch.equal(a, p.flat) for a, p in zip(values, ema.profiles))
    ema.load_state_dict(ema.state_dict())  # taken and loaded at the same moment: nothing to refuse
    # DCP loads into the dict's views in place, then calls load_state_dict: still a rollback
    dcp.save({"ema": ema}, checkpoint_id=str(tmp_path / "ckpt"))
    _nudge(m, ema, 2)
    dcp.load({"ema": ema}, checkpoint_id=str(tmp_path / "ckpt"))
    assert ema.clock == clock and all(torch.equal(a, p.flat) for a, p in zip(values, ema.profiles))


# ----------------------------------------------------------------------------- argument checks


def test_a_single_number_is_one_profile():
    m = nn.Linear(2, 2)
    assert PostHocEMA(m, sigma_rels=0.05).sigma_rels == (0.05,)
    assert PostHocEMA(m, gammas=7.0).gammas == (7.0,)
    assert PostHocEMA(m, sigma_rels=[0.05, 0.1]).sigma_rels == (0.05, 0.1)


@pytest.mark.parametrize("resume", ["takeovr", "true", 1, None])
def test_resume_accepts_only_its_values(resume, tmp_path):
    with pytest.raises(ValueError, match=r"resume must be True, False or 'takeover'") as e:
        PostHocEMA(nn.Linear(2, 2), store=str(tmp_path / "s"), resume=resume)
    assert repr(resume) in str(e.value)
    assert not (tmp_path / "s").exists()
