"""``ftdist data prepare``: raw JSONL/CSV/Parquet (local or any fsspec URL) -> tokenized shards.

Streaming end to end: the input is read in record batches, rows are assigned to splits in seeded,
label-stratified blocks, each split keeps a bounded shuffle window of rows (so shards of a sorted
input are still mixed), and every full window is tokenized in one batch call of a fast tokenizer
(which parallelises over the available cores) and written as shards. Memory is bounded by
``rows_per_shard * WINDOW_SHARDS`` rows per split, whatever the input size.

With ``tokenize: false`` the shards hold the raw text instead of token ids and every worker tokenizes
its rows on the fly (in the reader's read-ahead thread), so one data set serves several models or
max_lengths; ``keep_text: true`` stores the text next to the ids (for audits and error analysis).

With ``pack: true`` (language-model tasks) each split's documents are tokenized whole, each ending with
the tokenizer's separator/EOS, concatenated in the split's shuffled order and cut into rows of exactly
``max_length`` tokens (the recipe of transformers' ``run_clm``/``run_mlm`` ``group_texts``): no
padding and no truncation; only the split's last partial block (< ``max_length`` tokens) is dropped.

Writes are atomic: each split is built in a local temp folder and published with its
``manifest.json`` last (local: folder rename), so a half-written data set is never read.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import math
import logging
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ftdist import storage
from ftdist.config import PrepareSection, StorageSection
from ftdist.uri import join_uri
from ftdist.redaction import redact_uri
from ftdist.data.manifest import MANIFEST, SPLITS, Manifest, ShardInfo, TokenLengths, tokenizer_fingerprint
from ftdist.data.naming import named
from ftdist.errors import UserError

log = logging.getLogger(__name__)
WINDOW_SHARDS = 4
READ_BATCH_ROWS = 8192
STRATIFY_BLOCK = 200
MAX_CLASSES = 100_000  # integer labels are ids 0..K-1; a larger K is a wrong column, not a task


def check_encoding(encoding: str) -> None:
    """Refuse an encoding Python cannot decode text with, before anything is read: an unknown name
    (or a bytes-to-bytes codec such as base64) would otherwise fail mid-read with a LookupError."""
    where = named("encoding")
    try:
        info = codecs.lookup(encoding)
    except (LookupError, TypeError, ValueError):
        raise UserError(f"encoding {encoding!r} is unknown ({where}); use a Python codec name such as utf-8, "
                        f"utf-16 or latin-1") from None
    if not getattr(info, "_is_text_encoding", True):
        raise UserError(f"encoding {encoding!r} is not a text encoding ({where}); use one such as utf-8 or latin-1")


def detect_format(uri: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = uri.lower().removesuffix(".gz")
    for ext, f in ((".jsonl", "jsonl"), (".json", "jsonl"), (".csv", "csv"), (".tsv", "csv"), (".parquet", "parquet")):
        if name.endswith(ext):
            return f
    raise UserError(f"cannot tell the format of '{redact_uri(uri)}' from its name; pass {named('format')} jsonl|csv|parquet")


def iter_raw(uri: str, fmt: str, encoding: str, columns: list[str], cfg: StorageSection) -> Iterator[pa.RecordBatch]:
    """Record batches of the requested columns from a raw input file, read incrementally."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    fs, path = storage.filesystem(uri, cfg)
    if not storage.exists(uri, cfg):
        raise UserError(f"input '{redact_uri(uri)}' does not exist; check {named('input')}")
    try:
        with fs.open(path, "rb", compression="infer") as f:
            if fmt == "parquet":
                pf = pq.ParquetFile(f)
                _check_columns(uri, pf.schema_arrow.names, columns)
                yield from pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns)
                return
            if fmt == "csv":
                reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(encoding=encoding, block_size=1 << 22),
                                        parse_options=pacsv.ParseOptions(delimiter="\t" if uri.endswith(".tsv") else ","),
                                        convert_options=pacsv.ConvertOptions(include_columns=columns,
                                                                             include_missing_columns=True))
                _check_columns(uri, reader.schema.names, columns, present=_csv_header(uri, fs, path, encoding))
                yield from reader
                return
            # JSONL: pyarrow's reader needs the whole file; read it in line-aligned chunks instead.
            raw = io.TextIOWrapper(f, encoding=encoding)
            while True:
                lines = raw.readlines(1 << 22)
                if not lines:
                    return
                table = pajson.read_json(io.BytesIO("".join(lines).encode()))
                _check_columns(uri, table.column_names, columns)
                yield from table.select(columns).to_batches()
    except UserError:
        raise
    except (pa.ArrowInvalid, UnicodeError) as e:  # UnicodeError: also codecs such as 'undefined' that refuse all
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"input '{redact_uri(uri)}' could not be parsed as {fmt}: {first}; "
                        f"check {named('format')}/{named('encoding')}") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a .gz name on a file that is not (whole) gzip
        raise UserError(f"input '{redact_uri(uri)}' could not be decompressed ({type(e).__name__}: {e}); "
                        f"check the file, or rename it if it is not compressed") from None


