"""``ftdist predict MODEL --input URI --output URI``: score a data set with an exported model on Ray Data.

The pipeline: a streaming read of the input (JSONL, CSV, Parquet, or a split prepared by ``ftdist
data prepare``; local or ``s3://``) -> batched inference on an autoscaling actor pool (each actor
loads the model once; GPUs where the cluster has them) -> the driver writes the results as
numbered Parquet shards and, last, ``_ftdist_predict.json`` (the completion marker, as exports have).

Why the driver writes: an output row is tiny (id, label, a few scores) next to the model's work, so
one writer costs little and gives an exact rows/s and ETA, numbered shards and a marker that is
written only after every shard. Memory stays bounded whatever the input size: Ray Data streams with
backpressure and the driver holds one batch at a time.

A prepared split is scored from its stored token ids (exactly what training evaluated); raw files
are tokenized by the same code as training (``ftdist.inference``). Output columns: ``id`` (the
input's id field; ``sample_id`` for a prepared split), then ``label``, ``label_id``, ``scores``
for classification, or ``loss``, ``perplexity``, ``tokens`` for a causal LM.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ftdist import storage
from ftdist.config import StorageSection
from ftdist.uri import join_uri
from ftdist.errors import UserError
from ftdist.failures import error_line_from_ray, user_error_from_ray
from ftdist.inference import CLASSIFICATION, ExportInfo, Predictor, locate_export
from ftdist.redaction import redact_uri
from ftdist.run_folder import RUN_MARKER, is_checkpoint

log = logging.getLogger(__name__)
# Written last: the output is complete. The '_' prefix makes Parquet readers (pyarrow datasets, pandas,
# Spark) skip it, so the folder reads as a data set as it is; an earlier ftdist's name is still known.
PREDICT_MARKER = "_ftdist_predict.json"
EARLIER_PREDICT_MARKERS = ("ftdist_predict.json",)
MANIFEST = "manifest.json"  # a prepared split's (ftdist.data.manifest owns the format)
FORMATS = ("auto", "jsonl", "csv", "parquet")
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class PredictOptions:
    model: str
    input: str
    output: str
    format: str = "auto"
    text_field: str = "text"
    id_field: str = "id"
    batch_size: int = 64
    workers: int | None = None  # actor pool's upper bound; None: what the cluster's CPUs/GPUs allow
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 where the cluster has GPUs, else 0
    rows_per_file: int = 100_000
    overwrite: bool = False
    address: str | None = None
    storage: StorageSection = field(default_factory=StorageSection)


@dataclass(frozen=True)
class Source:
    """The input as Ray Data will read it."""

    format: str  # jsonl | csv | parquet
    files: list[str]  # URIs
    id_column: str
    text_column: str | None  # None: token ids are read from input_ids (a tokenized prepared split)
    rows: int | None  # exact (Parquet footers, a manifest) or estimated (bytes / bytes per row); None unknown
    exact: bool


def inspect_input(opts: PredictOptions) -> Source:
    """What to read and which columns, checked on the driver before Ray starts: a wrong path or a
    missing column is one line, not a failed Ray task."""
    uri, cfg = opts.input.rstrip("/"), opts.storage
    if not storage.exists(uri, cfg):
        raise UserError(f"input '{redact_uri(uri)}' does not exist; check --input")
    if storage.exists(join_uri(uri, MANIFEST), cfg):
        return _prepared_split(uri, cfg)
    fs, path = storage.filesystem(uri, cfg)
    if storage.retrying(lambda: fs.isdir(path), uri, "listing", cfg):
        if any(storage.exists(join_uri(uri, s, MANIFEST), cfg) for s in ("train", "validation", "test")):
            raise UserError(f"input '{redact_uri(uri)}' is a prepared data set; name one split, e.g. "
                            f"--input {redact_uri(uri)}/test")
        files = [join_uri(uri, n) for n in storage.listdir(uri, cfg) if not n.startswith((".", "_"))]
        files = [f for f in files if opts.format != "auto" or _ext_format(f)]
        if not files:
            raise UserError(f"input folder '{redact_uri(uri)}' holds no .jsonl/.csv/.parquet files; check --input")
    else:
        files = [uri]
    fmt = opts.format if opts.format != "auto" else _ext_format(files[0])
    if fmt is None:
        raise UserError(f"cannot tell the format of '{redact_uri(files[0])}' from its name; pass --format jsonl|csv|parquet")
    if opts.format == "auto" and len({_ext_format(f) for f in files}) > 1:
        raise UserError(f"input folder '{redact_uri(uri)}' mixes formats; keep one format per folder")
    _check_files(uri, files, fmt, opts)
    rows, exact = _count_rows(files, fmt, cfg)
    return Source(fmt, files, opts.id_field, opts.text_field, rows, exact)


def _check_files(uri: str, files: list[str], fmt: str, opts: PredictOptions) -> None:
    """Every file has the text and id columns, and the ids are of one kind across the files: Arrow
    cannot put integer ids of one file and text ids of another into one column, and fails deep
    inside Ray if asked to."""
    first: tuple[str, str] | None = None  # (file, id kind)
    for f in files:
        head = _head(f, fmt, opts.storage)
        for flag, name in (("--text-field", opts.text_field), ("--id-field", opts.id_field)):
            if name not in head.columns:
                raise UserError(f"input '{redact_uri(f)}' has no column {name!r} (columns: {', '.join(head.columns)}); "
                                f"set {flag}" + ("; every output row carries its input row's id"
                                                 if flag == "--id-field" else ""))
        kind = head.kinds.get(opts.id_field)
        if kind is None:
            continue
        if first is None:
            first = (f, kind)
        elif kind != first[1]:
            raise UserError(f"input folder '{redact_uri(uri)}' mixes id types: '{_name(f)}' has {kind} ids but "
                            f"'{_name(first[0])}' has {first[1]} ids; give column {opts.id_field!r} one type in "
                            f"every file")


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _ext_format(uri: str) -> str | None:
    return EXTENSIONS.get(os.path.splitext(uri.lower())[1])


def _prepared_split(uri: str, cfg: StorageSection) -> Source:
    from ftdist.data.manifest import load_manifest

    m = load_manifest(uri, cfg)
    files = [join_uri(uri, s.file) for s in m.shards]
    return Source("parquet", files, "sample_id", None if m.tokenized else "text", m.num_rows, True)


@dataclass(frozen=True)
class FileHead:
    """A file's column names and, where its first row or footer tells, each column's kind of value."""

    columns: list[str]
    kinds: dict[str, str]  # column -> "integer" | "number" | "text" | "boolean" | an Arrow type name


BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark (Excel's "CSV UTF-8"); Arrow's readers skip it too


def _head(uri: str, fmt: str, cfg: StorageSection) -> FileHead:
    """The file's columns from its first non-blank line (JSONL, CSV) or its footer (Parquet).

    Why each refusal: an empty file, a damaged Parquet footer or undecodable bytes would otherwise
    surface as "no column 'text'" or as a traceback from inside Ray, naming neither file nor fix."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri, cfg)
    where = redact_uri(uri)

    def read() -> bytes | pa.Schema:
        with fs.open(path, "rb") as f:
            if fmt == "parquet":
                return pq.ParquetFile(f).schema_arrow
            return f.read(1 << 20)

    try:
        head = storage.retrying(read, uri, "reading", cfg)
    except (pa.ArrowException, OSError) as e:
        if fmt == "parquet":
            raise UserError(f"input '{where}' is not a readable Parquet file ({str(e).splitlines()[0][:80]}); "
                            f"replace the file or check --format") from None
        raise UserError(f"input '{where}' could not be read as {fmt} ({type(e).__name__}); check --format") from None
    if isinstance(head, pa.Schema):
        return FileHead(list(head.names), {f.name: _arrow_kind(f.type) for f in head})
    line = next((ln for ln in head.removeprefix(BOM).splitlines() if ln.strip()), b"")
    if not line:
        raise UserError(f"input '{where}' is empty; remove it from --input or give a file with rows")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"input '{where}' is not UTF-8 text; save it as UTF-8 or check --format") from None
    if fmt == "csv":
        import csv

        columns = next(csv.reader([text]), [])
        return FileHead(columns, dict.fromkeys(columns, "text"))  # CSV values are read as text (ids keep "007")
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"input '{where}' is not JSON Lines (its first line is not a JSON object); "
                        f"check --format") from None
    if not isinstance(record, dict):
        return FileHead([], {})
    return FileHead(list(record), {k: _json_kind(v) for k, v in record.items() if v is not None})


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "text"}.get(type(value), type(value).__name__)


