"""No import cycle between the modules of any package (read statically, lazy imports in functions included).

A cycle (``cli`` importing ``distill_run`` importing ``cli``, even through imports inside functions)
means two modules that cannot be understood or used one without the other. Imports under
``TYPE_CHECKING`` are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(ROOT.glob("packages/*/src/*"))


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, module: str, package: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    base = module.split(".") if package else module.split(".")[:-1]
    typing_only = {
        id(n)
        for top in ast.walk(tree)
        if isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test)
        for n in ast.walk(top)
    }
    for child in ast.walk(tree):
        if id(child) in typing_only:
            continue
        if isinstance(child, ast.Import):
            found.update(alias.name for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                anchor = base[: len(base) - child.level + 1]
                target = ".".join([*anchor, child.module] if child.module else anchor)
            else:
                target = child.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in child.names)
    return found


@pytest.mark.parametrize("src", SOURCES, ids=[p.name for p in SOURCES])
def test_no_import_cycles(src: Path) -> None:
    root = src.parent
    files = {_module_name(p, root): p for p in src.rglob("*.py")}
    graph = {
        name: {t for t in _imports(path, name, path.name == "__init__.py") if t in files and t != name}
        for name, path in files.items()
    }
    for name, targets in graph.items():  # a package's __init__ may import its own submodules
        if files[name].name != "__init__.py":
            graph[name] = {t for t in targets if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