def _csv_header(uri: str, fs: Any, path: str, encoding: str) -> list[str]:
    import csv
    with fs.open(path, "rb", compression="infer") as f:
        first = io.TextIOWrapper(f, encoding=encoding).readline()
    return next(csv.reader([first], delimiter="\t" if uri.endswith(".tsv") else ","), [])


def _check_columns(uri: str, names: list[str], wanted: list[str], present: list[str] | None = None) -> None:
    have = present if present is not None else names
    missing = [c for c in wanted if c not in have]
    if missing:
        raise UserError(f"input '{redact_uri(uri)}' has no column {missing[0]!r} (columns: {', '.join(have)}); "
                        f"set {named('text_field')}/{named('label_field')}")


@dataclass
class _SplitWriter:
    """Collects one split's rows in a bounded window, tokenizes and writes full shards."""

    name: str
    out_dir: str
    rows_per_shard: int
    rng: np.random.Generator
    tokenize: bool = True  # False: raw-text shards, tokenized by the reader
    keep_text: bool = False
    float_labels: bool = False  # regression: float32 labels, no class counts, their count/sum/sum of squares
    label_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    labels: list[Any] = field(default_factory=list)
    shards: list[ShardInfo] = field(default_factory=list)
    label_counts: dict[int, int] = field(default_factory=dict)
    full_lengths: list[int] = field(default_factory=list)  # tokens before truncation, per written row
    pack: bool = False  # rows are max_length blocks of the concatenated documents
    carry: list[int] = field(default_factory=list)  # packing: tokens waiting for the next block
    blocks: int = 0  # packing: blocks written so far (their sample ids)
    dropped_tokens: int = 0  # packing: the last partial block's tokens (set by close)

    def add(self, sample_id: int, text: str, label: int | float | None, tok: Any, max_length: int) -> None:
        self.ids.append(sample_id)
        self.texts.append(text)
        if label is not None:
            self.labels.append(label)
            if self.float_labels:
                for i, x in enumerate((1.0, label, label * label)):
                    self.label_sums[i] += x
            else:
                self.label_counts[int(label)] = self.label_counts.get(int(label), 0) + 1
        if len(self.ids) >= self.rows_per_shard * WINDOW_SHARDS:
            self.flush(tok, max_length, keep_partial=True)

    def flush(self, tok: Any, max_length: int, keep_partial: bool = False) -> None:
        order = self.rng.permutation(len(self.ids))
        n_out = (len(order) // self.rows_per_shard) * self.rows_per_shard if keep_partial else len(order)
        out, rest = order[:n_out], order[n_out:]
        for start in range(0, len(out), self.rows_per_shard):
            self._write([int(i) for i in out[start:start + self.rows_per_shard]], tok, max_length)
        self.ids = [self.ids[i] for i in rest]
        self.texts = [self.texts[i] for i in rest]
        if self.labels:
            self.labels = [self.labels[i] for i in rest]

    def close(self, tok: Any, max_length: int) -> None:
        self.flush(tok, max_length)
        self.dropped_tokens, self.carry = len(self.carry), []

    def _write(self, idx: list[int], tok: Any, max_length: int) -> None:
        texts = [self.texts[i] for i in idx]
        if self.pack:
            self._write_blocks(pack_blocks(tok, texts, max_length, self.carry))
            return
        cols: dict[str, pa.Array] = {"sample_id": pa.array([self.ids[i] for i in idx], pa.int64())}
        if self.tokenize:
            enc = tokenize(tok, texts, max_length)
            self.full_lengths += untruncated_lengths(tok, texts, enc, max_length)
            cols["input_ids"] = pa.array(enc, pa.list_(pa.int32()))
            cols["length"] = pa.array([len(e) for e in enc], pa.int32())
        if self.keep_text or not self.tokenize:
            cols["text"] = pa.array(texts, pa.string())
        if self.labels:
            cols["label"] = pa.array([self.labels[i] for i in idx], pa.float32() if self.float_labels else pa.int64())
        self._write_table(cols, len(idx))

    def _write_blocks(self, blocks: list[list[int]]) -> None:
        if not blocks:  # too few tokens yet for one block: they wait in carry
            return
        ids = list(range(self.blocks, self.blocks + len(blocks)))
        self.blocks += len(blocks)
        self._write_table({"sample_id": pa.array(ids, pa.int64()), "input_ids": pa.array(blocks, pa.list_(pa.int32())),
                           "length": pa.array([len(b) for b in blocks], pa.int32())}, len(blocks))

    def _write_table(self, cols: dict[str, pa.Array], rows: int) -> None:
        fname = f"part-{len(self.shards):05d}.parquet"
        path = os.path.join(self.out_dir, fname)
        pq.write_table(pa.table(cols), path, compression="zstd", row_group_size=4096)
        with open(path, "rb") as f:
            content = f.read()
        self.shards.append(ShardInfo(file=fname, rows=rows, sha256=hashlib.sha256(content).hexdigest(),
                                     bytes=len(content)))


def tokenize(tok: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids exactly as training sees them: special tokens added, truncated to ``max_length``.
    Shared by ``prepare`` and the reader's on-the-fly path so both give identical ids."""
    return tok(texts, truncation=True, max_length=max_length, add_special_tokens=True,
               return_attention_mask=False)["input_ids"]


def pack_blocks(tok: Any, texts: list[str], max_length: int, carry: list[int]) -> list[list[int]]:
    """Packing: ``texts`` tokenized whole (special tokens added; the separator/EOS appended where the
    tokenizer adds none, as GPT-2's does not), appended to ``carry`` (the previous call's leftover
    tokens; left holding this call's), and cut into blocks of exactly ``max_length`` tokens."""
    ends = {t for t in (tok.sep_token_id, tok.eos_token_id) if t is not None}
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    for ids in tok(texts, truncation=False, add_special_tokens=True, return_attention_mask=False,
                   verbose=False)["input_ids"]:
        carry.extend(ids)
        if eos is not None and (not ids or ids[-1] not in ends):
            carry.append(eos)
    n = len(carry) // max_length * max_length
    blocks = [carry[i:i + max_length] for i in range(0, n, max_length)]
    del carry[:n]
    return blocks


def untruncated_lengths(tok: Any, texts: list[str], enc: list[list[int]], max_length: int) -> list[int]:
    """Each text's token count before truncation; only rows that hit ``max_length`` are tokenized again."""
    out = [len(e) for e in enc]
    long = [i for i, n in enumerate(out) if n >= max_length]
    if long:
        full = tok([texts[i] for i in long], truncation=False, add_special_tokens=True,
                   return_attention_mask=False, verbose=False)["input_ids"]
        for i, ids in zip(long, full):
            out[i] = len(ids)
    return out


def length_stats(lengths: list[int], max_length: int) -> TokenLengths | None:
    """What the truncation diagnosis needs: rows cut at ``max_length``, and the length keeping 95% whole."""
    if not lengths:
        return None
    ordered = sorted(lengths)
    return TokenLengths(truncated_rows=sum(n > max_length for n in ordered),
                        p95=ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)], max=ordered[-1])