def _arrow_kind(t: Any) -> str:
    import pyarrow as pa

    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    return "boolean" if pa.types.is_boolean(t) else str(t)


def _count_rows(files: list[str], fmt: str, cfg: StorageSection) -> tuple[int | None, bool]:
    """Rows in the input for the ETA: exact for Parquet (footers only); for text formats the total
    size over the mean size of the first MiB's rows (an estimate, said so in the progress line)."""
    import pyarrow.parquet as pq

    sizes = []
    for f in files:
        fs, path = storage.filesystem(f, cfg)
        if fmt == "parquet":
            with fs.open(path, "rb") as fh:
                sizes.append(pq.ParquetFile(fh).metadata.num_rows)
        else:
            sizes.append(int(fs.size(path)))
    if fmt == "parquet":
        return sum(sizes), True
    fs, path = storage.filesystem(files[0], cfg)
    with fs.open(path, "rb") as fh:
        head = fh.read(1 << 20)
    lines = head.count(b"\n") - (1 if fmt == "csv" else 0)
    if lines <= 0:
        return None, False
    per_row = len(head[:head.rfind(b"\n") + 1]) / (lines + (1 if fmt == "csv" else 0))
    return max(1, round(sum(sizes) / per_row)), False


# ---------------------------------------------------------------------------------------------
# The actor


