"""Package structure rules (issue 12), checked on the source: no import cycles among ftdist's
modules (module-level and function-level imports alike), and no private name imported across
modules inside the package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ftdist"


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    mods = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            graph[m] |= {t for t in targets if t in mods and t != m and t != "ftdist"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_no_import_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # the check itself works
    assert not cycles(import_graph()), cycles(import_graph())


def test_no_private_names_imported_across_modules():
    offenders = []
    for p in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ftdist"):
                offenders += [f"{p.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_")]
    assert not offenders, offenders


def test_only_the_cli_imports_the_sweep_driver():
    """The sweep driver sits on top of the sweep package: if a lower module needed it, the package's
    layers (spec/space/layout -> trial -> driver -> CLI) would be tangled again."""
    importers = sorted(m for m, deps in import_graph().items() if "ftdist.sweep.driver" in deps)
    assert importers == ["ftdist.cli"], importers
