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


def _defined_names(path: Path) -> set[str]:
    """Top-level names a module defines itself (functions, classes, assignments), not ones it imports."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_every_name_is_imported_from_its_home_module():
    """One home per concept: ``from ftdist.a import x`` only where ``a`` defines ``x``. An import that
    works because ``a`` itself imported ``x`` hides where ``x`` lives and ties ``a``'s imports to
    other modules' (e.g. ``join_uri`` belongs to ftdist.uri, not to ftdist.config which uses it)."""
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    submodules = {m.rsplit(".", 1)[-1] for m in files}
    offenders = []
    for p in [*ROOT.rglob("*.py"), *(ROOT.parent / "tests").glob("*.py"), *(ROOT.parent / "bench").glob("*.py")]:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in files:
                home = _defined_names(files[node.module])
                offenders += [f"{p.relative_to(ROOT.parent)}: {node.module}.{a.name}" for a in node.names
                              if a.name not in home and a.name not in submodules]
    assert not offenders, offenders


def test_the_benchmark_builds_ftdist_through_the_loops_setup():
    """bench/throughput.py measures ftdist's step; if it loaded the model or built the engine itself,
    a change to the loop's setup (a new lever, an order of calls) would silently not be measured."""
    source = (ROOT.parent / "bench" / "throughput.py").read_text()
    called = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
              for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)}
    assert not called & {"load_model", "build_engine"}, called & {"load_model", "build_engine"}
    assert {"setup", "setup_model"} <= called


def test_every_module_states_its_job_in_a_docstring():
    missing = [str(p.relative_to(ROOT)) for p in sorted(ROOT.rglob("*.py")) if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing
