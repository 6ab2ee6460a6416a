"""The README's "How it works" table is the map of the package (issue 12): every module of
``ftdist`` is on it and every path on it exists, so the map cannot drift from the tree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Package plumbing with nothing to find: the package docstring and ``python -m ftdist``.
UNLISTED = {"ftdist/__init__.py", "ftdist/__main__.py"}


def how_it_works_paths() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## How it works", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(ftdist/[\w/]+\.py)`", section))


def test_every_module_is_on_the_readme_map_and_every_listed_path_exists():
    listed = how_it_works_paths()
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ftdist").rglob("*.py")}
    modules = {m for m in modules if not m.endswith("/__init__.py") or m.count("/") == 1} - UNLISTED
    assert not modules - listed, f"modules missing from the README's 'How it works' table: {sorted(modules - listed)}"
    assert not listed - modules, f"paths in the README's 'How it works' table that do not exist: {sorted(listed - modules)}"
