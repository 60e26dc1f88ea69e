"""Every error dist-ema raises on purpose is a DistEMAError, and also the builtin it used to be.

An AST scan of dist_ema/ refuses a ``raise ValueError(...)`` (or another builtin) outside the
checks of dist-ema's own invariants listed in INTERNAL, so the policy cannot drift; the
behavioural checks raise the typical bad inputs and catch them both ways.
"""

from __future__ import annotations

import ast
import collections
import importlib
import json
import pickle
import pkgutil
from pathlib import Path

import numpy as np
import pytest
import torch

import dist_ema
from dist_ema import errors, phema
from dist_ema.errors import (
    CheckpointError,
    ConfigError,
    DistEMAError,
    LayoutError,
    OutputExistsError,
    StateDictError,
    TargetError,
    UsageError,
)

PACKAGE = Path(dist_ema.__file__).parent

# builtins a deliberate error of dist-ema must not be raised as (ImportError: a missing optional
# dependency; AttributeError: the module __getattr__ protocol; both stay builtin on purpose)
BUILTINS = {"ValueError", "RuntimeError", "TypeError", "KeyError", "IndexError", "LookupError", "OSError", "IOError",
            "FileExistsError", "FileNotFoundError", "PermissionError", "NotImplementedError", "AssertionError",
            "Exception", "ConnectionError", "TimeoutError"}

# (file, enclosing function, builtin) -> (how many raises, why it stays builtin): invariants of
# dist-ema's own code, never reached by a user's input or a store's content unless dist-ema has a bug
INTERNAL = {
    ("dist_ema/sharding/base.py", "even_split", "ValueError"):
        (1, "adapters pass ranks of their own process groups"),
    ("dist_ema/sharding/base.py", "replica_cuts", "ValueError"):
        (1, "adapters pass replica indices of their own process groups"),
    ("dist_ema/sharding/base.py", "check_pieces_local", "ValueError"):
        (5, "sanity checks of an adapter's own pieces; verify_layout reports them inside ShardCoverageError"),
    ("dist_ema/sharding/resync.py", "make_replicated_resync", "ValueError"):
        (1, "the pieces and the parameters come from one adapter call"),
    ("dist_ema/store/io.py", "write_shard", "ValueError"):
        (1, "the writer hands over the values its own geometry describes"),
    ("dist_ema/store/writer.py", "_execute", "TypeError"):
        (1, "the manager submits only the job types of store/jobs.py"),
    ("dist_ema/store/writer.py", "SnapshotWriter.submit", "ValueError"):
        (1, "the manager submits every data job with the slot it staged into"),
    ("dist_ema/store/fs.py", "retry", "AssertionError"):
        (1, "after the retry loop, which returns or raises"),
    ("dist_ema/store/fs.py", "StoreIO.put.do", "FileExistsError"):
        (2, "the create-only write's 'object exists' answer, which every caller catches"),
}

# files (and folders, ending in "/") being rewritten elsewhere: test_pending_files_follow_the_policy lists
# their raises
PENDING: set[str] = set()


def pending(rel: str) -> bool:
    return any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in PENDING)


class _Raises(ast.NodeVisitor):
    """Counts ``raise <builtin>`` and ``raise <builtin>(...)`` per enclosing function (``Class.method.inner``)."""

    def __init__(self, rel: str) -> None:
        self.rel, self.stack = rel, []
        self.hits: collections.Counter = collections.Counter()

    def _scope(self, node: ast.AST) -> None:
        self.stack.append(node.name)  # type: ignore[attr-defined]
        self.generic_visit(node)
        self.stack.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scope

    def visit_Raise(self, node: ast.Raise) -> None:
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        if isinstance(exc, ast.Name) and exc.id in BUILTINS:
            self.hits[(self.rel, ".".join(self.stack) or "<module>", exc.id)] += 1
        self.generic_visit(node)


