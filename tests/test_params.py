"""params=: track a chosen subset (glob patterns or a predicate), and PEFT adapter export; in one process.

Checked against computations that do not use dist_ema: the EMA of the chosen parameters is a float64
lerp of the recorded trajectory, and bitwise the EMA tracked without params=; snapshots, synthesized
outputs and load_synthesized cover exactly the chosen parameters and buffers; a PEFT LoRA adapter's
synthesized EMA exported with format="peft" loads with ``PeftModel.from_pretrained`` and computes what its
weights say. The multi-process side (FSDP2, DDP, ZeRO-2; ranks that disagree) is tests/test_params_dist.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dist_ema import PostHocEMA, load_synthesized, open_store, synthesize
from dist_ema.config import ConfigError, EMAConfig, add_config_arguments, config_from_args, load_config
from dist_ema.phema import sigma_rel_to_gamma
from dist_ema.sharding.watch import ModelChangedError
from dist_ema.store.fs import StoreError
from tests.engines import TinyNet

SIGMAS = (0.05, 0.10)
STEPS, EVERY = 6, 2
CHOSEN = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}  # what every form below chooses (and buffer scale)
FORMS = {
    "globs": ["fc*", "scale"],
    "predicate": lambda name, p: name.startswith("fc") or (name == "scale" and p.dim() == 1),
}


class Net(TinyNet):
    """TinyNet (tests/engines.py) with a second buffer, to choose one buffer and leave the other."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(1))


def _step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randint(0, 7, (8,), generator=g), torch.randn(8, generator=g)
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        model.scale.mul_(1.01)
        model.count.add_(1)


def brute_lerp(traj: list[dict[str, torch.Tensor]], sigma_rel: float) -> dict[str, torch.Tensor]:
    """The EMA after len(traj) unit steps, in float64: ema.lerp_(p, 1 - beta), beta = (1 - 1/t)^(g+1)."""
    g = float(sigma_rel_to_gamma(sigma_rel))
    ema = {k: v.clone() for k, v in traj[0].items()}
    for t, th in enumerate(traj, start=1):
        beta = (1.0 - 1.0 / t) ** (g + 1)
        for k in ema:
            ema[k].lerp_(th[k], 1.0 - beta)
    return ema


# ----------------------------------------------------------------------------- the setting


def test_the_setting_takes_patterns_a_list_or_a_callable(tmp_path: Path) -> None:
    assert EMAConfig(params="*.lora_*").params == ("*.lora_*",)
    assert EMAConfig(params=["a.*", "b"]).params == ("a.*", "b")
    f = FORMS["predicate"]
    assert EMAConfig(params=f).params is f
    assert EMAConfig().params is None
    for bad, why in (([], "empty"), ([1], "glob pattern"), ([""], "glob pattern"), (3, "glob pattern")):
        with pytest.raises(ConfigError, match=why):
            EMAConfig(params=bad)
    path = tmp_path / "c.toml"
    path.write_text('[dist_ema]\nparams = "*.lora_*"\n')
    assert load_config(path).params == ("*.lora_*",)
    path.write_text('[dist_ema]\nparams = ["fc*", "scale"]\n')
    assert load_config(path).params == ("fc*", "scale")
    path.write_text("[dist_ema]\nparams = 3\n")
    with pytest.raises(ConfigError, match=r"dist_ema.params must be a glob pattern"):
        load_config(path)
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    assert config_from_args(p.parse_args(["--ema-params", "fc*", "scale"])).params == ("fc*", "scale")
    assert config_from_args(p.parse_args([])).params is None
    with pytest.raises(ConfigError, match=r"^params must be a glob pattern"):
        PostHocEMA(Net(), params={"fc*"})
    # make_layout takes it too, and a hand-made layout is restricted the same way
    from dist_ema.sharding.detect import make_layout

    m = Net()
    assert set(make_layout(m, params="fc1.*").params) == {"fc1.weight", "fc1.bias"}
    assert set(PostHocEMA(m, layout=make_layout(m), params="fc1.*").layout.params) == {"fc1.weight", "fc1.bias"}
    with pytest.raises(ConfigError, match=r"matches no parameter"):
        PostHocEMA(m, layout=make_layout(m), params="fc9.*")


