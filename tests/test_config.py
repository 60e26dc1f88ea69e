"""The dist-ema config file: loading, defaults, validation errors (field + fix), overrides."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path

import pytest

from dist_ema.config import (
    ConfigError,
    DistEMAConfig,
    add_config_arguments,
    apply_overrides,
    config_from_args,
    field_docs,
    load_config,
    load_toml,
)

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "c.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ------------------------------------------------------------------------------ loading


def test_shipped_example_config_loads() -> None:
    cfg = load_config(ROOT / "configs" / "dist_ema.toml")
    assert cfg.sigma_rels == (0.05, 0.10)
    assert cfg.update_every == 1 and cfg.snapshot_every == 25
    assert cfg.store == "runs/example/snapshots"
    assert cfg.storage_dtype == "float32" and cfg.compression is None and cfg.keep is None
    assert cfg.writer == "process" and cfg.storage_options is None
    # the [train] table beside it is the training script's business, and well-formed
    assert load_toml(ROOT / "configs" / "dist_ema.toml")["train"]["engine"] == "fsdp2"


def test_shipped_demo_config_loads() -> None:
    cfg = load_config(ROOT / "configs" / "demo.toml")
    assert cfg.sigma_rels == (0.05, 0.10) and cfg.snapshot_every == 25 and cfg.store is None


def test_defaults_without_file_and_with_empty_table(tmp_path: Path) -> None:
    assert load_config(None) == DistEMAConfig()
    cfg = load_config(write(tmp_path, "[dist_ema]\n"))
    assert cfg == DistEMAConfig()
    assert cfg.sigma_rels == (0.05, 0.10) and cfg.update_every == 1 and cfg.snapshot_every is None
    assert cfg.store is None and cfg.storage_dtype == "float32" and cfg.writer == "process"
    assert cfg.ema_kwargs() == {"sigma_rels": (0.05, 0.10), "update_every": 1}


def test_full_table_with_storage_options(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
[dist_ema]
sigma_rels = [0.04, 0.08, 0.12]
update_every = 4
snapshot_every = 250
store = "s3://bucket/run/snapshots"
storage_dtype = "bfloat16"
compression = "blosc-lz4"
keep = 200
writer = "thread"
when_behind = "skip"
on_error = "warn"

[dist_ema.storage_options]
endpoint_url = "http://127.0.0.1:9000"
secret = "do-not-print-me"

[train]
anything = "else"
"""))
    assert cfg.sigma_rels == (0.04, 0.08, 0.12) and cfg.update_every == 4 and cfg.snapshot_every == 250
    assert cfg.storage_options == {"endpoint_url": "http://127.0.0.1:9000", "secret": "do-not-print-me"}
    assert (cfg.storage_dtype, cfg.compression, cfg.keep, cfg.writer) == ("bfloat16", "blosc-lz4", 200, "thread")
    assert "do-not-print-me" not in cfg.describe() and "127.0.0.1:9000" in cfg.describe()
    assert (cfg.when_behind, cfg.on_error) == ("skip", "warn")
    kw = cfg.ema_kwargs()
    assert kw["store"] == "s3://bucket/run/snapshots" and kw["storage_dtype"] == "bfloat16" and kw["keep"] == 200
    assert kw["when_behind"] == "skip" and kw["on_error"] == "warn"


