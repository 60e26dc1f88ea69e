"""The modules around the tracker do not import it: no import cycle between the tracker and its helpers.

Read from the sources (ast), so the check sees imports inside functions and ``TYPE_CHECKING``
blocks too, and runs no process.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "dist_ema"


def _imports(path: Path, module_level_only: bool = False) -> set[str]:
    """The ``dist_ema`` modules a source file imports (``from dist_ema import x`` counts as ``dist_ema.x``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names if a.name.startswith("dist_ema"))
        elif isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("dist_ema"):
            out.add(n.module)
            out.update(f"{n.module}.{a.name}" for a in n.names)
    return out


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_the_tracker_helpers_do_not_import_the_tracker():
    """swap, checkpoint, step_counter, kernels and load take pieces and values, never the tracker."""
    for name in ("swap.py", "checkpoint.py", "step_counter.py", "kernels.py", "load.py"):
        imported = _imports(ROOT / name)
        assert "dist_ema.tracker" not in imported, (name, sorted(imported))


def test_no_module_level_import_cycle_through_the_tracker():
    """Following module-level imports from dist_ema.tracker never leads back to it."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {m: {x for x in _imports(p, module_level_only=True) if x in modules and x != m}
             for m, p in modules.items()}
    seen: set[str] = set()
    todo = list(graph["dist_ema.tracker"])
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(graph[m])
    assert "dist_ema.tracker" not in seen, sorted(seen)


def test_the_check_sees_an_import(tmp_path):
    """The reader finds imports at module level, in functions and under TYPE_CHECKING."""
    src = tmp_path / "x.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dist_ema.tracker import P\n"
                   "def f():\n    from dist_ema import swap\nimport dist_ema.kernels\n")
    assert {"dist_ema.tracker", "dist_ema.swap", "dist_ema.kernels"} <= _imports(src)
    assert _imports(src, module_level_only=True) == {"dist_ema.kernels"}