class PredictWorker:
    """One model per actor; Ray Data calls it with Arrow batches of (id, text | input_ids)."""

    def __init__(self, model: str, storage_json: str, source: Source, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.source = source
        self.predictor = Predictor(model, StorageSection.model_validate_json(storage_json))

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        ids = batch.column(self.source.id_column)
        if self.source.text_column is None:
            rows = self.predictor.predict_ids(batch.column("input_ids").to_pylist())
        else:
            texts = batch.column(self.source.text_column).to_pylist()
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise UserError(f"input row with id {ids[i].as_py()!r}: field {self.source.text_column!r} is "
                                    f"{type(t).__name__}, not text; fix the row or drop it")
            rows = self.predictor.predict_texts(texts)
        return pa.table({"id": ids, **_result_columns(rows, self.predictor.info.task)})


def _result_columns(rows: list[dict[str, Any]], task: str) -> dict[str, Any]:
    import pyarrow as pa

    if task == CLASSIFICATION:
        return {"label": pa.array([r["label"] for r in rows], pa.string()),
                "label_id": pa.array([r["label_id"] for r in rows], pa.int32()),
                "scores": pa.array([r["scores"] for r in rows], pa.list_(pa.float32()))}
    return {"loss": pa.array([r["loss"] for r in rows], pa.float64()),
            "perplexity": pa.array([r["perplexity"] for r in rows], pa.float64()),
            "tokens": pa.array([r["tokens"] for r in rows], pa.int32())}


# ---------------------------------------------------------------------------------------------
# The driver


PREDICT_FILE = re.compile(r"^part-\d{5}\.parquet$")  # what ShardWriter names its shards


def check_output(opts: PredictOptions, info: ExportInfo) -> None:
    """Refuse an ``--output`` whose replacement would destroy something, before anything is touched.

    Why: ``--overwrite`` replaces the output, so an output that is, holds or lies inside the input,
    the model or any ftdist run or export would lose them; an output holding files ftdist predict
    did not write is somebody else's folder. Without ``--overwrite`` an existing output is refused."""
    out, cfg = opts.output.rstrip("/"), opts.storage
    where = redact_uri(out)
    if storage.is_remote(out) and "/" not in out.partition("://")[2].strip("/"):
        raise UserError(f"--output '{where}' is a bucket root; nothing was removed: name a folder inside it, "
                        f"e.g. {where}/predictions")
    guarded = [("input", opts.input), ("model", opts.model), ("model", info.uri)]
    for what, uri in guarded:
        relation = _relation(out, uri)
        if relation:
            raise UserError(f"--output '{where}' {relation} the {what} '{redact_uri(uri.rstrip('/'))}'; nothing "
                            f"was removed: choose an --output outside it")
    for folder, what in _ftdist_folders_around(out, cfg):
        relation = "is" if folder == out else "lies inside"
        raise UserError(f"--output '{where}' {relation} the {what} '{redact_uri(folder)}'; nothing was removed: "
                        f"choose an --output outside it")
    if not storage.exists(out, cfg) and not storage.listdir(out, cfg):
        return
    if not opts.overwrite:
        raise UserError(f"output '{where}' already exists; pass --overwrite to replace it or choose another --output")
    fs, path = storage.filesystem(out, cfg)
    if not storage.retrying(lambda: fs.isdir(path), out, "listing", cfg):
        raise UserError(f"--output '{where}' is a file, not the folder of an earlier ftdist predict; nothing was "
                        f"removed: choose another --output")
    foreign = [n for n in storage.listdir(out, cfg)
               if n not in (PREDICT_MARKER, *EARLIER_PREDICT_MARKERS) and not PREDICT_FILE.match(n)]
    if foreign:
        raise UserError(f"--output '{where}' holds files ftdist predict did not write ({', '.join(map(repr, foreign[:3]))}"
                        f"{', ...' if len(foreign) > 3 else ''}); nothing was removed: choose another --output")


def _location(uri: str) -> str:
    """A comparable form of ``uri``: a local path resolved (symlinks, ``..``), a remote one as written."""
    uri = uri.rstrip("/")
    if storage.is_remote(uri):
        return uri
    return os.path.realpath(storage.local_path(uri))


def _relation(out: str, other: str) -> str | None:
    """"is", "holds" or "lies inside": how ``out`` overlaps ``other``; None if they are apart."""
    a, b = _location(out), _location(other)
    if a == b:
        return "is"
    if b.startswith(a.rstrip("/") + "/"):
        return "holds"
    if a.startswith(b.rstrip("/") + "/"):
        return "lies inside"
    return None


def _ftdist_folders_around(out: str, cfg: StorageSection) -> list[tuple[str, str]]:
    """The ftdist run folders, exports and prepared splits that ``out`` is or lies inside, nearest first
    (their markers: ``ftdist_run.json``, ``ftdist_export.json``, ``manifest.json``)."""
    from ftdist.export_files import EXPORT_MARKER

    found = []
    markers = ((RUN_MARKER, "ftdist run folder"), (EXPORT_MARKER, "ftdist export"), (MANIFEST, "prepared split"))
    folder = out
    while True:
        if is_checkpoint(_name(folder)):
            found.append((folder, "checkpoint"))
        for marker, what in markers:
            if storage.exists(join_uri(folder, marker), cfg):
                found.append((folder, what))
        parent = _parent(folder)
        if parent is None:
            return found
        folder = parent


def _parent(uri: str) -> str | None:
    """The folder holding ``uri``; None at a filesystem root or a bucket."""
    if storage.is_remote(uri):
        scheme, _, path = uri.partition("://")
        head = path.strip("/").rpartition("/")[0]
        return f"{scheme}://{head}" if head else None
    path = os.path.abspath(storage.local_path(uri))
    parent = os.path.dirname(path)
    return parent if parent != path else None


def staging_uri(output: str) -> str:
    """A hidden sibling of ``output`` to write into: the previous output stays as it is until the new
    one is complete (then ``storage.replace_dir`` swaps it in), and an input folder listing skips it."""
    out = output.rstrip("/")
    head, _, name = out.rpartition("/")
    return f"{head}/.{name}.predict-{uuid.uuid4().hex[:8]}" if head else f".{name}.predict-{uuid.uuid4().hex[:8]}"


def pool_size(opts: PredictOptions, resources: dict[str, float]) -> tuple[int, float]:
    """(actors at most, GPUs per actor) for what the cluster has. CPU actors leave a quarter CPU
    for the read tasks: on a 2-CPU machine a pool that takes every CPU starves the reads."""
    gpus = opts.gpus_per_worker if opts.gpus_per_worker is not None else (1.0 if resources.get("GPU", 0) > 0 else 0.0)
    if opts.workers:
        return opts.workers, gpus
    if gpus:
        return max(1, int(resources.get("GPU", 0) // gpus)), gpus
    return max(1, int((resources.get("CPU", 1) - 0.25) // opts.cpus_per_worker)), gpus


def run_predict(opts: PredictOptions, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score ``opts.input`` into ``opts.output``; returns the completion record (also written as
    ``_ftdist_predict.json``). Starts a local Ray cluster unless one is connected or addressed."""
    info = locate_export(opts.model, opts.storage)  # before Ray: an incomplete folder is refused at once
    source = inspect_input(opts)
    check_output(opts, info)
    say = progress or _stderr
    staged = staging_uri(opts.output)
    started_ray = _connect(opts.address)
    try:
        try:
            record = _execute(opts, info, source, staged, say)
        except BaseException:  # a failure or Ctrl-C: no partial output is left; a previous one is untouched
            _discard(staged, opts.storage)
            raise
        storage.replace_dir(staged, opts.output.rstrip("/"), opts.storage, last=PREDICT_MARKER)
        return record
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _discard(uri: str, cfg: StorageSection) -> None:
    """Remove an unfinished staged output; a failure to do so is logged, never hides the first error."""
    try:
        storage.remove(uri, cfg)
    except Exception as e:  # noqa: BLE001 - best effort: the original error is what the user needs
        log.warning("could not remove the unfinished output '%s' (%s); delete it by hand", redact_uri(uri), e)


def _stderr(line: str) -> None:
    sys.stderr.write(f"[ftdist] {line}\n")
    sys.stderr.flush()


def _connect(address: str | None) -> bool:
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    from ftdist.ray_cluster import init_ray  # the one ray.init: local mode never joins a recorded cluster

    init_ray(address, {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}, logging_level=logging.WARNING)
    return True


def _dataset(opts: PredictOptions, source: Source) -> Any:
    import ray

    import pyarrow as pa
    from pyarrow import csv

    fs, _ = storage.pyarrow_filesystem(source.files[0], opts.storage)
    paths = [storage.filesystem(f, opts.storage)[1] for f in source.files]
    # CSV columns are read as text: Arrow's type inference would turn ids such as 007 into the integer 7,
    # and the id is what ties an output row to its input row
    as_text = csv.ConvertOptions(column_types={c: pa.string() for c in (source.id_column, source.text_column) if c})
    read = {"jsonl": lambda: ray.data.read_json(paths, filesystem=fs, num_cpus=0.25),
            "csv": lambda: ray.data.read_csv(paths, filesystem=fs, num_cpus=0.25, convert_options=as_text),
            "parquet": lambda: ray.data.read_parquet(paths, filesystem=fs, num_cpus=0.25)}[source.format]
    columns = [source.id_column, source.text_column or "input_ids"]
    return read().select_columns(columns)


def _execute(opts: PredictOptions, info: ExportInfo, source: Source, staged: str,
             say: Callable[[str], None]) -> dict[str, Any]:
    """Run the pipeline, writing shards and the marker into ``staged`` (see ``staging_uri``)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ftdist's own progress line below says rows/s and ETA
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # plan and "execution finished" lines
    workers, gpus = pool_size(opts, ray.cluster_resources())
    threads = max(1, math.floor(opts.cpus_per_worker))
    ds = _dataset(opts, source).map_batches(
        PredictWorker, fn_constructor_args=(info.uri, opts.storage.model_dump_json(), source, threads),
        batch_size=opts.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
        num_cpus=opts.cpus_per_worker, num_gpus=gpus)
    total = f"{'' if source.exact else '~'}{source.rows:,}" if source.rows else "?"
    say(f"predict: {redact_uri(opts.input)} ({source.format}, {total} rows) with {redact_uri(info.uri)} on up to "
        f"{workers} worker(s), batch {opts.batch_size}{f', {gpus:g} GPU each' if gpus else ''}")
    writer = ShardWriter(staged, opts.storage, opts.rows_per_file)
    t0 = last = time.monotonic()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.write(batch)
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S:
                last = now
                say(progress_line(writer.rows, source.rows, source.exact, now - t0))
    except Exception as e:
        raise _input_error(e, opts, source) from None
    finally:
        writer.close()
    elapsed = time.monotonic() - t0
    say(progress_line(writer.rows, writer.rows, True, elapsed))
    record = {"rows": writer.rows, "files": writer.files, "seconds": round(elapsed, 3),
              "rows_per_s": round(writer.rows / elapsed, 2) if elapsed else None, "input": redact_uri(opts.input),
              "workers": workers, "batch_size": opts.batch_size, **info.metadata()}
    storage.write_text(join_uri(staged, PREDICT_MARKER), json.dumps(record, indent=1), opts.storage)
    return record


def _input_error(e: Exception, opts: PredictOptions, source: Source) -> Exception:
    """A failure inside Ray as the user's one line where it is about the input; else unchanged."""
    user = user_error_from_ray(e)
    if user is not None:
        return user
    for cls in ("ArrowInvalid", "JSONDecodeError", "UnicodeDecodeError", "ParserError"):
        line = error_line_from_ray(e, cls)
        if line is not None:
            row = _bad_jsonl_row(source, opts) if source.format == "jsonl" else None
            if row is not None:
                return row
            return UserError(f"input '{redact_uri(opts.input)}' could not be parsed as {source.format}: "
                             f"{line[:160]}; check the file and --format")
    return e


DIAGNOSE_LINES = 1_000_000  # lines the driver scans for the row Ray's JSON reader failed on


def _bad_jsonl_row(source: Source, opts: PredictOptions) -> UserError | None:
    """The first JSONL row Arrow cannot read, found on the driver after Ray's reader failed.

    Why: Ray falls back to Python's parser on the whole block when Arrow's fails, and reports that
    parser's error ("Extra data: line 2 column 1"), which names neither the row nor the problem.
    Arrow refuses a row whose id type differs from earlier rows' and a string holding an unpaired
    UTF-16 surrogate (Python's json accepts both). None if the first lines show nothing."""
    kind: str | None = None
    scanned = 0
    for f in source.files:
        where = redact_uri(f)
        fs, path = storage.filesystem(f, opts.storage)
        with fs.open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                scanned += 1
                if scanned > DIAGNOSE_LINES:
                    return None
                try:
                    record = json.loads(raw.removeprefix(BOM).decode("utf-8")) if raw.strip() else {}
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    return UserError(f"input '{where}' line {n} is not JSON ({e}); fix or drop the line")
                if not isinstance(record, dict):
                    return UserError(f"input '{where}' line {n} is not a JSON object; fix or drop the line")
                for name, value in record.items():
                    if isinstance(value, str) and not _is_unicode(value):
                        return UserError(f"input '{where}' line {n}: field {name!r} holds an unpaired surrogate "
                                         f"(an escape such as \\udc80), which is not valid Unicode; fix the row")
                value = record.get(opts.id_field)
                if value is None:
                    continue
                row_kind = _json_kind(value)
                if kind is None:
                    kind = row_kind
                elif row_kind != kind:
                    return UserError(f"input '{where}' line {n}: id {value!r} is {row_kind} but earlier rows have "
                                     f"{kind} ids; give column {opts.id_field!r} one type")
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def progress_line(done: int, total: int | None, exact: bool, elapsed: float) -> str:
    """``12,000/100,000 rows (12%), 850 rows/s, ETA 1m32s``; totals of text inputs are estimates."""
    rate = done / elapsed if elapsed > 0 else 0.0
    if not total:
        return f"{done:,} rows, {rate:,.0f} rows/s"
    share = min(done / total, 1.0)
    eta = max(total - done, 0) / rate if rate else float("inf")
    eta_s = "?" if math.isinf(eta) else f"{int(eta // 60)}m{int(eta % 60):02d}s"
    return (f"{done:,}/{'' if exact else '~'}{total:,} rows ({share:.0%}), {rate:,.0f} rows/s, ETA {eta_s}")


class ShardWriter:
    """``part-00000.parquet``, ``part-00001.parquet``, ... of at most ``rows_per_file`` rows each."""

    def __init__(self, uri: str, cfg: StorageSection, rows_per_file: int) -> None:
        self.uri, self.cfg, self.rows_per_file = uri, cfg, rows_per_file
        self.rows, self.files = 0, 0
        self._writer: Any = None
        self._handle: Any = None
        self._in_file = 0

    def write(self, table: Any) -> None:
        offset = 0
        while offset < table.num_rows:
            if self._writer is None:
                self._open(table.schema)
            take = min(table.num_rows - offset, self.rows_per_file - self._in_file)
            self._writer.write_table(table.slice(offset, take))
            offset += take
            self._in_file += take
            self.rows += take
            if self._in_file >= self.rows_per_file:
                self._close_file()

    def _open(self, schema: Any) -> None:
        import pyarrow.parquet as pq

        uri = join_uri(self.uri, f"part-{self.files:05d}.parquet")
        fs, path = storage.filesystem(uri, self.cfg)
        if not storage.is_remote(uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self._handle = fs.open(path, "wb")
        self._writer = pq.ParquetWriter(self._handle, schema)
        self.files += 1
        self._in_file = 0

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._handle.close()
        self._writer = self._handle = None

    def close(self) -> None:
        self._close_file()
