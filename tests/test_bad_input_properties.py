"""Bad input, generated: malformed configs, ``--set`` values, raw JSONL/CSV/Parquet files and data-set
manifests thrown at the real CLI entry point (`ftdist.cli.main`, in-process).

The property, for every generated case: either the input is actually valid (the command succeeds,
or for `train` gets as far as starting Ray) and the case is counted as valid, or the command exits 2
with exactly one ``ftdist: error: ...`` line on stderr, no traceback, and nothing written (no output
data set, no run folder, existing files byte-for-byte unchanged). No exception may escape except
argparse's ``SystemExit(2)``. tests/test_bad_input.py is the hand-written catalogue; this file finds
the cases nobody thought of. Derandomized, so CI sees the same cases every run; the case counts are
printed at the end of the module (``-s``) and must add up to at least 500.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import shutil
import string
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import base_config
from ftdist.cli import main

MIN_CASES = 500
COUNTS: dict[str, dict[str, int]] = {}
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])

# Text a user can actually type or a file can actually hold: no lone surrogates (not encodable).
# Command-line arguments cannot hold NUL either (exec refuses it); files can.
TEXT = st.characters(exclude_categories=("Cs",))
ARG_TEXT = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
SCALARS = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.integers(-3, 12)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.5, 1.0, 2.0, -1.0, 1e30])
           | st.text(TEXT, max_size=12) | st.sampled_from(["", "0", "1", "true", "null", "NaN", "~", "[", "a,b"]))
JSON_VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(TEXT, max_size=6), c,
                                                                                          max_size=3), max_leaves=6)


def _count(test: str, outcome: str) -> None:
    COUNTS.setdefault(test, {}).setdefault(outcome, 0)
    COUNTS[test][outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    """Print the generated case counts once the module's property tests ran; hold them to MIN_CASES
    when all three ran (a -k selection of one of them is not a full run)."""
    started = time.time()
    yield
    total = sum(sum(c.values()) for c in COUNTS.values())
    print(f"\n[bad-input properties] {total} generated cases in {time.time() - started:.1f}s: "
          f"{json.dumps(COUNTS, sort_keys=True)}")
    if set(COUNTS) == {"config", "prepare", "train"}:
        assert total >= MIN_CASES, f"only {total} generated cases; raise max_examples"


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` in-process: (exit code, stderr). Any exception but argparse's SystemExit escapes."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse usage errors: one line, exit 2 (see cli._Parser)
            code = e.code if isinstance(e.code, int) else 1
    return code, err.getvalue()


def assert_one_line(code: int, err: str, argv: list[str]) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code} for {argv!r}; stderr: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("ftdist: error: "), f"{argv!r}: stderr is not one line: {err!r}"
    assert "Traceback" not in err


def tree_digest(root: Path) -> str:
    """Names and contents of every file under ``root`` (missing root: a fixed value)."""
    h = hashlib.sha256()
    if root.exists():
        for p in sorted(root.rglob("*")):
            h.update(str(p.relative_to(root)).encode() + (p.read_bytes() if p.is_file() else b"<dir>"))
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# 1. `ftdist config FILE --set ...`: pure config validation


@pytest.fixture(scope="module")
def config_world(tmp_path_factory, tiny_bert) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("prop-config")
    return {"root": root, "base": base_config(tiny_bert, str(root / "ds"), str(root / "runs"))}


def _known_paths() -> list[str]:
    from ftdist.config import KNOWN_PATHS

    return list(KNOWN_PATHS)


KEYS = st.sampled_from(_known_paths()) | st.text(st.sampled_from(string.ascii_letters + "._0123456789-"), min_size=1,
                                                 max_size=20)


@st.composite
def config_case(draw) -> tuple[str | bytes | dict[str, Any], list[str]]:
    """(file content or a dict to dump as YAML, --set items): a mutated base config, raw text/bytes,
    or the valid base with generated --set items."""
    kind = draw(st.sampled_from(["mutate", "mutate", "set", "set", "text", "bytes", "yaml-value"]))
    content: Any = None
    if kind == "text":
        content = draw(st.text(TEXT, max_size=80) | st.sampled_from(["model: [oops\n", "- a\n", "a: b: c\n", "\t:",
                                                                     "model: {path: x}\n", "!!python/object:os.system x"]))
    elif kind == "bytes":
        content = draw(st.binary(max_size=60))
    elif kind == "yaml-value":
        content = yaml.safe_dump(draw(JSON_VALUES))
    overrides: list[str] = []
    if kind in ("set", "mutate"):
        for _ in range(draw(st.integers(1 if kind == "set" else 0, 3))):
            key = draw(KEYS)
            value = draw(st.text(ARG_TEXT, max_size=15) | SCALARS.map(lambda v: json.dumps(v) if v is not None else "")
                         | JSON_VALUES.map(lambda v: json.dumps(v)))
            sep = draw(st.sampled_from(["=", "=", "", " = ", "=="]))
            overrides.append(f"{key}{sep}{value}")
    return content, overrides


def _mutate(base: dict[str, Any], draw) -> dict[str, Any]:
    cfg = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(KEYS).split(".")
        cur = cfg
        for p in path[:-1]:
            nxt = cur.get(p) if isinstance(cur, dict) else None
            if not isinstance(nxt, dict):
                nxt = {}
                cur[p] = nxt
            cur = nxt
        if draw(st.booleans()) and path[-1] in cur:
            del cur[path[-1]]
        else:
            cur[path[-1]] = draw(JSON_VALUES)
    return cfg


@settings(max_examples=400, **SETTINGS)
@given(case=config_case(), data=st.data())
def test_generated_configs_and_overrides(case, data, config_world):
    content, overrides = case
    root: Path = config_world["root"]
    path = root / "job.yaml"
    if content is None:
        content = _mutate(config_world["base"], data.draw) if not overrides or data.draw(st.booleans()) \
            else config_world["base"]
    if isinstance(content, dict):
        path.write_text(yaml.safe_dump(content))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    argv = ["config", str(path)] + [a for o in overrides for a in ("--set", o)]
    before = tree_digest(root)
    code, err = run_cli(argv)
    assert tree_digest(root) == before, "`ftdist config` wrote something"
    if code == 0:
        _count("config", "valid")
        return
    assert_one_line(code, err, argv)
    _count("config", "refused")


# ------------------------------------------------------------------------------------------------
# 2. `ftdist data prepare` with generated raw inputs and flags


@pytest.fixture(scope="module")
def prepare_world(tmp_path_factory, tiny_bert) -> dict[str, Any]:
    return {"root": tmp_path_factory.mktemp("prop-prepare"), "bert": tiny_bert}


ROW_KEYS = st.sampled_from(["text", "label", "body", "Text", ""])


@st.composite
def raw_input(draw) -> tuple[str, bytes]:
    """(file name, bytes) of a raw input: plausible rows with generated values, or garbage."""
    fmt = draw(st.sampled_from(["jsonl", "jsonl", "csv", "csv", "tsv", "parquet", "parquet", "jsonl.gz", "txt"]))
    n = draw(st.integers(0, 12))
    rows = []
    for i in range(n):
        row: dict[str, Any] = {}
        if draw(st.integers(0, 9)):
            row["text"] = draw(st.sampled_from([f"row {i} is fine", "", None]) | SCALARS | JSON_VALUES)
        if draw(st.integers(0, 9)):
            row["label"] = draw(st.integers(0, 2) | st.sampled_from(["neg", "pos", True, False, 1.0, 1.5])
                                | SCALARS | JSON_VALUES)
        if draw(st.integers(0, 4)) == 0:
            row[draw(ROW_KEYS)] = draw(SCALARS)
        rows.append(row)
    garbage = draw(st.integers(0, 5)) == 0
    if garbage:
        data = draw(st.binary(max_size=80))
    elif fmt.startswith("jsonl") or fmt == "txt":
        lines = [json.dumps(r) for r in rows]
        if lines and draw(st.integers(0, 3)) == 0:
            lines.insert(draw(st.integers(0, len(lines))), draw(st.text(TEXT, max_size=20)))
        data = "\n".join(lines).encode()
        if fmt.endswith(".gz"):
            import gzip

            data = gzip.compress(data) if draw(st.booleans()) else data  # a .gz that is not gzip
    elif fmt in ("csv", "tsv"):
        sep = "\t" if fmt == "tsv" else ","
        header = draw(st.sampled_from([["text", "label"], ["label", "text"], ["text"], ["body", "label"],
                                       ["text", "label", "text"], []]))
        cells = [[str(r.get(c, "")) for c in header] for r in rows]
        data = "\n".join(sep.join(line) for line in [header] + cells).encode()
    else:
        data = _parquet_bytes(rows, draw)
    return f"input.{fmt}", data


def _parquet_bytes(rows: list[dict[str, Any]], draw) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, Any] = {}
    for name in ("text", "label"):
        values = [r.get(name) for r in rows]
        try:
            cols[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            cols[name] = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
    buf = io.BytesIO()
    pq.write_table(pa.table(cols) if rows else pa.table({"text": pa.array([], pa.string())}), buf)
    data = buf.getvalue()
    if draw(st.integers(0, 4)) == 0:
        data = data[:draw(st.integers(0, len(data)))]  # truncated
    return data


FLAG_VALUES = {
    "--limit": st.integers(-3, 20).map(str),
    "--seed": st.integers(-3, 2 ** 40).map(str),
    "--split": st.sampled_from(["0.8,0.1,0.1", "1,0,0", "0.5,0.5", "0,1,0", "nan,nan,nan", "inf,-inf,1", "0.9,0.1,0",
                                "1e-9,0.5,0.5", ",,", "0.8,0.1,0.1,0"]) | st.text(ARG_TEXT, max_size=10),
    "--encoding": st.sampled_from(["utf-8", "latin-1", "utf-16", "ascii", "nope", "base64", "rot13", "undefined",
                                   "idna", "utf-32", "cp1252", ""]),
    "--label-names": st.sampled_from(["neg,pos", "a,a", ",", "0,1,2", "false,true", "x"]) | st.text(ARG_TEXT, max_size=8),
    "--text-field": st.sampled_from(["text", "label", "body", ""]),
    "--label-field": st.sampled_from(["label", "text", "nope", ""]),
    "--max-length": st.integers(-1, 300).map(str),
    "--rows-per-shard": st.integers(-1, 5).map(str),
    "--format": st.sampled_from(["jsonl", "csv", "parquet", "auto", "xml"]),
    "--task": st.sampled_from(["sequence-classification", "causal-lm"]),
}


@pytest.mark.slow  # ~10 s: the full suite runs it, `make test-fast` leaves it out
@settings(max_examples=250, **SETTINGS)
@given(raw=raw_input(), flags=st.dictionaries(st.sampled_from(sorted(FLAG_VALUES)), st.just(None), max_size=4),
       raw_text=st.booleans(), data=st.data())
def test_generated_raw_inputs(raw, flags, raw_text, data, prepare_world):
    root: Path = prepare_world["root"]
    name, content = raw
    inp = root / name
    inp.write_bytes(content)
    out = root / "out"
    argv = ["data", "prepare", "--input", str(inp), "--output", str(out), "--model", prepare_world["bert"]]
    for flag in flags:
        argv += [flag, data.draw(FLAG_VALUES[flag], label=flag)]
    argv += ["--raw-text"] if raw_text and data.draw(st.integers(0, 3)) == 0 else []
    before = tree_digest(root)
    try:
        code, err = run_cli(argv)
        if code == 0:
            assert (out / "train" / "manifest.json").is_file(), f"exit 0 but no data set for {argv!r}"
            _count("prepare", "valid")
            return
        assert_one_line(code, err, argv)
        assert not out.exists(), f"{argv!r} failed but left {out}"
        assert tree_digest(root) == before, f"{argv!r} changed existing files"
        _count("prepare", "refused")
    finally:
        shutil.rmtree(out, ignore_errors=True)
        inp.unlink()


# ------------------------------------------------------------------------------------------------
# 3. `ftdist train` on a data set whose manifest.json is generated (preflight, before Ray starts)


class _RayWouldStart(Exception):
    """Raised instead of starting Ray: preflight accepted the data set, so the case is valid here."""


@pytest.fixture(scope="module")
def train_world(tmp_path_factory, tiny_bert, cls_data) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("prop-train")
    ds = root / "ds"
    shutil.copytree(cls_data, ds)
    cfg = base_config(tiny_bert, str(ds), str(root / "runs"), run={"name": "prop"})
    (root / "job.yaml").write_text(yaml.safe_dump(cfg))
    manifests = _Healthy({s: (ds / s / "manifest.json").read_bytes() for s in ("train", "validation", "test")})
    return {"root": root, "ds": ds, "config": str(root / "job.yaml"), "run": root / "runs" / "prop",
            "manifests": manifests}


class _Healthy(dict):
    """The healthy manifests, restored after each case (short repr: hypothesis prints fixtures)."""

    def __repr__(self) -> str:
        return "<healthy manifests>"


MANIFEST_KEYS = ["format", "version", "split", "task", "num_rows", "shards", "max_length", "tokenizer",
                 "label_names", "label_counts", "columns", "source", "prepare"]
SHARD_KEYS = ["file", "rows", "sha256", "bytes"]


@st.composite
def manifest_damage(draw, healthy: dict[str, Any]) -> bytes | None:
    """The bytes of a damaged manifest.json (None: make manifest.json a directory)."""
    kind = draw(st.sampled_from(["set", "set", "delete", "shard", "shard", "shards", "columns", "json", "bytes",
                                 "truncate", "dir"]))
    man = copy.deepcopy(healthy)
    if kind == "set":
        man[draw(st.sampled_from(MANIFEST_KEYS) | st.text(TEXT, max_size=6))] = draw(JSON_VALUES)
    elif kind == "delete":
        man.pop(draw(st.sampled_from(MANIFEST_KEYS)), None)
    elif kind == "shard":
        shard = man["shards"][draw(st.integers(0, len(man["shards"]) - 1))]
        key = draw(st.sampled_from(SHARD_KEYS) | st.text(TEXT, max_size=5))
        if draw(st.integers(0, 3)) == 0:
            shard.pop(key, None)
        else:
            shard[key] = draw(JSON_VALUES | st.sampled_from(["../train/part-00000.parquet", "", ".", "/etc/passwd",
                                                             "part-00000.parquet", "part-99999.parquet"]))
    elif kind == "shards":
        man["shards"] = draw(st.sampled_from([[], man["shards"] * 2, man["shards"][::-1]]) | JSON_VALUES)
    elif kind == "columns":
        cols = man["columns"]
        cols[draw(st.sampled_from(list(cols) + ["text", "x"]))] = draw(st.sampled_from(["int64", "string"]) | JSON_VALUES)
        if draw(st.booleans()):
            cols.pop(draw(st.sampled_from(list(cols))))
    elif kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode()
    elif kind == "bytes":
        return draw(st.binary(max_size=60))
    elif kind == "dir":
        return None
    text = json.dumps(man).encode()
    if kind == "truncate":
        return text[:draw(st.integers(0, len(text) - 1))]
    return text


@pytest.mark.slow  # ~19 s: the full suite runs it, `make test-fast` leaves it out
@settings(max_examples=200, **SETTINGS)
@given(split=st.sampled_from(["train", "validation", "test"]), data=st.data())
def test_generated_manifests(split, data, train_world, monkeypatch):
    import ftdist.launcher

    def no_ray(cfg: Any) -> None:
        raise _RayWouldStart()

    monkeypatch.setattr(ftdist.launcher, "connect_ray", no_ray)
    ds: Path = train_world["ds"]
    healthy = json.loads(train_world["manifests"][split])
    damaged = data.draw(manifest_damage(healthy), label="manifest")
    path = ds / split / "manifest.json"
    path.unlink()
    if damaged is None:
        path.mkdir()
    else:
        path.write_bytes(damaged)
    before = tree_digest(ds)
    argv = ["train", train_world["config"]]
    try:
        try:
            code, err = run_cli(argv)
        except _RayWouldStart:
            _count("train", "valid (preflight passed; Ray not started)")
            return
        assert_one_line(code, err, argv)
        assert not train_world["run"].exists(), "a refused run left a run folder"
        assert tree_digest(ds) == before, "a refused run changed the data set"
        _count("train", "refused")
    finally:
        shutil.rmtree(train_world["run"], ignore_errors=True)
        if path.is_dir():
            path.rmdir()
        path.write_bytes(train_world["manifests"][split])
