"""The package's modules import one another without a circle, and none is over 600 lines
outside the generated ``*_pb2`` modules (docs/architecture.md). Measured from the source
with ``ast``: every ``import`` and ``from ... import`` inside ``pipeline`` (at module level
or inside a function, where a circle would otherwise hide), resolved to the module it
names. The tests are held to the line limit but left out of the circle search."""

from __future__ import annotations

import ast
from pathlib import Path

import pipeline

ROOT = Path(pipeline.__file__).parent
PACKAGE = "pipeline"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in ROOT.rglob("*.py")}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The server module ``name`` denotes (a module, or a name inside one)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            resolved = _resolve(target, known)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {module: _imports(module, path, known) for module, path in known.items()
            if not module.startswith(f"{PACKAGE}.tests")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path of module names, or None (depth-first, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_finder_sees_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_holds_the_rooms() -> None:
    graph = import_graph()
    assert "pipeline.server.ingest.handler" in graph["pipeline.server.ingest.listener"]
    assert "pipeline.server.security.gate" in graph["pipeline.server.ingest.handler"]


def test_no_import_circle_in_the_package() -> None:
    assert find_cycle(import_graph()) is None


def test_no_module_over_600_lines() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()
             if not name.endswith("_pb2")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
