"""The library's import graph, read from its source: no cycles, and no layer imports a higher one.

Every ``import`` and ``from ... import`` of ``semiseg`` in ``platform/semiseg/**/*.py`` is an
edge, wherever it is written (module level, inside a function, under ``TYPE_CHECKING``);
relative imports are resolved; importing a package (``import semiseg.methods``,
``from semiseg import methods``) is importing its ``__init__.py``, and ``from package import
name`` is importing the submodule ``name`` when there is one, else the package. Importing
``a.b.c`` is not counted as importing ``a.b``'s ``__init__`` (Python runs it, but an
``__init__`` that re-exports its submodules would otherwise be a cycle with each of them).
Imports by a computed name (``importlib.import_module``: the registries discovering their
members) are not edges.

The layers, lowest first; a module may import its own layer or a lower one, never a higher one:

===== ===================================================== ==========================================
layer modules                                               why there
===== ===================================================== ==========================================
0     ``semiseg`` (the package root), ``config``            every layer reads the configuration; it
                                                            imports nothing of semiseg (the issue's
                                                            bottom layer ``components / config``,
                                                            split so that config stays the root)
1     ``components``, ``augment``, ``losses``, ``metrics``, the building blocks of methods; tracking
      ``schedules``, ``tracking``, ``report``               imports only config and report only
                                                            tracking, so they sit here too: none of
                                                            them may reach methods, train or tune
2     ``methods``, ``models``, ``data``                     what a trial is made of
3     ``train``                                             one trial
4     ``tune``, ``inference``                               a study of trials; segmentations and scores
                                                            of new scans from a study's models
5     the study scripts (``studies/*.py``, outside the      nothing in the library imports them
      library)
===== ===================================================== ==========================================

A module not in the table fails the test: a new top-level module is placed deliberately.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "platform" / "semiseg"

LAYERS: dict[str, int] = {
    "semiseg": 0, "semiseg.config": 0,
    "semiseg.components": 1, "semiseg.augment": 1, "semiseg.losses": 1, "semiseg.metrics": 1,
    "semiseg.schedules": 1, "semiseg.tracking": 1, "semiseg.report": 1,
    "semiseg.postprocess": 1,
    "semiseg.methods": 2, "semiseg.models": 2, "semiseg.data": 2,
    "semiseg.train": 3,
    "semiseg.tune": 4, "semiseg.inference": 4,
}
"""Module or package → layer (a package's entry covers everything under it; the longest prefix wins)."""


@dataclass(frozen=True)
class Edge:
    """``importer`` imports ``imported`` at ``path:line``."""

    importer: str
    imported: str
    path: str
    line: int


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name → file of every module of the package at ``root`` (``pkg/__init__.py`` is ``pkg``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _known(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module (``a.b.func`` → ``a.b``), or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_edges(root: Path) -> list[Edge]:
    """Every import of the package at ``root`` by one of its own modules."""
    modules = module_names(root)
    package = root.name
    edges = []
    for importer, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = importer.split(".") if is_package else importer.split(".")[:-1]
                    base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                if target != package and not target.startswith(f"{package}."):
                    continue
                imported = _known(target, modules)
                if imported is not None and imported != importer:
                    edges.append(Edge(importer, imported, str(path.relative_to(root.parent)), node.lineno))
    return sorted(edges, key=lambda edge: (edge.path, edge.line))


def _graph(edges: Iterable[Edge]) -> dict[str, dict[str, Edge]]:
    graph: dict[str, dict[str, Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, {}).setdefault(edge.imported, edge)
        graph.setdefault(edge.imported, {})
    return graph


def _strongly_connected(graph: Mapping[str, Mapping[str, Edge]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
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
                    components.append(sorted(component))
    return components


def _shortest_cycle(graph: Mapping[str, Mapping[str, Edge]], start: str, members: set[str]) -> list[str]:
    """The shortest chain ``start → … → start`` inside one strongly connected component."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node]):
                if successor not in members:
                    continue
                if successor == start:
                    chain = [node]
                    while chain[-1] != start:
                        chain.append(parents[chain[-1]])
                    return [start, *reversed(chain[:-1]), start] if node != start else [start, start]
                if successor not in parents:
                    parents[successor] = node
                    following.append(successor)
        frontier = following
    raise AssertionError(f"{start} is in no cycle")


def find_cycles(edges: Iterable[Edge]) -> list[str]:
    """One line per import cycle (per strongly connected component of the graph): its shortest
    cycle as a chain with the file and line of each import, then the component's other members."""
    graph = _graph(edges)
    cycles = []
    for component in _strongly_connected(graph):
        if len(component) < 2:
            continue
        chain = min((_shortest_cycle(graph, member, set(component)) for member in component), key=len)
        links = " -> ".join(f"{a} ({graph[a][b].path}:{graph[a][b].line})" for a, b in zip(chain, chain[1:]))
        others = sorted(set(component) - set(chain))
        cycles.append(f"import cycle: {links} -> {chain[-1]}"
                      + (f"; also in this cycle: {', '.join(others)}" if others else ""))
    return cycles


def layer_of(module: str, layers: Mapping[str, int]) -> int | None:
    """The layer of ``module``: its own entry or its nearest package's; None when it has none."""
    known = _known(module, layers)
    return None if known is None else layers[known]


def find_layer_violations(edges: Iterable[Edge], layers: Mapping[str, int]) -> list[str]:
    """One line per import of a higher layer, and per module that has no layer."""
    problems = []
    for edge in edges:
        for module in (edge.importer, edge.imported):
            if layer_of(module, layers) is None:
                problems.append(f"{module} has no layer: add it to the layer table")
        low, high = layer_of(edge.importer, layers), layer_of(edge.imported, layers)
        if low is not None and high is not None and high > low:
            problems.append(f"{edge.path}:{edge.line}: {edge.importer} (layer {low}) imports {edge.imported} "
                            f"(layer {high}): a layer never imports a higher one")
    return sorted(set(problems))


@functools.lru_cache(maxsize=1)
def _library_edges() -> tuple[Edge, ...]:
    return tuple(import_edges(LIBRARY))


def test_the_library_has_no_import_cycle():
    cycles = find_cycles(_library_edges())
    assert not cycles, "\n" + "\n".join(cycles)


def test_no_module_imports_a_higher_layer():
    modules = module_names(LIBRARY)
    unplaced = [name for name in modules if layer_of(name, LAYERS) is None]
    assert not unplaced, f"modules without a layer (add them to LAYERS): {unplaced}"
    problems = find_layer_violations(_library_edges(), LAYERS)
    assert not problems, "\n" + "\n".join(problems)


def test_config_imports_nothing_of_the_library():
    assert [e for e in _library_edges() if e.importer == "semiseg.config"] == []


def test_the_graph_sees_every_kind_of_import():
    """The graph is only as good as its reading of the source: spot-check edges of each kind."""
    edges = {(e.importer, e.imported) for e in _library_edges()}
    assert ("semiseg.train.loop", "semiseg.train.contract") in edges  # from ... import at module level
    assert ("semiseg.tracking", "semiseg.config") in edges  # inside a function
    assert ("semiseg.report.build", "semiseg.report.figures") in edges  # from package import submodule


def _write(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_checker_reports_a_planted_cycle_and_an_upward_import(tmp_path):
    package = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "from pkg.low.a import helper\n",
        "pkg/low/a.py": ("from typing import TYPE_CHECKING\n"
                         "if TYPE_CHECKING:\n"
                         "    from pkg.low import d\n"
                         "def helper():\n"
                         "    import pkg.high.c\n"),
        "pkg/low/b.py": "from . import a\nimport os\n",
        "pkg/low/d.py": "",
        "pkg/high/__init__.py": "",
        "pkg/high/c.py": "from ..low.b import thing\nfrom pkg import high\n",
    })
    edges = import_edges(package)
    pairs = {(e.importer, e.imported) for e in edges}
    assert pairs == {("pkg.low", "pkg.low.a"), ("pkg.low.a", "pkg.low.d"), ("pkg.low.a", "pkg.high.c"),
                     ("pkg.low.b", "pkg.low.a"), ("pkg.high.c", "pkg.low.b"), ("pkg.high.c", "pkg.high")}
    cycles = find_cycles(edges)
    assert cycles == ["import cycle: pkg.high.c (pkg/high/c.py:1) -> pkg.low.b (pkg/low/b.py:1) -> "
                      "pkg.low.a (pkg/low/a.py:5) -> pkg.high.c"]
    edges.append(Edge("pkg.low.d", "pkg.low.a", "pkg/low/d.py", 1))
    assert find_cycles(edges) == ["import cycle: pkg.low.a (pkg/low/a.py:3) -> pkg.low.d (pkg/low/d.py:1) -> "
                                  "pkg.low.a; also in this cycle: pkg.high.c, pkg.low.b"]
    problems = find_layer_violations(edges, {"pkg": 0, "pkg.low": 0, "pkg.high": 1})
    assert problems == ["pkg/low/a.py:5: pkg.low.a (layer 0) imports pkg.high.c (layer 1): "
                        "a layer never imports a higher one"]
    assert "pkg.other has no layer: add it to the layer table" in find_layer_violations(
        [Edge("pkg.other", "pkg.low.a", "pkg/other.py", 1)], {"pkg.low": 0})