def label_stats(sums: list[float]) -> dict[str, float] | None:
    """count, mean and (population) std of a regression split's labels from their count/sum/sum of squares."""
    n, s, ss = sums
    if not n:
        return None
    mean = s / n
    return {"count": n, "mean": mean, "std": math.sqrt(max(ss / n - mean * mean, 0.0))}


def regression_label(value: Any, uri: str, field: str | None) -> float | None:
    """A regression label as a float; a missing one is None (the row is skipped); anything that is not a
    finite number (a class name, NaN, a list) is refused with one line."""
    if value is None:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        if math.isfinite(float(value)):
            return float(value)
    if isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            f = math.nan
        if math.isfinite(f):
            return f
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise UserError(f"input '{redact_uri(uri)}': label {shown} in column {field!r} is not a finite number; "
                    f"a regression task's labels are numbers")


def shard_columns(tokenized: bool, keep_text: bool, labelled: bool, float_labels: bool = False) -> dict[str, str]:
    """The manifest's column schema for a data set built with these options."""
    cols = {"sample_id": "int64"}
    if tokenized:
        cols |= {"input_ids": "list<int32>", "length": "int32"}
    if keep_text or not tokenized:
        cols["text"] = "string"
    return cols | ({"label": "float32" if float_labels else "int64"} if labelled else {})


