"""The dotted-path engine behind ``--set`` and sweep spaces, and the one-line messages for config
errors. It knows nothing of ftdist's schema: callers pass the known dotted paths, so the run config,
the sweep spec and pipeline files share one implementation and one wording."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ftdist.errors import UserError


def known_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted path a pydantic model accepts, sections included (``train``, ``train.epochs``)."""
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        ann = field.annotation
        for cand in getattr(ann, "__args__", ()) or (ann,):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                out.extend(known_paths(cand, path + "."))
    return out


def did_you_mean(path: str, candidates: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate (or one with the same last segment), else ''."""
    leaf_matches = [c for c in candidates if c.split(".")[-1] == path.split(".")[-1] and c != path]
    close = difflib.get_close_matches(path, candidates, n=1, cutoff=0.6) or leaf_matches[:1]
    return f"; did you mean '{close[0]}'?" if close else ""


def parse_override(item: str) -> tuple[str, Any]:
    """``dotted.key=value`` -> (key, YAML-parsed value); a value YAML cannot parse stays a string."""
    if "=" not in item:
        raise UserError(f"--set '{item}' must look like dotted.key=value, e.g. --set train.learning_rate=3e-5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
        raise UserError(f"--set key '{key}' is not a dotted path like train.learning_rate")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(d: dict[str, Any], key: str, value: Any, candidates: list[str] | None = None) -> None:
    """Set ``key`` in nested mappings, creating sections; digits index list items (``tasks.1.loss_weight``)."""
    parts = key.split(".")
    cur: Any = d  # a section (dict) or, for tasks.N.key, a list
    for p in parts[:-1]:
        if isinstance(cur, list):  # a list item's field, e.g. tasks.1.loss_weight
            if not p.isdigit() or int(p) >= len(cur):
                raise UserError(f"--set {key}: '{p}' is not an item of that list (it has {len(cur)}: 0..{len(cur) - 1})")
            cur = cur[int(p)]
            continue
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict | list):
            hint = did_you_mean(key, candidates or []).lstrip("; ")
            raise UserError(f"--set {key}: '{p}' is not a section; {hint or 'check the key'}")
        cur = nxt
    last = parts[-1]
    if isinstance(cur, list):  # tasks.1 = {...}: an existing item replaced; any other key is not an item
        if not last.isdigit() or int(last) >= len(cur):
            raise UserError(f"--set {key}: '{last}' is not an item of that list (it has {len(cur)}"
                            f"{': 0..' + str(len(cur) - 1) if cur else ' items'})")
        cur[int(last)] = value
        return
    cur[last] = value


def apply_overrides(raw: dict[str, Any], items: list[str], accepts: Callable[[str], bool], candidates: list[str],
                    what: str = "--set") -> dict[str, Any]:
    """Apply ``key=value`` items to ``raw`` in order; a key ``accepts`` refuses is one line naming it."""
    for item in items:
        key, value = parse_override(item)
        if not accepts(key):
            raise UserError(f"{what}: unknown key '{key}'{did_you_mean(key, candidates)}")
        set_dotted(raw, key, value, candidates)
    return raw


def read_yaml(path: str | os.PathLike[str], what: str = "config") -> dict[str, Any]:
    """A YAML mapping from a file; a missing, unreadable or malformed file is one line naming it."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} file '{path}' not found; check the path")
    if p.is_dir():
        raise UserError(f"{what} file '{path}' is a directory; pass the YAML file inside it")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} file '{path}' is not readable ({e.__class__.__name__}); check its permissions/encoding")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{what} file '{path}'{where} is not valid YAML: {getattr(e, 'problem', e)}")
    if not isinstance(data, dict):
        raise UserError(f"{what} file '{path}' must hold a mapping of sections (model:, data:, ...)")
    return data


def validation_message(err: ValidationError, source: str, candidates: list[str]) -> str:
    """One line for the first schema violation, naming the dotted key and the fix."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key '{loc}'{did_you_mean(loc, candidates)}"
    if e["type"] == "missing":
        return f"{source}: required key '{loc}' is missing; add it (see README config reference)"
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    got_s = "" if isinstance(got, dict) or e["type"].startswith("value_error") else f" (got {got!r})"
    return f"{source}: '{loc}': {msg}{got_s}" if loc else f"{source}: {msg}"