def builtin_raises(only_pending: bool) -> collections.Counter:
    """{(file, function, builtin): count} over dist_ema/: the PENDING files, or all the others."""
    hits: collections.Counter = collections.Counter()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        if pending(rel) == only_pending:
            scan = _Raises(rel)
            scan.visit(ast.parse(path.read_text(), filename=rel))
            hits.update(scan.hits)
    return hits


def _listing(hits: dict) -> str:
    return "\n".join(f"  {f}: {fn}() raises {exc} x{n}" for (f, fn, exc), n in sorted(hits.items()))


# ----------------------------------------------------------------------------- the scan


def test_scan_sees_every_form_of_raise(tmp_path):
    """The scanner itself: calls, bare classes, nested functions and methods; names that are not builtins pass."""
    src = ("def f(x):\n    if x:\n        raise ValueError('a')\n    raise KeyError\n"
           "class C:\n    def m(self):\n        def inner():\n            raise TypeError('b') from None\n"
           "        raise ConfigError('c')\n")
    scan = _Raises("x.py")
    scan.visit(ast.parse(src))
    assert dict(scan.hits) == {("x.py", "f", "ValueError"): 1, ("x.py", "f", "KeyError"): 1,
                               ("x.py", "C.m.inner", "TypeError"): 1}


def test_no_builtin_raises_outside_the_listed_invariants():
    hits = builtin_raises(only_pending=False)
    unlisted = {k: n for k, n in hits.items() if k not in INTERNAL}
    assert not unlisted, (
        "raise a DistEMAError subclass (dist_ema/errors.py: ConfigError, TargetError, LayoutError, ...) that is "
        "also the builtin, or list a true invariant check in INTERNAL with the reason:\n" + _listing(unlisted))
    changed = {k: n for k, n in hits.items() if k in INTERNAL and INTERNAL[k][0] != n}
    stale = {k: v[0] for k, v in INTERNAL.items() if k not in hits}
    assert not changed and not stale, (
        f"INTERNAL is out of date; now:\n{_listing(changed)}\nno longer raised:\n{_listing(stale)}")


def test_pending_files_follow_the_policy():
    hits = builtin_raises(only_pending=True)
    assert not hits, "builtin raises in files being rewritten:\n" + _listing(hits)


# ----------------------------------------------------------------------------- the classes


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _all_subclasses(sub)
    return out


def _import_all() -> None:
    optional = ("dist_ema.integrations.lightning",)  # needs Lightning
    for mod in pkgutil.walk_packages([str(PACKAGE)], "dist_ema."):
        if mod.name in optional or mod.name.endswith("__main__"):
            continue
        importlib.import_module(mod.name)


def test_every_error_class_is_a_builtin_too_and_in_the_tree():
    _import_all()
    public = {c for c in _all_subclasses(DistEMAError) if c.__module__.startswith("dist_ema.")
              and not c.__name__.startswith("_")}
    assert {ConfigError, TargetError, LayoutError, OutputExistsError, CheckpointError, UsageError,
            StateDictError} <= public
    for cls in public:
        assert issubclass(cls, (ValueError, RuntimeError, TypeError, OSError, KeyError)), cls
        assert cls.__name__ in errors.__doc__, f"{cls.__name__} is missing from the tree in dist_ema/errors.py"
    from dist_ema import config

    assert config.ConfigError is ConfigError  # still importable where it used to be defined


@pytest.mark.parametrize("cls,builtin", [(ConfigError, ValueError), (TargetError, ValueError),
                                         (LayoutError, ValueError), (OutputExistsError, FileExistsError),
                                         (CheckpointError, FileNotFoundError), (UsageError, TypeError),
                                         (StateDictError, ValueError)])
def test_new_errors_pickle_and_keep_failures(cls, builtin):
    """Errors cross processes (the writer process, collective steps): type, message and failures survive."""
    e = cls("what went wrong", failures={1: "ValueError: x"})
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and isinstance(back, builtin) and str(back) == "what went wrong"
    assert back.failures == {1: "ValueError: x"}


