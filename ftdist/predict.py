"""``ftdist predict MODEL --input URI --output URI``: score a data set with an exported model on Ray Data.

The pipeline: a streaming read of the input (JSONL, CSV, Parquet, or a split prepared by ``ftdist
data prepare``; local or ``s3://``) -> batched inference on an autoscaling actor pool (each actor
loads the model once; GPUs where the cluster has them) -> the driver writes the results as
numbered Parquet shards and, last, ``ftdist_predict.json`` (the completion marker, as exports have).

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
import sys
import time
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

PREDICT_MARKER = "ftdist_predict.json"  # written last: the output is complete
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
    columns = _columns(files[0], fmt, cfg)
    for flag, name in (("--text-field", opts.text_field), ("--id-field", opts.id_field)):
        if name not in columns:
            raise UserError(f"input '{redact_uri(files[0])}' has no column {name!r} (columns: {', '.join(columns)}); "
                            f"set {flag}" + ("; every output row carries its input row's id" if flag == "--id-field" else ""))
    rows, exact = _count_rows(files, fmt, cfg)
    return Source(fmt, files, opts.id_field, opts.text_field, rows, exact)


def _ext_format(uri: str) -> str | None:
    return EXTENSIONS.get(os.path.splitext(uri.lower())[1])


def _prepared_split(uri: str, cfg: StorageSection) -> Source:
    from ftdist.data.manifest import load_manifest

    m = load_manifest(uri, cfg)
    files = [join_uri(uri, s.file) for s in m.shards]
    return Source("parquet", files, "sample_id", None if m.tokenized else "text", m.num_rows, True)


def _columns(uri: str, fmt: str, cfg: StorageSection) -> list[str]:
    """The first file's column names, from its first line (JSONL, CSV) or its footer (Parquet)."""
    import csv

    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri, cfg)

    def read() -> str | list[str]:
        with fs.open(path, "rb") as f:
            if fmt == "parquet":
                return list(pq.ParquetFile(f).schema_arrow.names)
            return f.readline(1 << 20).decode("utf-8")

    try:
        head = storage.retrying(read, uri, "reading", cfg)
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"input '{redact_uri(uri)}' could not be read as {fmt} ({type(e).__name__}); "
                        f"check --format") from None
    if isinstance(head, list):
        return head
    if fmt == "csv":
        return next(csv.reader([head]), [])
    try:
        record = json.loads(head) if head.strip() else {}
    except json.JSONDecodeError:
        raise UserError(f"input '{redact_uri(uri)}' is not JSON Lines (its first line is not a JSON object); "
                        f"check --format") from None
    return list(record) if isinstance(record, dict) else []


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


def check_output(opts: PredictOptions) -> None:
    """Refuse to mix results into an existing output unless --overwrite (then it is removed first)."""
    if storage.listdir(opts.output, opts.storage) or storage.exists(opts.output, opts.storage):
        if not opts.overwrite:
            raise UserError(f"output '{redact_uri(opts.output)}' already exists; pass --overwrite to replace it or "
                            f"choose another --output")
        storage.remove(opts.output, opts.storage)


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
    ``ftdist_predict.json``). Starts a local Ray cluster unless one is connected or addressed."""
    info = locate_export(opts.model, opts.storage)  # before Ray: an incomplete folder is refused at once
    source = inspect_input(opts)
    check_output(opts)
    say = progress or _stderr
    started_ray = _connect(opts.address)
    try:
        return _execute(opts, info, source, say)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


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

    fs, _ = storage.pyarrow_filesystem(source.files[0], opts.storage)
    paths = [storage.filesystem(f, opts.storage)[1] for f in source.files]
    read = {"jsonl": lambda: ray.data.read_json(paths, filesystem=fs, num_cpus=0.25),
            "csv": lambda: ray.data.read_csv(paths, filesystem=fs, num_cpus=0.25),
            "parquet": lambda: ray.data.read_parquet(paths, filesystem=fs, num_cpus=0.25)}[source.format]
    columns = [source.id_column, source.text_column or "input_ids"]
    return read().select_columns(columns)


def _execute(opts: PredictOptions, info: ExportInfo, source: Source, say: Callable[[str], None]) -> dict[str, Any]:
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
    writer = ShardWriter(opts.output, opts.storage, opts.rows_per_file)
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
    storage.write_text(join_uri(opts.output, PREDICT_MARKER), json.dumps(record, indent=1), opts.storage)
    return record


def _input_error(e: Exception, opts: PredictOptions, source: Source) -> Exception:
    """A failure inside Ray as the user's one line where it is about the input; else unchanged."""
    user = user_error_from_ray(e)
    if user is not None:
        return user
    for cls in ("ArrowInvalid", "JSONDecodeError", "UnicodeDecodeError", "ParserError"):
        line = error_line_from_ray(e, cls)
        if line is not None:
            return UserError(f"input '{redact_uri(opts.input)}' could not be parsed as {source.format}: "
                             f"{line[:160]}; check the file and --format")
    return e


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
