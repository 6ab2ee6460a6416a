"""``ftdist`` command line: train, data prepare, tune, pipeline, submit, config show, predict, serve.

User errors (:class:`ftdist.errors.UserError`) print one line and exit 2; ``--debug`` shows the
traceback. Anything else is an internal error and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, NoReturn

from ftdist.errors import RunFailed, UserError


def _env_defaults() -> None:
    # Quiet, offline-friendly defaults; users can override them in their environment.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if not (sys.stdout.isatty() and sys.stderr.isatty()):  # a log file or a pipe: no colour codes in it
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (see README config reference)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key by dotted path, e.g. --set train.learning_rate=3e-5 (repeatable)")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (like every other user error) and exit 2."""

    def error(self, message: str) -> "NoReturn":
        self.exit(2, f"ftdist: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ftdist", description="Distributed fine-tuning: Ray Train + DeepSpeed")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="fine-tune (or resume) a run from a config")
    _add_config_args(p)
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")

    p = sub.add_parser("submit", help="run `ftdist train CONFIG` (or `ftdist pipeline FILE` for a pipeline file) "
                                      "as a job on a Ray cluster (Ray Job SDK)")
    _add_config_args(p)
    p.add_argument("--address", required=True, help="Ray job server, e.g. http://HEAD:8265")
    p.add_argument("--follow", action="store_true", help="stream the job's logs and exit with its status")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="non-secret environment variable for the job (repeatable)")

    p = sub.add_parser("init", help="write a commented starter config for your own CSV (columns detected)")
    p.add_argument("--csv", required=True, help="the CSV (or .tsv) file or URI: a header line, then one text per row")
    p.add_argument("--output", help="the config file to write (default: NAME.yaml here, NAME from the CSV's name)")
    p.add_argument("--text", help="the text column (default: detected, the longest non-numeric column)")
    p.add_argument("--label", help="the label column (default: detected, a column with few distinct values)")
    p.add_argument("--model", default=None, help="model folder or URI (default: the demo's all-MiniLM-L6-v2)")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")

    p = sub.add_parser("config", help="print the fully resolved config (secrets redacted)")
    _add_config_args(p)

    p = sub.add_parser("tune", help="hyperparameter sweep (Ray Tune) over a base run config")
    p.add_argument("spec", help="sweep spec YAML (see README, Sweeps; examples in tune/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key (num_samples=4, 'scheduler={type: fifo}') or a base config key "
                        "(train.epochs=2) by dotted path (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")

    p = sub.add_parser("pipeline", help="run stages in order (e.g. domain-adaptive MLM, then the task), "
                                        "measuring forgetting after each")
    p.add_argument("spec", help="pipeline YAML (see README, Pipelines; example: cluster/jobs/pipeline-dapt.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline key (storage.path=...) or, as STAGE:KEY=VALUE, a key of one stage's "
                        "config (task:train.epochs=2) (repeatable)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--print-config", metavar="STAGE",
                   help="print STAGE's resolved run config (its ${stage:...} references resolved) and exit: "
                        "e.g. the base of a sweep over that stage")

    _add_deploy_args(sub)

    data = sub.add_parser("data", help="data set tools").add_subparsers(dest="data_command", required=True,
                                                                       parser_class=_Parser)
    p = data.add_parser("prepare", help="tokenize JSONL/CSV/Parquet into streamable shards")
    p.add_argument("--input", required=True, help="raw file: local path or any fsspec URL (s3://...)")
    p.add_argument("--output", required=True, help="data set prefix to create (local or s3://...)")
    p.add_argument("--model", help="model or tokenizer path/hub id whose tokenizer to use (not needed with --raw-text)")
    p.add_argument("--task", default="sequence-classification", choices=["sequence-classification", "causal-lm", "masked-lm", "regression"],
                   help="regression: float labels, for a regression task of a multi-task run (tasks[].type)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--label-names", help="comma-separated class names in id order (default: sorted values)")
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,validation,test fractions")
    p.add_argument("--rows-per-shard", type=int, default=20000)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "csv", "parquet"])
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--limit", type=int, help="keep a seeded random sample of this many rows")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--raw-text", action="store_true",
                   help="store raw text, not token ids: workers tokenize on the fly with the model's tokenizer")
    p.add_argument("--keep-text", action="store_true", help="store the raw text next to the token ids")
    p.add_argument("--pack", action="store_true",
                   help="causal-lm/masked-lm: concatenate documents and cut max_length blocks (no padding)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing data set at --output")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    return parser


def positive_number(text: str) -> float:
    """argparse type: a finite number > 0. Why: ``float("nan")`` passes a ``<= 0`` check and then fails
    as a traceback deep in Ray; ``inf`` asks for a resource no cluster has."""
    value = _finite(text)
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number (fractions such as 0.5 are fine)")
    return value


