"""Every documented setting is accepted end to end, by every entry point.

The settings are the fields of dist_ema.config's EMAConfig and SnapshotConfig; the README's
config table, field_docs(), the TOML keys and the flags are made from them. These tests take
the documented keys and flags from the README and field_docs(), and check that each one is
accepted where it is documented: as a TOML key (load_config), as a flag of launch/train.py's
parser and of add_config_arguments (config_from_args), as a PostHocEMA keyword, and that the
value arrives in the tracker's EMAConfig / SnapshotConfig and in the written snapshots. A
setting added to one place only, or a flag that a script shadows, fails here.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dist_ema import PostHocEMA, open_store
from dist_ema.config import (
    FIELD_CHECKS,
    ConfigError,
    DistEMAConfig,
    EMAConfig,
    SnapshotConfig,
    add_config_arguments,
    apply_overrides,
    config_from_args,
    field_docs,
    flag_of,
    keys,
    load_config,
    readme_table,
)

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# one value per key, none of them the default: (as TOML, as flag arguments, as the config holds it).
# A new setting fails test_every_key_has_a_sample until it is added here.
STORE = "@STORE@"
SAMPLES: dict[str, tuple[str, list[str], object]] = {
    "sigma_rels": ("[0.07, 0.12]", ["0.07", "0.12"], (0.07, 0.12)),
    "update_every": ("2", ["2"], 2),
    "gammas": ("[10.0, 20.0]", ["10", "20"], (10.0, 20.0)),
    "batch_size": ("64", ["64"], 64),
    "include_frozen": ("false", [], False),  # the flag is --no-include-frozen
    "params": ('["0.*", "2.weight"]', ["0.*", "2.weight"], ("0.*", "2.weight")),
    "buffers": ('"ignore"', ["ignore"], "ignore"),
    "update_impl": ('"foreach"', ["foreach"], "foreach"),
    "offload": ("true", [], True),
    "store": (f'"{STORE}"', [STORE], STORE),
    "snapshot_every": ("3", ["3"], 3),
    "storage_options": ("{auto_mkdir = true}", ['{"auto_mkdir": true}'], {"auto_mkdir": True}),
    "storage_dtype": ('"bfloat16"', ["bfloat16"], "bfloat16"),
    "compression": ('"zstd"', ["zstd"], "zstd"),
    "keep": ("5", ["5"], 5),
    "inner_chunk_bytes": ("4096", ["4096"], 4096),
    "writer": ('"thread"', ["thread"], "thread"),
    "slots": ("3", ["3"], 3),
    "upload_part_bytes": ("8388608", ["8388608"], 8388608),
    "upload_concurrency": ("2", ["2"], 2),
    "when_behind": ('"skip"', ["skip"], "skip"),
    "on_error": ('"warn"', ["warn"], "warn"),
    "timeout": ("60.0", ["60"], 60.0),
}
# PostHocEMA keywords that are not settings of a config file: the model, what to do with an existing
# store (a flag of each script: --resume), a hand-made layout, and the old name of inner_chunk_bytes
NOT_SETTINGS = {"self", "model_or_engine", "resume", "layout", "max_object_bytes"}


def _readme_rows() -> dict[str, tuple[str, str]]:
    """{key: (default cell, flag cell)} of the README's config table."""
    section = README.split("## Config reference", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (.*?) \| (`--.*?) \| .* \|$", section, re.M)
    return {key: (default, flags) for key, default, flags in rows}


def _readme_flags(cell: str) -> list[str]:
    return re.findall(r"`(--[\w-]+)", cell)


def _samples(store: str, without: str) -> dict[str, tuple[str, list[str], object]]:
    """SAMPLES with the store filled in, all but ``without`` (sigma_rels and gammas exclude each other)."""
    out = {}
    for key, (toml, argv, value) in SAMPLES.items():
        if key != without:
            out[key] = (toml.replace(STORE, store), [a.replace(STORE, store) for a in argv],
                        store if value == STORE else value)
    return out


def _toml(samples: dict) -> str:
    return "[dist_ema]\n" + "".join(f"{key} = {toml}\n" for key, (toml, _, _) in samples.items())


def _argv(samples: dict) -> list[str]:
    out = []
    for key, (_, argv, value) in samples.items():
        out += [flag_of(key), *argv] if value is not False else ["--no-" + flag_of(key)[2:]]
    return out


def _train_parser() -> argparse.ArgumentParser:
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import train
    finally:
        sys.path.remove(str(ROOT / "launch"))
    return train.build_parser()


def _config_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return p


# ------------------------------------------------------------------------------ one list of settings


def test_every_key_has_a_sample() -> None:
    assert list(SAMPLES) == keys()


def test_posthocema_keywords_are_the_config_keys() -> None:
    """Every PostHocEMA keyword (but the model, resume, layout) is a config key with the same default, and back."""
    params = inspect.signature(PostHocEMA.__init__).parameters
    assert set(params) - NOT_SETTINGS == set(keys())
    for f in dataclasses.fields(DistEMAConfig):
        assert params[f.name].default == f.default, f.name


def test_every_key_has_one_check_a_docstring_a_flag_and_a_readme_row() -> None:
    docs = field_docs()
    rows = _readme_rows()
    assert list(docs) == keys() == list(rows)
    assert set(FIELD_CHECKS) == set(keys())
    for key in keys():
        assert len(docs[key]) > 30, key
        assert _readme_flags(rows[key][1])[0] == flag_of(key), key
    parts = (EMAConfig, SnapshotConfig)
    part_keys = [f.metadata.get("key", f.name) for part in parts for f in dataclasses.fields(part)]
    assert part_keys == keys()


def test_readme_table_is_generated_from_the_fields() -> None:
    assert readme_table() in README, "README.md's config table is stale: python -m dist_ema.config --readme"


def test_python_m_dist_ema_config_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    from dist_ema.config import _main  # python -m dist_ema.config [--readme]

    assert _main(["--readme"]) == 0
    assert capsys.readouterr().out.strip() == readme_table()
    assert _main([]) == 0
    assert capsys.readouterr().out.strip() == str(field_docs())


def test_shipped_config_names_every_key() -> None:
    text = (ROOT / "configs" / "dist_ema.toml").read_text()
    for key in keys():
        said = rf"^(# )?({key} = |\[dist_ema\.{key}\])"  # a key, a commented-out key or a table
        assert re.search(said, text, re.M), f"configs/dist_ema.toml does not mention {key}"


# ------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("make", [_train_parser, _config_parser], ids=["launch/train.py", "add_config_arguments"])
def test_every_readme_flag_is_a_flag_of_the_scripts(make) -> None:
    parser = make()
    options = {o for a in parser._actions for o in a.option_strings}
    for key, (_, cell) in _readme_rows().items():
        for flag in _readme_flags(cell):
            assert flag in options, f"README documents {flag} ({key}); {parser.prog} does not take it"


@pytest.mark.parametrize("without", ["gammas", "sigma_rels"])
def test_every_flag_and_every_key_give_the_same_config(tmp_path: Path, without: str) -> None:
    """Each flag with a non-default value, parsed by launch/train.py's parser, gives the config the TOML gives."""
    samples = _samples(str(tmp_path / "store"), without)
    path = tmp_path / "c.toml"
    path.write_text(_toml(samples))
    from_file = load_config(path)
    for key, (_, _, value) in samples.items():
        assert getattr(from_file, key) == value, key
    for make in (_train_parser, _config_parser):
        args = make().parse_args(_argv(samples))
        from_flags = config_from_args(args)
        assert from_flags == from_file, make.__name__
    # flags override a file that sets everything the other way
    base = load_config(tmp_path / "c.toml")
    assert apply_overrides(base, {"update_every": 7}).update_every == 7


def test_the_timeout_flag_reaches_the_training_script(tmp_path: Path) -> None:
    """launch/train.py --timeout 5: parsed and validated (it stops only where a launcher is needed)."""
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import train
    finally:
        sys.path.remove(str(ROOT / "launch"))
    env_rank = os.environ.pop("RANK", None)
    try:
        with pytest.raises(ValueError, match="start this script with torchrun"):
            train.main(["--timeout", "5", "--slots", "3", "--inner-chunk-bytes", "4096",
                        "--store", str(tmp_path / "s")])
        with pytest.raises(ConfigError, match=r"dist_ema.timeout must be a positive number"):
            train.main(["--timeout", "0", "--store", str(tmp_path / "s")])
    finally:
        if env_rank is not None:
            os.environ["RANK"] = env_rank


def test_the_cli_takes_the_settings_it_documents() -> None:
    from dist_ema.cli import build_parser

    p = build_parser()
    args = p.parse_args(["error", flag_of("sigma_rels"), "0.05", "0.1", "--config", "c.toml"])
    assert args.sigma_rels == [0.05, 0.1] and args.config == "c.toml"
    for command in ("ls", "inspect", "synthesize"):
        extra = ["--sigma-rels", "0.1", "--out", "o"] if command == "synthesize" else []
        args = p.parse_args([command, "s", flag_of("storage_options"), '{"anon": true}', "--config", "c.toml",
                             *extra])
        assert json.loads(args.storage_options) == {"anon": True} and args.config == "c.toml", command


# ------------------------------------------------------------------------------ end to end


def _toy() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    m[0].bias.requires_grad_(False)  # a frozen parameter: include_frozen decides
    return m


@pytest.mark.parametrize("without", ["gammas", "sigma_rels"])
def test_every_key_reaches_the_tracker_and_the_store(tmp_path: Path, without: str) -> None:
    """A config file with every key set: PostHocEMA built from it holds each value, and its snapshots show them."""
    url = str(tmp_path / "store")
    samples = _samples(url, without)
    path = tmp_path / "c.toml"
    path.write_text(_toml(samples))
    cfg = load_config(path)
    m = _toy()
    with PostHocEMA(m, **cfg.ema_kwargs()) as ema:
        for _ in range(12):  # 6 EMA updates (update_every 2): snapshots after updates 3 and 6
            with torch.no_grad():
                m[0].weight.add_(0.01)
            ema.update()
        for key, (_, _, value) in samples.items():
            snap_name = {"store": "url", "storage_dtype": "dtype"}.get(key, key)
            if hasattr(ema.config, key):
                got = ema.config.__dict__[key]
            else:
                got = ema.store_config.__dict__[snap_name]
            assert got == pytest.approx(value) if isinstance(value, tuple) else got == value, (key, got, value)
        names = set(ema.layout.params)
    snaps = open_store(url).snapshots()
    assert snaps, "no snapshot written"
    meta = snaps[-1].meta
    assert meta["inner_bytes"] == 4096
    assert snaps[-1].dtype == "bfloat16" and meta["compression"] == "zstd"
    assert meta["unit"] == "samples" and meta["update_every"] == 2  # batch_size given: time in samples
    assert not meta.get("buffers")  # buffers = "ignore"
    assert "0.bias" not in names  # include_frozen = false
    assert names == {"0.weight", "2.weight"} and meta["params"] == {"patterns": ["0.*", "2.weight"]}  # params


# ------------------------------------------------------------------------------ the old name


def test_max_object_bytes_still_works_and_names_the_new_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[dist_ema]\nmax_object_bytes = 4096\n")
    with pytest.warns(DeprecationWarning, match=r"dist_ema.max_object_bytes .*use dist_ema.inner_chunk_bytes"):
        assert load_config(path).inner_chunk_bytes == 4096
    path.write_text("[dist_ema]\nmax_object_bytes = 4096\ninner_chunk_bytes = 8192\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ConfigError, match="name the same setting"):
            load_config(path)
    url = str(tmp_path / "s")
    with pytest.warns(DeprecationWarning, match=r"max_object_bytes is deprecated.*use inner_chunk_bytes") as rec:
        ema = PostHocEMA(torch.nn.Linear(3, 2), store=url, writer="sync", max_object_bytes=64)
    assert any(r.filename == __file__ for r in rec), [r.filename for r in rec]  # points at the caller's line
    with ema:
        assert ema.store_config.inner_chunk_bytes == 64 == ema.store_config.max_object_bytes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ConfigError, match="give inner_chunk_bytes only"):
            PostHocEMA(torch.nn.Linear(3, 2), store=str(tmp_path / "t"), writer="sync", max_object_bytes=64,
                       inner_chunk_bytes=128)