def _stratified_assigner(fractions: list[float], rng: np.random.Generator) -> Any:
    """Assign rows to splits: per label, blocks of STRATIFY_BLOCK rows hold each split's exact share
    in a seeded random order, so every split sees every label in proportion, even when streaming."""
    pending: dict[Any, list[int]] = {}
    counts = np.round(np.array(fractions) * STRATIFY_BLOCK).astype(int)
    counts[0] += STRATIFY_BLOCK - counts.sum()
    block = np.repeat(np.arange(len(fractions)), counts)

    def assign(label: Any) -> int:
        q = pending.get(label)
        if not q:
            q = pending[label] = list(rng.permutation(block))
        return int(q.pop())

    return assign


def spec_record(spec: PrepareSection, task: str, seed: int, max_length: int) -> dict[str, Any]:
    """What the manifest records about how a data set was built (compared on reuse)."""
    label = spec.label_field if task in ("sequence-classification", "regression") else None
    # Raw-text data sets are tokenized at read time: data.max_length may change without a rebuild.
    # The input is recorded redacted (a presigned URL's signature must not live in the data set);
    # both sides of the reuse comparison go through here, so they compare redacted too.
    return spec.model_dump(mode="json") | {"input": redact_uri(spec.input), "label_field": label, "seed": seed,
                                           "max_length": max_length if spec.tokenize else None}