def non_negative_number(text: str) -> float:
    """argparse type: a finite number >= 0 (for GPU shares, where 0 means none)."""
    value = _finite(text)
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def interrupted_message(command: str) -> str:
    """What Ctrl-C leaves behind and what rerunning the command does; each command differs."""
    if command == "tune":
        return "ftdist: interrupted; add --resume to continue the sweep from the latest checkpoint"
    if command == "predict":
        return ("ftdist: interrupted; the partial output was removed and any earlier --output is untouched: "
                "rerun the same command to start over")
    if command == "data":
        return ("ftdist: interrupted; data prepare keeps no partial state: rerun the same command to start over "
                "(add --overwrite if --output already holds some splits)")
    return "ftdist: interrupted; rerun the same command to resume from the latest checkpoint"


def _port(text: str) -> int:
    """argparse type: a TCP port. Why here: 70000 reached socket.bind as an OverflowError traceback."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (1-65535)")
    return port


def _add_deploy_args(sub: Any) -> None:
    """``ftdist predict`` and ``ftdist serve`` (see README, Deploying a model)."""
    model_help = "exported model: <run folder>/model, a run folder, a sweep folder (best_model) - local, s3:// or pkg://"
    p = sub.add_parser("predict", help="score a data set with an exported model (Ray Data) into Parquet shards")
    p.add_argument("model", help=model_help)
    p.add_argument("--input", required=True, help="JSONL/CSV/Parquet file or folder, or a prepared split (local or s3://)")
    p.add_argument("--output", required=True, help="folder for part-NNNNN.parquet shards (local or s3://)")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "csv", "parquet"])
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id", help="the input column copied to each output row (prepared splits: sample_id)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, help="inference actors at most (default: what the cluster's CPUs/GPUs allow)")
    p.add_argument("--cpus-per-worker", type=positive_number, default=1.0)
    p.add_argument("--gpus-per-worker", type=non_negative_number, help="default: 1 where the cluster has GPUs, else 0")
    p.add_argument("--rows-per-file", type=int, default=100_000)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")

    p = sub.add_parser("serve", help="serve an exported model over HTTP (Ray Serve, dynamic batching)")
    p.add_argument("model", help=model_help)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 in a container)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="replicas (the minimum when --max-replicas is set)")
    p.add_argument("--max-replicas", type=int, help="autoscale up to this many replicas on ongoing requests")
    p.add_argument("--cpus-per-replica", type=positive_number, default=1.0)
    p.add_argument("--gpus-per-replica", type=float, help="default: 1 where the cluster has GPUs, else 0")
    p.add_argument("--max-batch-size", type=int, default=32, help="texts per forward; 1 turns dynamic batching off")
    p.add_argument("--batch-wait-ms", type=non_negative_number, default=5.0, help="how long a batch waits to fill up")
    p.add_argument("--max-texts", type=int, default=64, help="texts per request at most (413 beyond)")
    p.add_argument("--max-text-chars", type=int, default=10_000, help="characters per text at most (413 beyond)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")


def cmd_predict(args: argparse.Namespace) -> int:
    from ftdist.config import StorageSection
    from ftdist.predict import PredictOptions, run_predict

    for flag, value in (("--batch-size", args.batch_size), ("--rows-per-file", args.rows_per_file),
                        ("--workers", args.workers)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value} must be >= 1")
    opts = PredictOptions(model=args.model, input=args.input, output=args.output, format=args.format,
                          text_field=args.text_field, id_field=args.id_field, batch_size=args.batch_size,
                          workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                          gpus_per_worker=args.gpus_per_worker, rows_per_file=args.rows_per_file,
                          overwrite=args.overwrite, address=args.address,
                          storage=StorageSection(endpoint_url=args.endpoint_url))
    record = run_predict(opts)
    print(json.dumps({k: record[k] for k in ("rows", "files", "seconds", "rows_per_s", "version")}
                     | {"output": args.output}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ftdist.config import StorageSection
    from ftdist.serve import Limits, ServeOptions, run_until_signalled

    opts = ServeOptions(model=args.model, host=args.host, port=args.port, replicas=args.replicas,
                        max_replicas=args.max_replicas, cpus_per_replica=args.cpus_per_replica,
                        gpus_per_replica=args.gpus_per_replica, max_batch_size=args.max_batch_size,
                        batch_wait_timeout_s=args.batch_wait_ms / 1000,
                        limits=Limits(max_texts=args.max_texts, max_text_chars=args.max_text_chars),
                        address=args.address, storage=StorageSection(endpoint_url=args.endpoint_url))
    return run_until_signalled(opts)


def cmd_train(args: argparse.Namespace) -> int:
    from ftdist.config import load_config
    from ftdist.launcher import format_summary, run_training

    started = time.time()
    overrides = list(args.overrides) + ([f"scaling.address={args.address}"] if args.address else [])
    cfg = load_config(args.config, overrides)
    summary = run_training(cfg, started_at=started)
    print(format_summary(summary), flush=True)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from ftdist.config import load_config, show_config

    print(show_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from ftdist.starter import DEFAULT_MODEL, write_starter

    path, found = write_starter(args.csv, args.output, args.text, args.label, args.model or DEFAULT_MODEL,
                                args.force)
    print(f"wrote {path}: text column {found.text!r}, label column {found.label!r} ({len(found.classes)} classes), "
          f"max_length {found.max_length}; check it, then: ftdist train {path}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ftdist.config import PrepareSection, StorageSection
    from ftdist.data.prepare import prepare

    try:
        split = [float(x) for x in args.split.split(",")]
    except ValueError:
        raise UserError(f"--split {args.split!r} must be three numbers like 0.8,0.1,0.1") from None
    _check_prepare_numbers(args)
    try:
        spec = PrepareSection(input=args.input, format=args.format, text_field=args.text_field,
                              label_field=args.label_field if args.task == "sequence-classification" else None,
                              split=split, rows_per_shard=args.rows_per_shard, encoding=args.encoding,
                              limit=args.limit, tokenize=not args.raw_text, keep_text=args.keep_text,
                              pack=args.pack)
        cfg = StorageSection(endpoint_url=args.endpoint_url)
    except ValidationError as e:  # a check above is missing: still one line naming the flag
        err = e.errors()[0]
        flag = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-")
        raise UserError(f"{flag} {err.get('input')!r}: {err['msg']}") from None
    if not args.raw_text:  # rows of token ids: no longer than the model can read
        from ftdist.preflight import check_max_length

        check_max_length(args.max_length, f"--max-length {args.max_length}", "use --max-length {limit} or less",
                         args.model, cfg)
    names = [n.strip() for n in args.label_names.split(",")] if args.label_names else None
    manifests = prepare(spec, args.output, args.model, args.max_length, args.task, cfg, seed=args.seed,
                        label_names=names, overwrite=args.overwrite)
    out: dict[str, Any] = {s: {"rows": m.num_rows, "shards": len(m.shards)} for s, m in manifests.items()}
    labels = manifests["train"].label_names
    print(json.dumps({"output": args.output, "splits": out, **({"label_names": labels} if labels else {})}))
    return 0


def _check_prepare_numbers(args: argparse.Namespace) -> None:
    """Integer flags of `data prepare` with a lower bound, each refused by name (argparse only checks
    that they are integers; a bad value would otherwise surface as a traceback deep in prepare)."""
    for flag, value, low, why in (("--rows-per-shard", args.rows_per_shard, 1, "rows per shard file"),
                                  ("--max-length", args.max_length, 8, "tokens per row"),
                                  ("--limit", args.limit, 1, "rows to keep; leave it out to keep all rows"),
                                  ("--seed", args.seed, 0, "the random seed")):
        if value is not None and value < low:
            raise UserError(f"{flag} {value} must be >= {low} ({why})")


def cmd_submit(args: argparse.Namespace) -> int:
    from ftdist.submit import submit

    return submit(args.config, args.overrides, args.address, args.follow, args.env)


def cmd_pipeline(args: argparse.Namespace) -> int:
    from ftdist.config import dump_config
    from ftdist.pipeline.spec import load_pipeline

    overrides = list(args.overrides)
    p = load_pipeline(args.spec, overrides, address=args.address)  # every stage checked before anything trains
    if args.print_config:
        print(dump_config(p.stage(args.print_config).config), end="")
        return 0
    from ftdist.pipeline.runner import format_pipeline, run_pipeline

    print(format_pipeline(run_pipeline(p)), flush=True)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from ftdist.sweep.spec import load_sweep_spec, resolve_sweep

    rs = resolve_sweep(load_sweep_spec(args.spec, args.overrides))  # no Ray yet: a bad spec fails in a second
    from ftdist.sweep.driver import run_sweep
    from ftdist.sweep.report import every_trial_failed, format_report

    summary = run_sweep(rs, resume=args.resume, address=args.address)
    print(format_report(summary), flush=True)
    failed = every_trial_failed(summary)
    if failed:
        raise RunFailed(failed)
    return 0 if summary["status"] == "completed" else 130


COMMANDS = {"train": cmd_train, "config": cmd_config, "submit": cmd_submit, "tune": cmd_tune, "predict": cmd_predict,
            "serve": cmd_serve, "pipeline": cmd_pipeline, "init": cmd_init}


def main(argv: list[str] | None = None) -> int:
    _env_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "data":
            return cmd_data_prepare(args)
        return COMMANDS[args.command](args)
    except (UserError, RunFailed) as e:
        if args.debug:
            raise
        print(f"ftdist: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print(interrupted_message(args.command), file=sys.stderr)
        return 130