def test_none_and_all_spellings(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[dist_ema]\ncompression = "none"\nkeep = "all"\nsigma_rels = 0.1\n'))
    assert cfg.compression is None and cfg.keep is None and cfg.sigma_rels == (0.1,)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DistEMAConfig().update_every = 2  # type: ignore[misc]


def test_every_field_has_a_docstring() -> None:
    docs = field_docs()
    names = [f.name for f in dataclasses.fields(DistEMAConfig)]
    assert sorted(docs) == sorted(names)
    assert all(len(d) > 30 for d in docs.values()), docs


def test_allowed_values_match_the_library() -> None:
    from dist_ema.config import _COMPRESSIONS, _ON_ERROR, _STORAGE_DTYPES, _WHEN_BEHIND, _WRITERS, SnapshotConfig
    from dist_ema.store.io import COMPRESSIONS
    from dist_ema.store.layout import STORAGE_DTYPES

    assert set(_STORAGE_DTYPES) == set(STORAGE_DTYPES)
    assert set(_COMPRESSIONS) == {c for c in COMPRESSIONS if c is not None}
    for w in _WRITERS:
        SnapshotConfig(url="x", writer=w)
    for w in _WHEN_BEHIND:
        SnapshotConfig(url="x", when_behind=w)
    for e in _ON_ERROR:
        SnapshotConfig(url="x", on_error=e)


def test_ema_kwargs_are_posthocema_arguments_and_work(tmp_path: Path) -> None:
    """The kwargs build a real PostHocEMA that snapshots into the configured store (one process)."""
    import torch

    from dist_ema import PostHocEMA, open_store

    cfg = DistEMAConfig(sigma_rels=(0.05, 0.1), snapshot_every=2, store=str(tmp_path / "store"), writer="sync",
                        keep=3)
    params = inspect.signature(PostHocEMA.__init__).parameters
    assert set(cfg.ema_kwargs()) <= set(params)
    model = torch.nn.Linear(3, 2)
    ema = PostHocEMA(model, **cfg.ema_kwargs())
    for _ in range(8):
        with torch.no_grad():
            model.weight.add_(0.1)
        ema.update()
    ema.close()
    snaps = open_store(cfg.store).snapshots()
    assert [s.step for s in snaps][-1] == 8 and len(snaps) <= 3
    assert snaps[-1].sigma_rels == pytest.approx((0.05, 0.1))


# ------------------------------------------------------------------------------ validation


BAD = [
    # (TOML line, field named in the error, a piece of the fix)
    ("sigma_rels = [0.3]", "dist_ema.sigma_rels", "0.2887"),
    ("sigma_rels = [0.999]", "dist_ema.sigma_rels", "not a decay rate"),
    ("sigma_rels = []", "dist_ema.sigma_rels", "sigma_rels = [0.05, 0.10]"),
    ('sigma_rels = ["0.05"]', "dist_ema.sigma_rels", "no quotes"),
    ("sigma_rels = [0.05, 0.05]", "dist_ema.sigma_rels", "each sigma_rel once"),
    ('sigma_rels = "0.05"', "dist_ema.sigma_rels", "sigma_rels = [0.05, 0.10]"),
    ("update_every = 0", "dist_ema.update_every", "update_every = 1"),
    ('update_every = "10"', "dist_ema.update_every", "drop the quotes"),
    ("update_every = 2.5", "dist_ema.update_every", "integer"),
    ("snapshot_every = 0", "dist_ema.snapshot_every", "snapshot_every = 1000"),
    ("snapshot_every = true", "dist_ema.snapshot_every", "integer"),
    ('store = ""', "dist_ema.store", 'store = "runs/'),
    ('store = "memory://x"', "dist_ema.store", "local path or s3://"),
    ("store = 3", "dist_ema.store", "URL string"),
    ('storage_dtype = "fp8"', "dist_ema.storage_dtype", 'storage_dtype = "float32"'),
    ('compression = "gzip"', "dist_ema.compression", "blosc-lz4"),
    ("keep = 1", "dist_ema.keep", "keep = 200"),
    ('keep = "last"', "dist_ema.keep", '"all"'),
    ('writer = "mpi"', "dist_ema.writer", 'writer = "process"'),
    ('when_behind = "drop"', "dist_ema.when_behind", 'when_behind = "block"'),
    ('on_error = "ignore"', "dist_ema.on_error", 'on_error = "raise"'),
    ("storage_options = 3", "dist_ema.storage_options", "[dist_ema.storage_options]"),
]


@pytest.mark.parametrize("line,name,fix", BAD, ids=[b[0] for b in BAD])
def test_validation_names_field_and_fix(tmp_path: Path, line: str, name: str, fix: str) -> None:
    path = write(tmp_path, f"[dist_ema]\n{line}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert path in msg and name in msg and fix in msg, msg
    assert "Fix:" in msg or "valid keys" in msg, msg


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key dist_ema.snapshot_evry; did you mean 'snapshot_every'"):
        load_config(write(tmp_path, "[dist_ema]\nsnapshot_evry = 10\n"))
    with pytest.raises(ConfigError, match="valid keys: sigma_rels, update_every"):
        load_config(write(tmp_path, "[dist_ema]\nzzz = 1\n"))


def test_missing_table_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no \[dist_ema\] table \(tables found: \[train\]\)"):
        load_config(write(tmp_path, "[train]\nsteps = 3\n"))
    with pytest.raises(ConfigError, match="does not exist.*--config"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[dist_ema\nx = \n"))
    with pytest.raises(ConfigError, match=r"\[dist_ema\] must be a table"):
        load_config(write(tmp_path, "dist_ema = 3\n"))


def test_snapshot_settings_without_store() -> None:
    with pytest.raises(ConfigError, match=r"dist_ema.snapshot_every is set but dist_ema.store is not.*--store"):
        DistEMAConfig(snapshot_every=10).ema_kwargs()
    with pytest.raises(ConfigError, match=r"dist_ema.keep is set but dist_ema.store is not"):
        DistEMAConfig(keep=10).ema_kwargs()


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        DistEMAConfig(update_every=-1)


# ------------------------------------------------------------------------------ overrides


def test_apply_overrides(tmp_path: Path) -> None:
    base = load_config(write(tmp_path, '[dist_ema]\nsnapshot_every = 100\nstore = "a"\nkeep = 50\n'))
    cfg = apply_overrides(base, {"store": "b", "keep": None, "sigma_rels": [0.07], "update_every": None})
    assert cfg.store == "b" and cfg.keep == 50 and cfg.snapshot_every == 100 and cfg.sigma_rels == (0.07,)
    assert base.store == "a"  # the original is unchanged
    with pytest.raises(ConfigError, match=r"command-line override: dist_ema.update_every must be an integer >= 1"):
        apply_overrides(base, {"update_every": 0})
    with pytest.raises(ConfigError, match=r"unknown dist-ema setting\(s\) \['stor'\]"):
        apply_overrides(base, {"stor": "x"})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return p


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[dist_ema]\nsigma_rels = [0.05, 0.1]\nsnapshot_every = 100\nstore = "a"\nkeep = 50\n')
    cfg = config_from_args(_parser().parse_args(["--config", path]))
    assert cfg == load_config(path)  # no flags: the file as it is
    args = _parser().parse_args([
        "--config", path, "--store", "s3://b/p", "--sigma-rels", "0.08", "0.16", "--snapshot-every", "7",
        "--keep", "all", "--compression", "zstd", "--storage-dtype", "float16", "--writer", "sync",
        "--update-every", "3", "--storage-options", '{"endpoint_url": "http://x"}', "--when-behind", "skip",
        "--on-error", "warn",
    ])
    cfg = config_from_args(args)
    assert cfg.store == "s3://b/p" and cfg.sigma_rels == (0.08, 0.16) and cfg.snapshot_every == 7
    assert cfg.keep is None and cfg.compression == "zstd" and cfg.storage_dtype == "float16"
    assert cfg.writer == "sync" and cfg.update_every == 3 and cfg.storage_options == {"endpoint_url": "http://x"}
    assert (cfg.when_behind, cfg.on_error) == ("skip", "warn")
    # no --config: the defaults plus the flags
    assert config_from_args(_parser().parse_args(["--store", "x"])) == DistEMAConfig(store="x")


def test_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--storage-options", "{not json"])
    assert "not JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["--storage-options", "[1, 2]"])
    assert "must be a JSON object" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"command-line override: dist_ema.sigma_rels must each be in"):
        config_from_args(_parser().parse_args(["--sigma-rels", "0.5"]))
    with pytest.raises(ConfigError, match=r"command-line override: dist_ema.keep"):
        config_from_args(_parser().parse_args(["--keep", "1"]))


def test_a_word_for_keep_is_not_told_to_drop_its_quotes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, '[dist_ema]\nkeep = "last"\n'))
    assert "drop the quotes" not in str(e.value) and '"all"' in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="drop the quotes"):  # a number in quotes is
        load_config(write(tmp_path, '[dist_ema]\nkeep = "200"\n'))


def test_keep_flag_with_a_word(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--keep", "last"])
    err = capsys.readouterr().err
    assert "argument --keep: must be an integer K >= 2" in err and "'all'" in err, err


def test_describe_spells_none_and_all_as_the_config_does() -> None:
    line = DistEMAConfig(store="runs/x").describe()
    assert "compression=none keep=all" in line, line
    assert "compression=zstd keep=5" in DistEMAConfig(store="runs/x", compression="zstd", keep=5).describe()


def test_printed_field_docs_are_text() -> None:
    text = str(field_docs())
    assert "\\n" not in text and "{" not in text.splitlines()[0]
    lines = text.splitlines()
    assert lines[0] == "sigma_rels (default [0.05, 0.1]; flag --sigma-rels)", lines[0]
    assert "keep (default \"all\"; flag --keep)" in lines and all(len(x) <= 100 for x in lines)
    for name, doc in field_docs().items():  # every word of every docstring is printed
        assert " ".join(doc.split()) in " ".join(text.split()), name


def test_sigma_rel_is_an_alias_of_sigma_rels_in_scripts() -> None:
    assert config_from_args(_parser().parse_args(["--sigma-rel", "0.07"])).sigma_rels == (0.07,)


def test_a_mistyped_script_flag_names_the_closest_one(capsys: pytest.CaptureFixture[str]) -> None:
    from dist_ema.config import parse_args

    with pytest.raises(SystemExit):
        parse_args(_parser(), ["--snaphot-every", "5"])
    assert "unrecognized arguments: --snaphot-every (did you mean --snapshot-every?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(_parser(), ["--zzzzzzz"])
    assert "unrecognized arguments: --zzzzzzz\n" in capsys.readouterr().err


@pytest.mark.dist
def test_the_training_script_names_the_closest_flag() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "launch/train.py", "--snaphot-every", "3", "--sigma-rel", "0.05"],
                       capture_output=True, text=True, timeout=120, cwd=str(root))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "unrecognized arguments: --snaphot-every (did you mean --snapshot-every?)" in r.stderr, r.stderr[-2000:]


