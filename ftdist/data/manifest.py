"""The on-storage format of a prepared data set, and its validation.

Layout: ``<prefix>/<split>/part-NNNNN.parquet`` plus ``<prefix>/<split>/manifest.json``. The manifest
is written last, so a split without one is incomplete and is never read. Columns:
``sample_id`` (int64, unique across splits), ``input_ids`` (list<int32>, not padded), ``length``
(int32, for length bucketing without decoding), and ``label`` (int64) for classification or
(float32) for regression; optionally
``text`` (string). A raw-text data set has ``text`` but no ``input_ids``/``length``; its manifest's
``tokenizer`` and ``max_length`` are null and the reader tokenizes on the fly.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ftdist import storage
from ftdist.config import DATA_TASKS, StorageSection
from ftdist.uri import join_uri
from ftdist.errors import UserError

FORMAT = "ftdist-dataset"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "validation", "test")

Count = Annotated[int, Field(ge=0)]


def _plain_file_name(name: str) -> str:
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ValueError("must be a file name in the split's folder")
    return name


class _Record(BaseModel):
    # strict: a hand-edited manifest with "12" or true for a count is refused, not coerced; every
    # field is checked before use, because a damaged manifest would otherwise surface as a
    # TypeError deep in preflight, in the summary, or in a worker after Ray has started.
    model_config = ConfigDict(strict=True, extra="forbid")


class ShardInfo(_Record):
    file: Annotated[str, AfterValidator(_plain_file_name)]
    rows: Count
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: Count | None = None


class TokenLengths(_Record):
    """Token counts before truncation (the truncation diagnosis)."""

    truncated_rows: Count
    p95: Count
    max: Count


class Manifest(_Record):
    model_config = ConfigDict(strict=True, extra="ignore")  # newer writers may add fields

    split: str
    task: str
    num_rows: Count
    shards: list[ShardInfo]
    max_length: Annotated[int, Field(gt=0)] | None  # None: raw text, tokenized at read time
    tokenizer: dict[str, Any] | None
    label_names: list[str] | None = None
    label_counts: list[Count] | None = None
    columns: dict[str, str] = Field(default_factory=dict)
    source: str | None = None
    prepare: dict[str, Any] | None = None  # the PrepareSection that built it (to detect a changed spec)
    token_lengths: TokenLengths | None = None
    label_stats: dict[str, float] | None = None  # regression: the labels' count, mean, std

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if self.task not in DATA_TASKS:
            raise ValueError(f"field 'task' must be one of {', '.join(DATA_TASKS)}")
        files = [s.file for s in self.shards]
        if len(set(files)) != len(files):
            raise ValueError("a shard file is listed twice")
        if self.tokenized and (self.max_length is None or self.tokenizer is None or "length" not in self.columns):
            raise ValueError("it lists token ids but no max_length/tokenizer/length column")
        if self.label_names is not None and self.label_counts is not None \
                and len(self.label_names) != len(self.label_counts):
            raise ValueError("label_names and label_counts differ in length")
        return self

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, **self.model_dump()}, indent=2)

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


def schema_problem(error: ValidationError) -> str:
    """The first problem of a manifest, in one phrase naming the field (``shards[2].rows``)."""
    err = error.errors()[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not loc:
        return msg
    if err["type"] == "missing":
        return f"field '{loc}' is missing"
    if err["type"] == "extra_forbidden":
        return f"'{loc}' is not a known field"
    return f"field '{loc}': {msg}"


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
    try:
        m = Manifest.model_validate({k: v for k, v in d.items() if k not in ("format", "version")})
    except ValidationError as e:
        raise UserError(f"'{uri}' is malformed: {schema_problem(e)}; re-run `ftdist data prepare`") from None
    except RecursionError:
        raise UserError(f"'{uri}' is malformed: nested too deeply; re-run `ftdist data prepare`") from None
    if m.num_rows == 0 or not m.shards:
        raise UserError(f"data set split '{split_uri}' is empty (0 rows); prepare it with more data or "
                        f"change the --split fractions")
    if sum(s.rows for s in m.shards) != m.num_rows:
        raise UserError(f"'{uri}': shard row counts do not add up to num_rows; re-run `ftdist data prepare`")
    needed = {"sample_id", "input_ids" if "text" not in m.columns else "text"}
    needed |= {"label"} if m.task in ("sequence-classification", "regression") else set()
    missing = needed - set(m.columns)
    if missing:
        raise UserError(f"data set '{split_uri}' lacks column(s) {sorted(missing)} needed for task {m.task}; "
                        f"prepare it with the right --task/--label-field")
    return m


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