def test_planning_errors_keep_their_type_on_other_ranks():
    """Rank 0's planning error is rebuilt on the other ranks from (type, message): the same class, or StoreError."""
    from dist_ema.store.format import ChecksumError
    from dist_ema.store.fs import StoreError
    from dist_ema.store.reader import UnknownParameterError
    from dist_ema.synthesis import _kind_of

    cases = [(ConfigError("a"), ConfigError), (TargetError("a"), TargetError), (LayoutError("a"), LayoutError),
             (OutputExistsError("a"), OutputExistsError), (ValueError("a"), ValueError),
             (FileExistsError("a"), FileExistsError), (ChecksumError("a"), StoreError),
             (PermissionError("a"), StoreError), (UnknownParameterError("w", "s", ["v"]), KeyError)]
    for err, want in cases:
        kind = _kind_of(err)
        assert kind is want, (err, kind)
        rebuilt = pickle.loads(pickle.dumps(kind))("text")  # what the other ranks raise
        assert type(rebuilt) is want and (isinstance(err, want) or want is StoreError)


# ----------------------------------------------------------------------------- bad inputs


def _both(exc_info, cls: type, builtin: type) -> None:
    e = exc_info.value
    assert type(e) is cls and isinstance(e, DistEMAError) and isinstance(e, builtin), type(e).__mro__


def test_phema_bad_inputs():
    with pytest.raises(ValueError, match=r"sigma_rel must be in \(0, 0.2887\)") as ei:
        phema.sigma_rel_to_gamma(0.5)
    _both(ei, ConfigError, ValueError)
    with pytest.raises(ValueError, match="must be finite") as ei:
        phema.validate_gamma(float("nan"))
    _both(ei, ConfigError, ValueError)
    with pytest.raises(ValueError, match="give either sigma_rels or gammas") as ei:
        phema.resolve_profiles(None, None)
    _both(ei, ConfigError, ValueError)
    with pytest.raises(ValueError, match="before the first snapshot") as ei:
        phema.solve_coefficients([10.0, 20.0], [6.94, 6.94], 5.0, 16.97)
    _both(ei, TargetError, ValueError)
    with pytest.raises(ValueError, match="listed 2 times") as ei:
        phema.solve_coefficients([10.0, 10.0], [6.94, 6.94], 10.0, 16.97)
    _both(ei, ConfigError, ValueError)


def test_retention_and_store_url():
    from dist_ema.store.fs import StoreIO
    from dist_ema.store.retention import validate_keep

    with pytest.raises(ValueError, match="keep must be None") as ei:
        validate_keep(1)
    _both(ei, ConfigError, ValueError)
    with pytest.raises(ValueError, match="store url must be a non-empty string") as ei:
        StoreIO("")
    _both(ei, ConfigError, ValueError)


def test_layout_with_a_gap_or_a_bad_name():
    from dist_ema.store.layout import Layout

    params = [("w", (4, 3), "float32")]
    Layout.build(params, [[("w", 0, 6)], [("w", 6, 6)]], "test")  # covers w exactly once
    with pytest.raises(ValueError, match=r"does not cover 'w' \(shape \(4, 3\)\)") as ei:
        Layout.build(params, [[("w", 0, 6)], [("w", 7, 5)]], "test")
    _both(ei, LayoutError, ValueError)
    with pytest.raises(ValueError, match="is not a valid name") as ei:
        Layout.build([("../w", (2,), "float32")], [[("../w", 0, 2)]], "test")
    _both(ei, LayoutError, ValueError)


def test_open_store_of_a_non_store(tmp_path):
    from dist_ema.store import open_store
    from dist_ema.store.fs import StoreError

    (tmp_path / "notes.txt").write_text("not a store")
    with pytest.raises(RuntimeError, match="not a dist-ema store") as ei:
        open_store(str(tmp_path))
    _both(ei, StoreError, RuntimeError)