# ------------------------------------------------------------------------------ one check per field


def test_keyword_and_file_share_one_check_per_field(tmp_path: Path) -> None:
    """A bad value gives the same message as a PostHocEMA keyword, a SnapshotConfig field and a config key."""
    from dist_ema.config import EMAConfig, SnapshotConfig

    cases = [  # (keyword, value, how the config file spells the field)
        ("writer", "mpi", "writer"), ("when_behind", "drop", "when_behind"), ("on_error", "ignore", "on_error"),
        ("storage_dtype", "fp8", "storage_dtype"), ("compression", "gzip", "compression"), ("keep", 1, "keep"),
        ("snapshot_every", 0, "snapshot_every"), ("store", "", "store"), ("storage_options", 3, "storage_options"),
    ]
    snap_name = {"store": "url", "storage_dtype": "dtype"}
    for key, value, file_key in cases:
        with pytest.raises(ConfigError) as kw:
            SnapshotConfig(**{"url": "x", snap_name.get(key, key): value})
        with pytest.raises(ConfigError) as f:
            DistEMAConfig(**{file_key: value})
        assert str(f.value) == "dist_ema." + str(kw.value), (str(f.value), str(kw.value))
    for key, value in [("sigma_rels", (0.3,)), ("sigma_rels", (0.1, 0.1)), ("update_every", 0)]:
        with pytest.raises(ConfigError) as kw:
            EMAConfig(**{key: value})
        with pytest.raises(ConfigError) as f:
            DistEMAConfig(**{key: value})
        assert str(f.value) == "dist_ema." + str(kw.value), (str(f.value), str(kw.value))