def prepare(spec: PrepareSection, output: str, tokenizer_path: str | None, max_length: int, task: str,
            cfg: StorageSection, seed: int = 42, label_names: list[str] | None = None,
            overwrite: bool = False) -> dict[str, Manifest]:
    """Build a data set at ``output`` from ``spec.input``; returns the manifests per split."""
    from ftdist.modeling import load_tokenizer

    if task in ("causal-lm", "masked-lm"):  # unlabelled text
        spec = spec.model_copy(update={"label_field": None})
    elif not spec.label_field:
        raise UserError(f"{task} needs labels; set {named('label_field')} (or use {named('task')} causal-lm / masked-lm "
                        f"for unlabelled text)")
    if (len(spec.split) != 3 or not all(math.isfinite(f) and f >= 0 for f in spec.split)
            or abs(sum(spec.split) - 1) > 1e-6 or spec.split[0] <= 0):
        raise UserError(f"{named('split')} {','.join(map(str, spec.split))} must be three fractions train,validation,test "
                        f"that add up to 1, e.g. 0.8,0.1,0.1")
    check_encoding(spec.encoding)
    if spec.label_field is not None and spec.label_field == spec.text_field:
        raise UserError(f"the text and the labels cannot both come from column {spec.text_field!r}; "
                        f"set {named('text_field')} and {named('label_field')} to two columns")
    if label_names is not None and (not all(label_names) or len(set(label_names)) != len(label_names)):
        raise UserError(f"label names {','.join(label_names)!r} ({named('label_names')}) must be "
                        f"distinct, non-empty class names in id order, e.g. negative,neutral,positive")
    existing = [s for s in SPLITS if storage.exists(join_uri(output, s, MANIFEST), cfg)]
    if existing and not overwrite:
        raise UserError(f"output '{redact_uri(output)}' already holds a data set ({', '.join(existing)}); "
                        f"choose another {named('output')} or pass --overwrite")
    if spec.pack and (task == "sequence-classification" or not spec.tokenize or spec.keep_text):
        raise UserError(f"{named('pack')} packs unlabelled text of {named('task')} causal-lm or masked-lm into "
                        f"tokenized max_length blocks; it cannot be combined with sequence-classification, "
                        f"{named('raw_text')} or {named('keep_text')}")
    if spec.tokenize and not tokenizer_path:
        raise UserError(f"tokenizing needs a tokenizer; set {named('model')} (or {named('raw_text')} to tokenize on "
                        f"the fly)")
    tok = load_tokenizer(tokenizer_path, trust_remote_code=False) if spec.tokenize and tokenizer_path else None
    fmt = detect_format(spec.input, spec.format)
    columns = [spec.text_field] + ([spec.label_field] if spec.label_field else [])

    # Pass 1 (labels only, cheap): the label vocabulary and, with --limit, which rows to keep.
    label_values: dict[Any, int] = {}
    regression = task == "regression"
    n_rows = 0
    for batch in iter_raw(spec.input, fmt, spec.encoding, columns, cfg):
        if spec.label_field:
            for v in batch.column(spec.label_field).to_pylist():
                if regression:
                    regression_label(v, spec.input, spec.label_field)  # refused here, before any shard is written
                    continue
                key = label_key(v, spec.input, spec.label_field)
                label_values[key] = label_values.get(key, 0) + 1
        n_rows += batch.num_rows
    if n_rows == 0:
        raise UserError(f"input '{redact_uri(spec.input)}' has no rows")
    label_map = _label_map(label_values, label_names, spec.input) if spec.label_field and not regression else None
    rng = np.random.default_rng(seed)
    keep = None
    if spec.limit and spec.limit < n_rows:
        keep = np.zeros(n_rows, dtype=bool)
        keep[rng.choice(n_rows, size=spec.limit, replace=False)] = True

    assign = _stratified_assigner(spec.split, rng)
    with tempfile.TemporaryDirectory(prefix="ftdist-prepare-") as tmp:
        writers = []
        for i, name in enumerate(SPLITS):
            os.makedirs(os.path.join(tmp, name))
            writers.append(_SplitWriter(name, os.path.join(tmp, name), spec.rows_per_shard,
                                        np.random.default_rng([seed, i]), spec.tokenize, spec.keep_text,
                                        pack=spec.pack, float_labels=regression))
        row = 0
        for batch in iter_raw(spec.input, fmt, spec.encoding, columns, cfg):
            texts = batch.column(spec.text_field).to_pylist()
            labels = batch.column(spec.label_field).to_pylist() if spec.label_field else [None] * len(texts)
            for text, label in zip(texts, labels):
                sid = row
                row += 1
                if keep is not None and not keep[sid]:
                    continue
                if text is None or ((label_map is not None or regression) and label is None):
                    continue  # rows without text/label carry nothing to learn from
                lab: int | float | None = None
                if regression:
                    lab = regression_label(label, spec.input, spec.label_field)
                elif label_map is not None:
                    lab = label_map[label_key(label, spec.input, spec.label_field)]
                split = assign(None if regression else lab)  # float labels: one stratum
                writers[split].add(sid, str(text), lab, tok, max_length)
        manifests = {}
        for w in writers:
            w.close(tok, max_length)
            if w.dropped_tokens:
                log.info("%s: packed into %d blocks of %d tokens; the last %d tokens (less than a block) are left out",
                         w.name, w.blocks, max_length, w.dropped_tokens)
            n = sum(s.rows for s in w.shards)
            if n == 0 and w.name == "train":
                raise UserError(f"the train split of '{redact_uri(spec.input)}' would be empty; use more rows or a "
                                f"larger train fraction in {named('split')}")
            m = Manifest(
                split=w.name, task=task, num_rows=n, shards=w.shards,
                max_length=max_length if spec.tokenize else None,
                tokenizer=tokenizer_fingerprint(tok) if spec.tokenize else None,
                label_names=(label_names or [str(k) for k in label_map]) if label_map else None,
                label_counts=[w.label_counts.get(i, 0) for i in range(len(label_map))] if label_map else None,
                token_lengths=length_stats(w.full_lengths, max_length) if spec.tokenize and not spec.pack else None,
                columns=shard_columns(spec.tokenize, spec.keep_text, label_map is not None or regression, regression),
                label_stats=label_stats(w.label_sums) if regression else None,
                source=redact_uri(spec.input), prepare=spec_record(spec, task, seed, max_length))
            with open(os.path.join(tmp, w.name, MANIFEST), "w") as f:
                f.write(m.to_json())
            manifests[w.name] = m
        for w in writers:
            if manifests[w.name].num_rows:
                storage.upload_dir(os.path.join(tmp, w.name), join_uri(output, w.name), cfg, last=MANIFEST)
    return manifests