# ----------------------------------------------------------------------------- one run, three EMAs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One trajectory with the EMA of every parameter and the two forms of the same choice, each with a store."""
    tmp = tmp_path_factory.mktemp("params")
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    emas = {name: PostHocEMA(model, sigma_rels=SIGMAS, params=params, store=str(tmp / name), snapshot_every=EVERY,
                             writer="sync")
            for name, params in (("all", None), *FORMS.items())}
    traj = [{k: v.detach().double().clone() for k, v in model.named_parameters()}]
    for i in range(STEPS):
        _step(model, opt, i)
        for ema in emas.values():
            ema.update()
        traj.append({k: v.detach().double().clone() for k, v in model.named_parameters()})
    tracked = {name: {s: ema.full_state_dict(sigma_rel=s) for s in SIGMAS} for name, ema in emas.items()}
    layouts = {name: (set(ema.layout.params), set(ema.layout.buffers)) for name, ema in emas.items()}
    for ema in emas.values():
        ema.close()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    return {"tmp": tmp, "traj": traj[1:], "tracked": tracked, "layouts": layouts, "buffers": buffers, "model": model}


@pytest.mark.parametrize("form", list(FORMS))
def test_the_chosen_set_is_tracked_exactly_as_without_params(run, form: str) -> None:
    assert run["layouts"][form] == (CHOSEN, {"scale"})
    assert run["layouts"]["all"][0] == {n for n, _ in Net().named_parameters()}
    for s in SIGMAS:
        got, full = run["tracked"][form][s], run["tracked"]["all"][s]
        assert set(got) == CHOSEN | {"scale"}
        brute = brute_lerp(run["traj"], s)
        for k in CHOSEN:
            assert torch.equal(got[k], full[k]), (form, s, k)  # bitwise the EMA tracked without params=
            torch.testing.assert_close(got[k].double(), brute[k], rtol=1e-6, atol=1e-6)
        assert torch.equal(got["scale"], run["buffers"]["scale"])


@pytest.mark.parametrize("form", list(FORMS))
def test_snapshots_synthesis_and_load_cover_exactly_the_chosen_set(run, form: str, tmp_path: Path) -> None:
    url = str(run["tmp"] / form)
    store = open_store(url)
    snaps = store.snapshots()
    assert [s.step for s in snaps] == list(range(EVERY, STEPS + 1, EVERY))
    record = {"patterns": FORMS[form]} if form == "globs" else {"callable": f"{__name__}.<lambda>"}
    for snap in snaps:
        assert set(store.params(snap)) == CHOSEN
        assert [b[0] for b in snap.meta["buffers"]] == ["scale"]
        assert snap.meta["params"] == record
    # the tracked EMA at the last snapshot reads back exactly
    for s in SIGMAS:
        for k in CHOSEN:
            assert torch.equal(torch.as_tensor(store.read(snaps[-1].step, s, k)), run["tracked"][form][s][k])
    res = synthesize(url, sigma_rels=[0.07], out=str(tmp_path / "out"), progress=False)
    mine = load_file(res.files[0])
    full = load_file(synthesize(str(run["tmp"] / "all"), sigma_rels=[0.07], out=str(tmp_path / "all"),
                                progress=False).files[0])
    assert set(mine) == CHOSEN | {"scale"}
    for k in CHOSEN:
        torch.testing.assert_close(mine[k], full[k], rtol=1e-6, atol=1e-7)
    # load_synthesized into a fresh model: exactly the chosen parameters and buffers, the others untouched
    torch.manual_seed(7)
    fresh = Net()
    before = {k: v.detach().clone() for k, v in fresh.state_dict().items()}
    loaded = load_synthesized(fresh, url, sigma_rel=0.07)
    after = fresh.state_dict()
    for k in before:
        if k in CHOSEN or k == "scale":
            assert torch.equal(after[k], mine[k]), k
        else:
            assert torch.equal(after[k], before[k]), k
    assert set(loaded.kept_params) == {n for n, _ in fresh.named_parameters()} - CHOSEN
    assert loaded.buffers == ("scale",) and loaded.kept_buffers == ("count",)


def test_resume_with_another_choice_is_refused(run) -> None:
    url = str(run["tmp"] / "globs")
    model = run["model"]
    for other, said in ((None, r"every parameter \(no params=\)"), (["fc*"], r"params=\['fc\*'\]"),
                        (FORMS["predicate"], r"params=<callable")):
        with pytest.raises(StoreError, match=rf"written tracking params=\['fc\*', 'scale'\].*this EMA tracks {said}"):
            PostHocEMA(model, sigma_rels=SIGMAS, params=other, store=url, resume=True, writer="sync")
    # a callable resumes a callable's store when it chooses the same names, and is refused when it does not
    url = str(run["tmp"] / "predicate")
    with pytest.raises(StoreError, match=r"params= callable that chose other parameters.*only in this model \[.emb"):
        PostHocEMA(model, sigma_rels=SIGMAS, params=lambda n, p: n.startswith(("fc", "emb")), store=url,
                   resume=True, writer="sync")
    with PostHocEMA(model, sigma_rels=SIGMAS, params=lambda n, p: n.startswith("fc") or n == "scale", store=url,
                    resume=True, writer="sync") as ema:
        assert ema.step == STEPS
        assert torch.equal(ema.full_state_dict(sigma_rel=0.05)["fc1.weight"], run["tracked"]["predicate"][0.05][
            "fc1.weight"])