def test_config_parts_and_defaults_agree() -> None:
    """DistEMAConfig's defaults are those of its two parts and of PostHocEMA's keywords."""
    from dist_ema import PostHocEMA
    from dist_ema.config import DEFAULT_INNER_BYTES, EMAConfig, SnapshotConfig
    from dist_ema.store import format as store_format
    from dist_ema.store import layout as store_layout

    # one constant spells the inner chunk's default
    assert DEFAULT_INNER_BYTES is store_format.DEFAULT_INNER_BYTES == 1 << 20
    assert store_layout.DEFAULT_INNER_BYTES is store_format.DEFAULT_INNER_BYTES
    assert DistEMAConfig().sigma_rels == EMAConfig().sigma_rels == (0.05, 0.10)
    kw = inspect.signature(PostHocEMA.__init__).parameters
    snap = {"url": "store", "dtype": "storage_dtype"}
    for f in dataclasses.fields(DistEMAConfig):  # store: None here, a required field of SnapshotConfig
        assert kw[f.name].default == f.default, f.name
    for f in dataclasses.fields(EMAConfig):
        assert kw[f.name].default == f.default, f.name
    for f in dataclasses.fields(SnapshotConfig):
        if f.name != "url":
            assert kw[snap.get(f.name, f.name)].default == f.default, f.name
    from dist_ema.snapshot.manager import SnapshotConfig as Reexported

    assert Reexported is SnapshotConfig