def label_key(value: Any, uri: str, field: str | None) -> int | str | None:
    """One raw label value as the key the label map uses, the same in both passes over the input.

    The formats type labels differently (JSON and Parquet keep numbers and booleans, CSV infers
    them), so labels are normalised here, once: a whole-number float (``1.0``) is the integer class
    ``1``; a boolean is the named class ``"false"``/``"true"`` (sorted names, so ids 0/1, whether it
    came from JSON ``true`` or CSV ``True``); strings are names. Anything else (a fraction, NaN, a
    list, an object) is not a class and is refused with one line, never a KeyError later.
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if math.isfinite(value) and float(value).is_integer():
            return int(value)
        raise UserError(f"input '{redact_uri(uri)}': label {value!r} is not a whole number (column {field!r}); "
                        f"labels must be integers 0..K-1 or class names")
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise UserError(f"input '{redact_uri(uri)}': label {shown} in column {field!r} is a {type(value).__name__}, "
                    f"not a class; labels must be integers 0..K-1 or class names")


def _label_map(values: dict[Any, int], names: list[str] | None, uri: str) -> dict[Any, int]:
    """Label key (see :func:`label_key`) -> class id. Integer labels must already be 0..K-1; strings
    are named classes; a mix of both is refused (which integer would be which name?)."""
    vals = [v for v in values if v is not None]
    if not vals:
        raise UserError(f"input '{redact_uri(uri)}' has no labels in the label column; check {named('label_field')}")
    ints = [v for v in vals if isinstance(v, int)]
    if ints and len(ints) != len(vals):
        name = next(v for v in vals if not isinstance(v, int))
        raise UserError(f"input '{redact_uri(uri)}' mixes integer labels ({ints[0]}) and class names ({name!r}); "
                        f"use integers 0..K-1 or names throughout")
    if ints:
        top = max(vals)
        if min(vals) < 0:
            raise UserError(f"input '{redact_uri(uri)}' has negative label {min(vals)}; labels must be 0..K-1 or names")
        k = len(names) if names else top + 1
        if k > MAX_CLASSES:
            raise UserError(f"input '{redact_uri(uri)}' has label {top}: integer labels are class ids 0..K-1 and "
                            f"more than {MAX_CLASSES} classes is not a classification data set; check {named('label_field')}")
        if top >= k:
            raise UserError(f"input '{redact_uri(uri)}' has label {top} but only {k} label names were given; "
                            f"labels must be 0..{k - 1}")
        return {i: i for i in range(k)} if not names else {i: i for i in range(len(names))}
    strs = sorted(str(v) for v in vals)
    if names:
        unknown = [v for v in strs if v not in names]
        if unknown:
            raise UserError(f"input '{redact_uri(uri)}' has label {unknown[0]!r} not in {named('label_names')} "
                            f"({', '.join(names)}); add it or fix the data")
        return {n: i for i, n in enumerate(names)}
    return {v: i for i, v in enumerate(strs)}
