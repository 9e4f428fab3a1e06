"""The package layout's import rules (docs/architecture.md), read from the source with `ast`:
the stages meet only at storage/, samples/ is a tool the stages never import, and no two modules
import each other, directly or through others, not even with an import deferred into a function
(imports under `if TYPE_CHECKING:` are type hints only and do not count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "clip2scene"


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


class _DropTypeChecking(ast.NodeTransformer):
    def visit_If(self, node: ast.If):
        return None if "TYPE_CHECKING" in ast.unparse(node.test) else self.generic_visit(node)


def _imports(path: Path) -> set[str]:
    """clip2scene modules and names imported anywhere in `path` (function bodies included),
    except under `if TYPE_CHECKING:`."""
    tree = _DropTypeChecking().visit(ast.parse(path.read_text()))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # `from pkg import submodule` imports the submodule, not pkg's names
                sub = f"{node.module}.{a.name}"
                out.add(sub if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (PKG.parent / sub.replace(".", "/") / "__init__.py").exists() else node.module)
    return {m for m in out if m.split(".")[0] == "clip2scene"}


MODULES = {_module(p): p for p in PKG.rglob("*.py")}


def _resolve(names: set[str]) -> set[str]:
    return {n for n in names if n in MODULES}


@pytest.mark.parametrize("package, forbidden", [
    ("clip2scene.storage", ("clip2scene.precompute", "clip2scene.train", "clip2scene.samples", "clip2scene.viz")),
    ("clip2scene.precompute", ("clip2scene.train", "clip2scene.samples", "clip2scene.viz")),
    ("clip2scene.train", ("clip2scene.precompute", "clip2scene.samples", "clip2scene.viz")),
    ("clip2scene.samples", ("clip2scene.train", "clip2scene.viz", "clip2scene.storage")),
    ("clip2scene.classes", ("clip2scene.precompute", "clip2scene.train", "clip2scene.samples", "clip2scene.storage")),
    ("clip2scene.viz.colors", ("clip2scene.precompute", "clip2scene.samples", "clip2scene.train")),
])
def test_import_rules(package, forbidden):
    bad = []
    for name, path in MODULES.items():
        if name == package or name.startswith(package + "."):
            for imp in _imports(path):
                if imp.startswith(forbidden):
                    bad.append(f"{name} imports {imp}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {name: _resolve(_imports(path)) - {name} for name, path in MODULES.items()}
    seen, on_stack, cycles = set(), [], []

    def visit(node):
        if node in on_stack:
            cycle = on_stack[on_stack.index(node):] + [node]
            cycles.append(" -> ".join(cycle))
            return
        if node in seen:
            return
        seen.add(node)
        on_stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        on_stack.pop()

    for node in sorted(graph):
        visit(node)
    assert not cycles, "\n".join(cycles)

