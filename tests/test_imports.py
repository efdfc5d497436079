"""The package's modules depend on each other without a cycle.

Every ``import`` of a package module counts, at the top of a file or inside a function alike: ``from .x import
name``, ``from . import x``, ``from ..pkg import name``, ``import lestd_export.x`` and ``from lestd_export.x
import name``. A name imported from a package is its submodule where one of that name exists, else the
package's ``__init__``. The implicit import of a module's parent packages is not an edge.
"""

import ast
from pathlib import Path

import lestd_export

PACKAGE = "lestd_export"
ROOT = Path(lestd_export.__file__).resolve().parent


def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__.py``)."""
    modules = {}
    for file in sorted(ROOT.rglob("*.py")):
        parts = file.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((PACKAGE, *parts))] = file
    return modules


def imported_modules(name: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that module ``name`` (in ``file``) imports anywhere in its code."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    targets = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            targets += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    found = set()
    for target in targets:
        while target not in modules and "." in target:  # a name inside a module: that module
            target = target.rpartition(".")[0]
        if target in modules and target != name:
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, file, modules) for name, file in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return path[path.index(child):] + [child]
            if child not in state:
                cycle = visit(child)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "lestd_export.catalogue" in graph["lestd_export.loading"]  # from . import catalogue
    assert "lestd_export.healing" in graph["lestd_export.compress"]  # inside a function
    assert "lestd_export.numerics.planner" in graph["lestd_export.compress"]  # from .numerics.planner import
    assert "lestd_export.commands.common" in graph["lestd_export.commands.compress"]  # from .common import
    assert "lestd_export.compress" in graph["lestd_export.commands.compress"]  # from ..compress import
    assert "lestd_export.numerics.pruning" in graph["lestd_export.numerics.planner"]  # from .pruning import (...)
    assert "lestd_export" in graph["lestd_export.cli"]  # from . import __version__: the package itself


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