# ----------------------------------------------------------------------------- refusals and the model watch


def test_a_pattern_that_matches_nothing_names_the_patterns_and_the_model_names() -> None:
    with pytest.raises(ConfigError, match=r"patterns? \['nope\.\*'\] matches no parameter or buffer name.*"
                                          r"names are like \['emb.weight', 'fc1.bias'"):
        PostHocEMA(Net(), params=["fc1.*", "nope.*"])
    with pytest.raises(ConfigError, match=r"chose no parameter to track"):
        PostHocEMA(Net(), params=lambda n, p: False)
    with pytest.raises(ConfigError, match=r"chose no parameter to track.*include_frozen=False"):
        m = Net()
        m.fc1.requires_grad_(False)
        PostHocEMA(m, params="fc1.*", include_frozen=False)
    with pytest.raises(ConfigError, match=r"params= callable failed on 'emb.weight': ZeroDivisionError"):
        PostHocEMA(Net(), params=lambda n, p: 1 / 0)


def test_changes_outside_the_chosen_set_are_not_a_changed_model() -> None:
    torch.manual_seed(0)
    m = Net()
    m.head.requires_grad_(False)
    m.fc2.bias.requires_grad_(False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ema = PostHocEMA(m, params=["fc*", "head.*"], include_frozen=False)
    assert set(ema.layout.params) == {"fc1.weight", "fc1.bias", "fc2.weight"}
    _step(m, opt, 0)
    ema.update()
    m.extra = nn.Linear(3, 3)  # a new module outside the choice
    m.emb.weight.data = m.emb.weight.data.clone()  # a storage outside the choice moved
    _step(m, opt, 1)
    assert ema.update() and ema.relisted == 0
    m.head.requires_grad_(True)  # chosen by the patterns: newly trainable
    _step(m, opt, 2)
    with pytest.raises(ModelChangedError, match=r"newly trainable: head.bias, head.weight"):
        ema.update()
    m.head.requires_grad_(False)  # undone: the refused step is taken now
    assert ema.update()
    m.fc3 = nn.Linear(2, 2)  # a new module the patterns choose
    _step(m, opt, 4)
    with pytest.raises(ModelChangedError, match=r"added: fc3.bias, fc3.weight"):
        ema.update()


# ----------------------------------------------------------------------------- PEFT


class Base(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def lora_model(seed: int = 0):
    """A real peft LoRA model on Base (adapter weights random, so the adapter matters from the start)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = Base()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}  # before get_peft_model wraps its layers
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights=False)
    return get_peft_model(base, cfg), base_sd


def check_adapter(folder: str, weights: dict[str, torch.Tensor], base_sd: dict[str, torch.Tensor]) -> None:
    """``folder`` loads with PeftModel.from_pretrained into a fresh base; its LoRA weights are ``weights``
    (PeftModel names), and the merged model computes x W^T + b with W = W0 + scale B A (fp32 tolerance)."""
    from peft import PeftModel

    base = Base()
    base.load_state_dict(base_sd)
    loaded = PeftModel.from_pretrained(base, folder)
    lora = {k: v for k, v in loaded.named_parameters() if "lora_" in k}
    assert set(lora) == set(weights)
    for k, v in lora.items():
        assert torch.equal(v.detach(), weights[k]), k
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    scale = 4 / 2
    want = x
    for i, name in enumerate(("fc1", "fc2")):
        a = weights[f"base_model.model.{name}.lora_A.default.weight"]
        b = weights[f"base_model.model.{name}.lora_B.default.weight"]
        w = base_sd[f"{name}.weight"] + scale * b @ a
        want = want @ w.T + base_sd[f"{name}.bias"]
        if i == 0:
            want = torch.relu(want)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded.merge_and_unload()(x), want, rtol=1e-5, atol=1e-6)


def test_a_lora_adapter_exports_as_peft_files(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from dist_ema import export_peft

    pm, base_sd = lora_model()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    url = str(tmp_path / "store")
    with PostHocEMA(pm, sigma_rels=SIGMAS, params="*lora_*", store=url, snapshot_every=EVERY, writer="sync") as ema:
        for i in range(STEPS):
            x = torch.randn(8, 6, generator=torch.Generator().manual_seed(i))
            pm(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            ema.update()
        assert set(ema.layout.params) == {f"base_model.model.{m}.lora_{ab}.default.weight" for m in ("fc1", "fc2")
                                          for ab in "AB"}
    meta = open_store(url).snapshots()[-1].meta
    assert meta["peft"]["adapter"] == "default" and meta["peft"]["config"]["peft_type"] == "LORA"
    assert meta["peft"]["keys"]["base_model.model.fc1.lora_A.default.weight"] == "base_model.model.fc1.lora_A.weight"
    out = str(tmp_path / "peft")
    res = synthesize(url, sigma_rels=[0.07, 0.10], out=out, format="peft", progress=False)
    plain = synthesize(url, sigma_rels=[0.07, 0.10], out=str(tmp_path / "st"), progress=False)
    for j, s in enumerate((0.07, 0.10)):
        folder = Path(out) / f"sigma_rel-{s:.4f}"
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        stored = load_file(str(folder / "adapter_model.safetensors"))
        assert set(stored) == {f"base_model.model.{m}.lora_{ab}.weight" for m in ("fc1", "fc2") for ab in "AB"}
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == 2 and config["inference_mode"] is True and sorted(config["target_modules"]) == [
            "fc1", "fc2"]
        synthesized = load_file(plain.files[j])  # the same target as model.safetensors (PeftModel names)
        check_adapter(str(folder), synthesized, base_sd)
        assert all(torch.equal(stored[k.replace(".default", "")], v) for k, v in synthesized.items())
    assert res.files[0].endswith("sigma_rel-0.0700/adapter_model.safetensors")
    # export_peft: one target, the folder to load; CLI --format peft the same
    folder = export_peft(url, str(tmp_path / "one"), sigma_rel=0.10, progress=False)
    check_adapter(folder, load_file(plain.files[1]), base_sd)
    from dist_ema.cli import main

    assert main(["synthesize", url, "--sigma-rels", "0.1", "--out", str(tmp_path / "cli"), "--format", "peft",
                 "--no-progress"]) == 0
    check_adapter(str(tmp_path / "cli" / "sigma_rel-0.1000"), load_file(plain.files[1]), base_sd)


def test_peft_export_needs_every_adapter_tensor_and_a_config(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from peft import LoraConfig

    pm, base_sd = lora_model()
    url = str(tmp_path / "a")
    with PostHocEMA(pm, params="*lora_A*", store=url, writer="sync") as ema:  # lora_B left out
        torch.optim.SGD(pm.parameters(), lr=0.0).step()  # one (empty) optimizer step: one update, one snapshot
        ema.update()
        ema.snapshot()
    with pytest.raises(StoreError, match=r"do not track 2 of the 4 tensors of PEFT adapter 'default'.*lora_B"):
        synthesize(url, sigma_rels=[0.1], out=str(tmp_path / "o1"), format="peft", progress=False)
    assert not (tmp_path / "o1").exists() or not any((tmp_path / "o1").iterdir())
    # a store of a plain model (no PEFT record): the config given explicitly, keys by PEFT's rule
    m = Base()
    url = str(tmp_path / "plain")
    with PostHocEMA(m, store=url, writer="sync") as ema:
        torch.optim.SGD(m.parameters(), lr=0.0).step()
        ema.update()
        ema.snapshot()
    with pytest.raises(ConfigError, match=r"no PEFT adapter record.*pass adapter_config="):
        synthesize(url, sigma_rels=[0.1], out=str(tmp_path / "o2"), format="peft", progress=False)
    with pytest.raises(StoreError, match=r"no tracked parameter belongs to a PEFT adapter named 'default'"):
        synthesize(url, sigma_rels=[0.1], out=str(tmp_path / "o3"), format="peft", progress=False,
                   adapter_config=LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ConfigError, match=r"adapter_config= is for format='peft'"):
        synthesize(url, sigma_rels=[0.1], out=str(tmp_path / "o4"), progress=False, adapter_config={})


def test_a_lora_store_without_its_record_exports_with_the_config_given(tmp_path: Path) -> None:
    """The adapter tracked through another name (no PeftModel in sight at training time): adapter_config= and
    PEFT's naming rule give the same files as the recorded export."""
    pytest.importorskip("peft")
    from dist_ema.adapters import export_keys

    pm, base_sd = lora_model()
    names = [n for n, p in pm.named_parameters() if "lora_" in n]
    keys, config = export_keys(None, names, pm.peft_config["default"])
    assert keys == {n: n.replace(".default", "") for n in names}
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True
