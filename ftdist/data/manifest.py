"""The on-storage format of a prepared data set, and its validation.

Layout: ``<prefix>/<split>/part-NNNNN.parquet`` plus ``<prefix>/<split>/manifest.json``. The manifest
is written last, so a split without one is incomplete and is never read. Columns:
``sample_id`` (int64, unique across splits), ``input_ids`` (list<int32>, not padded), ``length``
(int32, for length bucketing without decoding), and ``label`` (int64) for classification; optionally
``text`` (string). A raw-text data set has ``text`` but no ``input_ids``/``length``; its manifest's
``tokenizer`` and ``max_length`` are null and the reader tokenizes on the fly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ftdist.config import StorageSection, join_uri
from ftdist.errors import UserError
from ftdist import storage

FORMAT = "ftdist-dataset"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "validation", "test")


@dataclass
class ShardInfo:
    file: str
    rows: int
    sha256: str
    bytes: int | None = None


@dataclass
class Manifest:
    split: str
    task: str
    num_rows: int
    shards: list[ShardInfo]
    max_length: int | None  # None: raw text, tokenized at read time
    tokenizer: dict[str, Any] | None
    label_names: list[str] | None = None
    label_counts: list[int] | None = None
    columns: dict[str, str] = field(default_factory=dict)
    source: str | None = None
    prepare: dict[str, Any] | None = None  # the PrepareSection that built it (to detect a changed spec)
    #: tokenized sets: {truncated_rows, p95, max} of the token counts before truncation (the truncation diagnosis)
    token_lengths: dict[str, int] | None = None

    def to_json(self) -> str:
        d = {"format": FORMAT, "version": VERSION, **self.__dict__,
             "shards": [s.__dict__ for s in self.shards]}
        return json.dumps(d, indent=2)

    @property
    def tokenized(self) -> bool:
        return "input_ids" in self.columns

    @property
    def num_labels(self) -> int | None:
        return len(self.label_names) if self.label_names else None


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """Identity of a tokenizer: same vocabulary and special tokens -> same ids for the same text."""
    vocab = sorted(tokenizer.get_vocab().items())
    specials = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    h = hashlib.sha256(json.dumps([vocab, specials, type(tokenizer).__name__.removesuffix("Fast")]).encode())
    return {"name": getattr(tokenizer, "name_or_path", ""), "vocab_size": len(vocab), "sha256": h.hexdigest()[:16]}


def load_manifest(split_uri: str, cfg: StorageSection) -> Manifest:
    """Read and check a split's manifest; every problem is a one-line UserError naming the URI."""
    uri = join_uri(split_uri, MANIFEST)
    if not storage.exists(uri, cfg):
        if not storage.listdir(split_uri, cfg):
            raise UserError(f"data set split '{split_uri}' does not exist or is empty; "
                            f"run `ftdist data prepare` or fix data.path")
        raise UserError(f"'{uri}' is missing: the data set at '{split_uri}' is incomplete or not an ftdist data "
                        f"set; (re)run `ftdist data prepare`")
    try:
        d = json.loads(storage.read_text(uri, cfg))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError(f"'{uri}' is not valid JSON; re-run `ftdist data prepare`") from None
    except IsADirectoryError:
        raise UserError(f"'{uri}' is a folder, not a manifest file; re-run `ftdist data prepare`") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise UserError(f"'{uri}' is not an ftdist manifest (format != {FORMAT}); re-run `ftdist data prepare`")
    if d.get("version") != VERSION:
        raise UserError(f"'{uri}' has manifest version {d.get('version')!r}; this ftdist reads version {VERSION}; "
                        f"re-run `ftdist data prepare` with this version")
    problem = _schema_problem(d)
    if problem:
        raise UserError(f"'{uri}' is malformed: {problem}; re-run `ftdist data prepare`")
    m = Manifest(split=d["split"], task=d["task"], num_rows=d["num_rows"],
                 shards=[ShardInfo(**s) for s in d["shards"]], max_length=d["max_length"],
                 tokenizer=d["tokenizer"], label_names=d.get("label_names"), label_counts=d.get("label_counts"),
                 columns=d.get("columns", {}), source=d.get("source"), prepare=d.get("prepare"),
                 token_lengths=d.get("token_lengths"))
    if m.num_rows == 0 or not m.shards:
        raise UserError(f"data set split '{split_uri}' is empty (0 rows); prepare it with more data or "
                        f"change the --split fractions")
    if sum(s.rows for s in m.shards) != m.num_rows:
        raise UserError(f"'{uri}': shard row counts do not add up to num_rows; re-run `ftdist data prepare`")
    needed = {"sample_id", "input_ids" if "text" not in m.columns else "text"}
    needed |= {"label"} if m.task == "sequence-classification" else set()
    missing = needed - set(m.columns)
    if missing:
        raise UserError(f"data set '{split_uri}' lacks column(s) {sorted(missing)} needed for task {m.task}; "
                        f"prepare it with the right --task/--label-field")
    return m


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _schema_problem(d: dict[str, Any]) -> str | None:
    """What is wrong with a parsed manifest's fields, or None. Every field is type-checked here,
    before use, because a hand-edited or damaged manifest would otherwise surface as a TypeError
    deep in preflight, in the summary, or in a worker after Ray has started."""
    from ftdist.config import TASKS

    for key in ("split", "task", "num_rows", "shards", "max_length", "tokenizer"):
        if key not in d:
            return f"field '{key}' is missing"
    checks: list[tuple[str, bool, str]] = [
        ("split", isinstance(d["split"], str), "a split name"),
        ("task", d["task"] in TASKS, f"one of {', '.join(TASKS)}"),
        ("num_rows", _is_count(d["num_rows"]), "a count (integer >= 0)"),
        ("shards", isinstance(d["shards"], list) and all(isinstance(s, dict) for s in d["shards"]),
         "a list of shard records"),
        ("max_length", d["max_length"] is None or (_is_count(d["max_length"]) and d["max_length"] > 0),
         "a positive integer or null"),
        ("tokenizer", d["tokenizer"] is None or isinstance(d["tokenizer"], dict), "an object or null"),
        ("label_names", d.get("label_names") is None or _is_str_list(d["label_names"]), "a list of names or null"),
        ("label_counts", d.get("label_counts") is None or (isinstance(d["label_counts"], list)
                                                           and all(_is_count(c) for c in d["label_counts"])),
         "a list of counts or null"),
        ("columns", isinstance(d.get("columns", {}), dict)
         and all(isinstance(v, str) for v in d.get("columns", {}).values()), "an object of column types"),
        ("source", d.get("source") is None or isinstance(d["source"], str), "a string or null"),
        ("prepare", d.get("prepare") is None or isinstance(d["prepare"], dict), "an object or null"),
        ("token_lengths", d.get("token_lengths") is None or (
            isinstance(d["token_lengths"], dict) and set(d["token_lengths"]) == {"truncated_rows", "p95", "max"}
            and all(_is_count(v) for v in d["token_lengths"].values())),
         "null or an object of counts truncated_rows, p95, max"),
    ]
    for key, ok, want in checks:
        if not ok:
            return f"field '{key}' must be {want}"
    for i, s in enumerate(d["shards"]):
        unknown = sorted(set(s) - set(ShardInfo.__dataclass_fields__))
        if unknown:
            return f"shards[{i}] has unknown field '{unknown[0]}'"
        for key, ok, want in (
                ("file", isinstance(s.get("file"), str) and s["file"] not in ("", ".", "..")
                 and "/" not in s["file"] and "\\" not in s["file"], "a file name in the split's folder"),
                ("rows", _is_count(s.get("rows")), "a count (integer >= 0)"),
                ("sha256", isinstance(s.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", s["sha256"]) is not None,
                 "a SHA-256 hex digest"),
                ("bytes", s.get("bytes") is None or _is_count(s["bytes"]), "a size in bytes or null")):
            if not ok:
                return f"shards[{i}].{key} must be {want}"
    files = [s["file"] for s in d["shards"]]
    if len(set(files)) != len(files):
        return "a shard file is listed twice"
    tokenized = "input_ids" in d.get("columns", {})
    if tokenized and (d["max_length"] is None or d["tokenizer"] is None or "length" not in d["columns"]):
        return "it lists token ids but no max_length/tokenizer/length column"
    if d.get("label_names") is not None and d.get("label_counts") is not None \
            and len(d["label_names"]) != len(d["label_counts"]):
        return "label_names and label_counts differ in length"
    return None


def check_compatible(m: Manifest, split_uri: str, task: str, num_labels: int | None,
                     tokenizer_fp: dict[str, Any] | None) -> None:
    """Refuse a data set that does not fit the model: wrong task, labels out of range, other tokenizer."""
    if m.task != task:
        raise UserError(f"data set '{split_uri}' was prepared for task {m.task} but model.task is {task}; "
                        f"re-prepare it or change model.task")
    if task == "sequence-classification" and num_labels is not None and m.num_labels is not None:
        if m.num_labels > num_labels:
            raise UserError(f"data set '{split_uri}' has labels 0..{m.num_labels - 1} ({', '.join(m.label_names or [])}) "
                            f"but model.num_labels is {num_labels}; set model.num_labels: {m.num_labels}")
    if tokenizer_fp is not None and m.tokenizer is not None and m.tokenizer.get("sha256") != tokenizer_fp.get("sha256"):
        raise UserError(f"data set '{split_uri}' was tokenized with '{m.tokenizer.get('name')}' but the model's tokenizer "
                        f"'{tokenizer_fp.get('name')}' differs; re-run `ftdist data prepare --model` with the model's tokenizer")


def check_shards_present(m: Manifest, split_uri: str, cfg: StorageSection) -> None:
    """Cheap pre-flight check (one listing): every shard exists with the size the manifest recorded.
    Content hashes are verified as each shard is read."""
    fs, path = storage.filesystem(split_uri, cfg)
    listing = storage.retrying(lambda: {os.path.basename(i["name"].rstrip("/")): i.get("size")
                                        for i in fs.ls(path, detail=True)}, split_uri, "listing", cfg)
    for s in m.shards:
        uri = join_uri(split_uri, s.file)
        if s.file not in listing:
            raise UserError(f"shard '{uri}' listed in the manifest is missing; re-run `ftdist data prepare`")
        if s.bytes is not None and listing[s.file] != s.bytes:
            raise UserError(f"shard '{uri}' is truncated or corrupt ({listing[s.file]} bytes, the manifest says "
                            f"{s.bytes}); re-run `ftdist data prepare`")
