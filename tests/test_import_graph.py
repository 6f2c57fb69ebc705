"""No import cycle among lora_doctor's modules (issue 11).

The graph is built from the source with ``ast``, not by importing: every ``import`` and
``from ... import`` anywhere in a module counts, at module level, inside a function, under
``TYPE_CHECKING`` or in a ``try``. A lazy import hides a cycle from the interpreter, not from the
design: the two modules still cannot be understood, tested or moved one without the other.

Edges: ``import a.b.c`` and ``from a.b import c`` (``c`` a module) point at ``a.b.c``;
``from a.b import name`` (``name`` not a module) points at ``a.b``, i.e. its ``__init__`` when
``a.b`` is a package. A parent package's ``__init__``, which Python runs first, is not an edge of
its own: else every ``__init__`` that re-exports its submodules would close a cycle with them.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lora_doctor"

Graph = Mapping[str, frozenset[str]]


def module_names(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` under ``root``, by dotted name (a package by its own name)."""
    names: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> Iterator[str]:
    """The modules of ``known`` that ``tree`` (the source of ``module``) imports, anywhere."""

    def deepest(dotted: str) -> str | None:
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in known:
                return ".".join(parts[:end])
        return None

    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = deepest(alias.name)
                if target is not None:
                    yield target
        elif isinstance(node, ast.ImportFrom):
            base_parts = here[: len(here) - node.level + 1] if node.level else []
            base = ".".join(base_parts + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                target = submodule if submodule in known else deepest(base)
                if target is not None:
                    yield target


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, frozenset[str]]:
    """Module -> the package modules it imports (itself excluded)."""
    names = module_names(root, package)
    known = set(names)
    graph: dict[str, frozenset[str]] = {}
    for name, path in names.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = frozenset(imported(tree, name, is_package, known)) - {name}
    return graph


def strongly_connected(graph: Graph) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def shortest_cycle(graph: Graph, start: str, inside: set[str]) -> list[str]:
    """A shortest cycle from ``start`` back to itself through the modules of ``inside``."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph[node] & inside):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{start} is on no cycle inside {sorted(inside)}")


def cycles(graph: Graph) -> list[str]:
    """The import cycles, one line each (``a -> b -> a``): for every module on a cycle, a shortest
    cycle through it, each cycle once, written from its first module in sorted order."""
    found: set[tuple[str, ...]] = set()
    for component in strongly_connected(graph):
        for module in component:
            loop = shortest_cycle(graph, module, set(component))[:-1]
            first = loop.index(min(loop))
            found.add(tuple(loop[first:] + loop[:first]))
    return [" -> ".join([*loop, loop[0]]) for loop in sorted(found)]


def without(graph: Graph, edges: frozenset[tuple[str, str]]) -> dict[str, frozenset[str]]:
    return {
        node: frozenset(t for t in targets if (node, t) not in edges)
        for node, targets in graph.items()
    }


# --- the graph builder, on a package written in the test --------------------------------------------
FIXTURE = {
    "pkg/__init__.py": "from pkg.a import A\n",
    "pkg/a.py": "A = 1\nimport pkg.sub.c as c\n",
    "pkg/b.py": "def late():\n    from . import a\n",
    "pkg/sub/__init__.py": "",
    "pkg/sub/c.py": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..b import late\n"
    ),
    "pkg/sub/d.py": "from pkg import A\nfrom pkg.sub import c\nimport os.path\n",
}


@pytest.fixture
def fixture_graph(tmp_path: Path) -> dict[str, frozenset[str]]:
    for rel, text in FIXTURE.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return import_graph(tmp_path, "pkg")


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("pkg", {"pkg.a"}),
        ("pkg.a", {"pkg.sub.c"}),
        ("pkg.b", {"pkg.a"}),
        ("pkg.sub", set()),
        ("pkg.sub.c", {"pkg.b"}),
        ("pkg.sub.d", {"pkg", "pkg.sub.c"}),
    ],
    ids=[
        "package-init-reexport",
        "import-dotted-as",
        "function-level-relative-from-dot",
        "empty-init",
        "type-checking-relative-parent",
        "name-from-package-and-module-from-package",
    ],
)
def test_graph_builder_reads_every_import_form(
    fixture_graph: dict[str, frozenset[str]], module: str, expected: set[str]
) -> None:
    assert fixture_graph[module] == expected


def test_cycle_finder_names_the_cycle(fixture_graph: dict[str, frozenset[str]]) -> None:
    """a -> sub.c (module level) -> b (TYPE_CHECKING) -> a (function level): one cycle, found."""
    assert cycles(fixture_graph) == ["pkg.a -> pkg.sub.c -> pkg.b -> pkg.a"]
    assert cycles(without(fixture_graph, frozenset({("pkg.b", "pkg.a")}))) == []


# --- lora_doctor itself ---------------------------------------------------------------------------
def test_graph_covers_every_module() -> None:
    graph = import_graph()
    assert set(graph) == set(module_names())
    assert "lora_doctor.engine" in graph["lora_doctor.integrations.hf"]


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles among lora_doctor's modules:\n" + "\n".join(found)
