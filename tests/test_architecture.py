"""The package's layering, read from the source with ``ast`` (nothing is imported, so a cycle cannot hide
behind whichever module happened to load first).

* No import cycle anywhere in ``factorizer_cli``. Imports inside functions count: they run on first
  call, and a cycle through one is a cycle waiting for the right call order. Imports under
  ``if TYPE_CHECKING:`` never run and do not count. Importing ``a.b.c`` runs ``a/__init__`` and
  ``a/b/__init__`` first, so those packages are edges too, except the importer's own parent packages
  (already running when the importer runs; counting them would make every package ``__init__`` that
  imports its own submodules a cycle).
* ``factorizer_cli/cli/`` parses, calls the API and renders: it imports no torch, numpy, nibabel or
  SimpleITK itself, so ``factorizer --help`` and a bad option stay instant and the API stays the one
  place that computes.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "factorizer_cli"
HEAVY = ("torch", "numpy", "nibabel", "SimpleITK")

Graph = Mapping[str, Mapping[str, int]]  # importer -> {imported module: first line}


# ----------------------------------------------------------------------------------- finding cycles


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    found.append(sorted(component))
            elif target not in index:
                index[target] = low[target] = len(index)
                stack.append(target)
                on_stack.add(target)
                work.append((target, iter(sorted(graph.get(target, ())))))
            elif target in on_stack:
                low[node] = min(low[node], index[target])
    return found


def shortest_cycle(graph: Mapping[str, Iterable[str]], start: str) -> list[str] | None:
    """The shortest path ``start -> ... -> start`` (breadth first), or None."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for target in sorted(graph.get(node, ())):
            if target == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(parent[chain[-1]])
                return [start, *reversed(chain[:-1]), start]
            if target not in parent:
                parent[target] = node
                queue.append(target)
    return None


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Every import cycle, as chains ``[a, b, ..., a]``: for each strongly connected component, the
    shortest cycle through each of its members (each cycle once), so every module caught in a cycle
    shows up in at least one readable chain."""
    cycles: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for component in strongly_connected(graph):
        if len(component) == 1 and component[0] not in graph.get(component[0], ()):
            continue  # a lone module that does not import itself
        for member in component:
            chain = shortest_cycle(graph, member)
            ring = chain[:-1]
            turn = ring.index(min(ring))
            key = tuple(ring[turn:] + ring[:turn])  # the same cycle, whichever member it starts from
            if key not in seen:
                seen.add(key)
                cycles.append([*key, key[0]])
    return cycles


def test_find_cycles_on_a_synthetic_graph():
    graph = {
        "a": ["b"], "b": ["c", "d"], "c": ["a", "b"], "d": [],  # a -> b -> c -> a, and b <-> c
        "e": ["f"], "f": ["e"],
        "g": ["g"],
        "h": ["a", "e"],  # reaches cycles without being in one
    }
    assert strongly_connected({"x": ["y"], "y": []}) == [["y"], ["x"]]
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["b", "c", "b"], ["e", "f", "e"], ["g", "g"]]
    assert find_cycles({"a": ["b"], "b": ["c"], "c": [], "d": ["a", "c"]}) == []


# --------------------------------------------------------------------------------- reading imports


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """``root/zoo/card.py`` → ``factorizer_cli.zoo.card``; a package's ``__init__.py`` → the package."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(nodes: list[ast.stmt]) -> Iterator[ast.AST]:
    """Every node under ``nodes``, at any depth (functions and classes too), except the bodies of
    ``if TYPE_CHECKING:``."""
    todo: list[ast.AST] = list(nodes)
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def imports(path: Path, root: Path = PACKAGE) -> Iterator[tuple[str, int]]:
    """``(absolute module name, line)`` for each name an import statement in ``path`` may load: the
    module of ``import a.b`` and ``from a.b import ...``, and ``a.b.x`` for each ``from a.b import x``
    (kept by the caller only where ``x`` is a submodule)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _statements(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            yield base, node.lineno
            for alias in node.names:
                if alias.name != "*":
                    yield f"{base}.{alias.name}", node.lineno


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """importer → {module of the package it runs: first line}, for every module under ``root``."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for importer, path in files.items():
        edges = graph.setdefault(importer, {})
        own = set(_ancestors(importer)) | {importer}
        for imported, line in imports(path, root):
            for target in [*_ancestors(imported), imported]:
                if target in files and target not in own:
                    edges[target] = min(line, edges.get(target, line))
    return graph


def test_import_reading_on_a_synthetic_package(tmp_path):
    root = tmp_path / "pkg"
    for name, text in {
        "__init__.py": "from . import a\n",
        "a.py": "from .sub import leaf\nfrom .sub.leaf import VALUE\n",
        "b.py": "import os\ndef late():\n    from . import a\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import late\nelse:\n"
                "    import pkg.sub\n",
        "sub/__init__.py": "from ..b import late\n",
        "sub/leaf.py": "VALUE = 1\n",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = import_graph(root)
    assert graph == {
        "pkg": {"pkg.a": 1},
        "pkg.a": {"pkg.sub": 1, "pkg.sub.leaf": 1},  # the package pkg.sub runs before its leaf
        "pkg.b": {"pkg.a": 3},  # a function-level import counts
        "pkg.c": {"pkg.sub": 5},  # the TYPE_CHECKING import does not
        "pkg.sub": {"pkg.b": 1},
        "pkg.sub.leaf": {},
    }
    assert find_cycles(graph) == [["pkg.a", "pkg.sub", "pkg.b", "pkg.a"]]


# ------------------------------------------------------------------------------------ the package


def _chain(graph: Graph, cycle: list[str]) -> str:
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join([*steps, cycle[-1]])


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 20, "the package was not found"
    cycles = find_cycles(graph)
    if cycles:
        pytest.fail(f"{len(cycles)} import cycles in factorizer_cli (line = where the first module imports "
                    "the next):\n" + "\n".join(_chain(graph, c) for c in cycles), pytrace=False)


def test_the_cli_imports_no_array_or_imaging_library():
    found = sorted({(str(path.relative_to(PACKAGE.parent)), line, imported.split(".")[0])
                    for path in (PACKAGE / "cli").rglob("*.py") for imported, line in imports(path)
                    if imported.split(".")[0] in HEAVY})
    if found:
        pytest.fail("factorizer_cli/cli/ imports what belongs in the API:\n"
                    + "\n".join(f"{file}:{line}: {name}" for file, line, name in found), pytrace=False)