def test_tracker_and_state_dict_errors():
    from dist_ema import PostHocEMA

    ema = PostHocEMA(torch.nn.Linear(3, 2), sigma_rels=(0.05, 0.10))
    with pytest.raises(ValueError, match="give exactly one of sigma_rel or gamma") as ei:
        ema.profile()
    _both(ei, ConfigError, ValueError)
    with pytest.raises(ValueError, match="needs a store") as ei:
        ema.snapshot()
    _both(ei, ConfigError, ValueError)
    other = PostHocEMA(torch.nn.Linear(3, 2), sigma_rels=(0.05, 0.20)).state_dict()
    with pytest.raises(ValueError, match="gammas") as ei:
        ema.load_state_dict(other)
    _both(ei, StateDictError, ValueError)


def test_model_parts_is_not_run():
    from dist_ema.sharding.parts import ModelParts

    with pytest.raises(TypeError, match="run the stages themselves") as ei:
        ModelParts([torch.nn.Linear(2, 2)])(torch.zeros(2))
    _both(ei, UsageError, TypeError)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Snapshots at t = 3, 6, 9 of a small model trained with SGD (written in this process)."""
    url = str(tmp_path_factory.mktemp("policy") / "s")
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with dist_ema.PostHocEMA(m, store=url, snapshot_every=3, writer="sync") as ema:
        for _ in range(9):
            m(torch.ones(2, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            ema.update()
    return url


@pytest.mark.parametrize("kwargs,cls,needle", [
    (dict(t=100.0), TargetError, "after the last snapshot"),
    (dict(t=1.0), TargetError, "before the first snapshot"),
    (dict(step=5), TargetError, "no committed snapshot at step 5"),
    (dict(t=6.0, step=6), ConfigError, "give t= or step=, not both"),
    (dict(format="npz"), ConfigError, "format must be"),
    (dict(dtype="int8"), ConfigError, "dtype must be"),
])
def test_synthesize_bad_target(store, tmp_path, kwargs, cls, needle):
    out = tmp_path / "o"
    with pytest.raises(ValueError, match=needle) as ei:
        dist_ema.synthesize(store, sigma_rels=[0.1], out=str(out), progress=False, **kwargs)
    _both(ei, cls, ValueError)
    assert not out.exists()


def test_synthesize_into_the_store_or_a_foreign_folder(store, tmp_path):
    with pytest.raises(ValueError, match="is inside the snapshot store") as ei:
        dist_ema.synthesize(store, sigma_rels=[0.1], out=f"{store}/x", progress=False)
    _both(ei, ConfigError, ValueError)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="was not written by a dist-ema synthesis") as ei:
        dist_ema.synthesize(store, sigma_rels=[0.1], out=str(foreign), progress=False)
    _both(ei, OutputExistsError, FileExistsError)
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]


def test_store_lookups(store):
    from dist_ema.store import open_store
    from dist_ema.store.reader import UnknownParameterError

    s = open_store(store)
    snap = s.snapshot()
    with pytest.raises(ValueError, match="no committed snapshot at step 4") as ei:
        s.snapshot(4)
    _both(ei, TargetError, ValueError)
    with pytest.raises(ValueError, match="has no profile") as ei:
        s.profile_index(snap, sigma_rel=0.2)
    _both(ei, TargetError, ValueError)
    with pytest.raises(KeyError, match="did you mean 'weight'") as ei:
        s.read(None, 0.1, "weigth")
    _both(ei, UnknownParameterError, KeyError)
    with pytest.raises(ValueError, match="bad range") as ei:
        s.read_stored(snap, 0, 0, 5, 2, np.empty(4, np.float32))
    _both(ei, ConfigError, ValueError)


def test_cli_reports_every_dist_ema_error_in_one_line(tmp_path, capsys):
    """`dist-ema ls` of a file: exit 2 and one line, no traceback (run in this process)."""
    from dist_ema.cli import main

    f = tmp_path / "x.json"
    f.write_text(json.dumps({}))
    assert main(["ls", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a dist-ema store" in err[0], err
