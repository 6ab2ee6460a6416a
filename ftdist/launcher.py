"""A training run, driver side: checks, Ray Train's TorchTrainer, and the summary.

``run_training(cfg)``: check everything a user can get wrong before any worker starts
(:mod:`ftdist.preflight`), connect to Ray (:mod:`ftdist.ray_cluster`), start a ``TorchTrainer``
whose workers run :func:`ftdist.ray_worker.worker_entry` (the loop), turn a failure into one line
(:mod:`ftdist.failures`), then write ``summary.json``.

Rerunning the same command with the same run name resumes: Ray Train restores the latest
checkpoint of ``<storage.path>/<run.name>`` and the loop continues from its reader position.
"""

from __future__ import annotations

import contextlib
import json
import os
import logging
import sys
import time
from typing import Any

from ftdist import run_folder as layout
from ftdist import run_lease, storage
from ftdist.baseline import tfidf_baseline
from ftdist.config import RunConfig, config_record
from ftdist.uri import join_uri
from ftdist.diagnoses import diagnose
from ftdist.errors import RunFailed
from ftdist.failures import (describe_failure, diverged_loss_from_ray, memory_limit_from_ray, storage_outage_from_ray,
                             user_error_from_ray)
from ftdist.metrics import majority_baseline
from ftdist.model_card import write_cards
from ftdist.mlflow_tracking import log_run_outputs
from ftdist.multitask.preflight import add_task_summary, multitask_preflight, task_lines
from ftdist.plots import write_run_plots
from ftdist.preflight import (check_run_folder, preflight, prepare_data_if_needed, read_json,
                              unreachable_storage_is_a_user_error, write_run_marker)
from ftdist.ray_cluster import connect_ray, use_gpu, wait_for_resources, worker_count, worker_resources
from ftdist.ray_worker import worker_entry

log = logging.getLogger("ftdist")
RAY_TRAIN_LOG_LEVEL = "RAY_TRAIN_LOG_LEVEL"  # the environment variable of Ray Train's console log level


# ---------------------------------------------------------------------------------------------
# Ray


def build_trainer(cfg: RunConfig, callbacks: list[Any] | None = None, restore_from: str | None = None) -> Any:
    """The TorchTrainer for ``cfg`` (also used by each Tune trial). ``restore_from``: a checkpoint URI
    a run without checkpoints of its own starts from (PBT: another trial's state)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = cfg.resolved()  # storage and run name as used; train_loop_config below keeps the references
    gpu = use_gpu(cfg)
    per_worker = worker_resources(cfg, gpu)
    wait_for_resources(cfg, per_worker)
    fs, path = storage.pyarrow_filesystem(cfg.storage.path, cfg.storage)
    metric = f"val_{cfg.eval_metric}"
    return TorchTrainer(
        worker_entry,
        train_loop_config={"config": cfg.unresolved().model_dump(mode="json"),
                           **({"restore_from": restore_from} if restore_from else {})},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo", timeout_s=int(cfg.scaling.collective_timeout_s)),
        scaling_config=ScalingConfig(num_workers=worker_count(cfg), use_gpu=gpu,  # type: ignore[arg-type]  # v2: (min, max)
                                     resources_per_worker={k: v for k, v in per_worker.items()
                                                           if not k.startswith("accelerator_type")},
                                     accelerator_type=cfg.scaling.accelerator_type),
        run_config=RayRunConfig(  # type: ignore[call-arg]  # v2's RunConfig (logging_config); the stubs show v1's
            name=cfg.run.name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.storage.num_checkpoints_to_keep,
                                               checkpoint_score_attribute=metric,
                                               checkpoint_score_order=cfg.eval_mode),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            # Ray Train's INFO lines (resources requested, worker group started, process group set up)
            # are its bookkeeping, not the user's: warnings and errors still show. RAY_TRAIN_LOG_LEVEL=INFO
            # brings them back (bench/throughput.py's first-step timeline reads them).
            logging_config=LoggingConfig(log_level=os.environ.get(RAY_TRAIN_LOG_LEVEL, "WARNING")),
            callbacks=callbacks or None),
    )


# ---------------------------------------------------------------------------------------------
# The run


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("ftdist", "torch", "transformers", "deepspeed", "ray", "pyarrow", "s3fs"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def check_data(cfg: RunConfig) -> dict[str, Any]:
    """Prepare the run's data set(s) if asked and check them against the config before Ray starts:
    each task's for a multi-task run. The one entry for `ftdist train` and a sweep's base config alike
    (a sweep that checked only single-task data let a multi-task base with a missing task start trials)."""
    if cfg.tasks:
        return multitask_preflight(cfg)
    prepare_data_if_needed(cfg)
    return preflight(cfg)


def run_training(cfg: RunConfig, started_at: float | None = None) -> dict[str, Any]:
    """Train (or resume, or report a finished) run; returns the summary."""
    started_at = started_at or time.time()
    cfg = cfg.resolved()  # the values this driver uses; saved files and workers get the references
    run_uri = cfg.run_uri()
    with unreachable_storage_is_a_user_error():
        state = check_run_folder(cfg)
        if state == "completed":
            summary = read_json(join_uri(run_uri, layout.SUMMARY), cfg)
            print(f"[ftdist] run '{cfg.run.name}' already completed; nothing to do (summary: "
                  f"{join_uri(run_uri, layout.SUMMARY)})")
            return summary
        facts = check_data(cfg)
        # After the checks (a refused config writes nothing), before anything is written: one driver per folder.
        lease = run_lease.acquire(run_uri, cfg.storage)
    try:
        return _train_and_report(cfg, started_at, state, facts)
    finally:
        run_lease.release(lease)


def _train_and_report(cfg: RunConfig, started_at: float, state: str, facts: dict[str, Any]) -> dict[str, Any]:
    """The part of a run that writes into the run folder: under the folder's lease."""
    run_uri = cfg.run_uri()
    with unreachable_storage_is_a_user_error():  # another driver may have worked in the folder meanwhile
        if storage.exists(join_uri(run_uri, layout.SUMMARY), cfg.storage):
            return read_json(join_uri(run_uri, layout.SUMMARY), cfg)
        if state == "new":
            state = check_run_folder(cfg)
    if state == "new":
        write_run_marker(cfg)
    else:
        print(f"[ftdist] resuming run '{cfg.run.name}' from {run_uri}", flush=True)
    connect_ray(cfg)
    trainer = build_trainer(cfg)
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - turned into a UserError or a one-line RunFailed
        ue = user_error_from_ray(e)
        if ue is not None:
            raise ue from None
        diverged = diverged_loss_from_ray(e) or memory_limit_from_ray(e)
        if diverged is not None:
            raise RunFailed(f"run '{cfg.run.name}' failed: {diverged}") from None
        outage = storage_outage_from_ray(e)
        if outage is not None:
            raise RunFailed(f"run '{cfg.run.name}' failed: {outage}; completed checkpoints are kept in "
                            f"{run_uri}") from None
        why = describe_failure(e)
        if why is None:
            raise
        raise RunFailed(f"run '{cfg.run.name}' failed: {why}; completed checkpoints are kept in {run_uri}: "
                        f"rerun the same command to resume from the latest") from e
    result = json.loads(storage.read_text(join_uri(run_uri, layout.RESULT), cfg.storage))
    wall = time.time() - started_at
    summary = {
        "run": cfg.run.name, "status": "completed", "resumed": state == "resume", "run_dir": run_uri,
        "config": config_record(cfg), **{k: v for k, v in result.items() if k != "first_step_time"},
        "baseline": {"majority_class_accuracy": majority_baseline((facts["label_counts"].get("test") or None)),
                     "tfidf_logreg": tfidf_baseline(cfg, len(result.get("test_confusion") or []),
                                                    result.get("label_names"))},
        "rows": facts["rows"], "train_token_lengths": facts.get("token_lengths"), "wall_time_s": wall,
        "time_to_first_step_s": (result["first_step_time"] - started_at) if result.get("first_step_time") else None,
        "checkpoints": sorted(n for n in storage.listdir(run_uri, cfg.storage) if layout.is_checkpoint(n)),
        "versions": library_versions(),
    }
    if cfg.tasks:
        add_task_summary(summary, facts)
    summary["diagnoses"] = diagnose(summary)
    plots = write_run_plots(cfg, summary)
    write_cards(summary, cfg.storage)  # each export's README.md: what it is, its numbers, how to load it
    log_run_outputs(cfg, summary, plots)  # before summary.json: a run is complete once everything is recorded
    storage.write_text(join_uri(run_uri, layout.SUMMARY), json.dumps(summary, indent=1), cfg.storage)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable end of a run: metrics per epoch, test vs baseline, where the model is."""
    lines = [f"run '{summary['run']}' ({summary['world_size']} worker(s), {summary['device']}, {summary['precision']}):"]
    metric = summary["eval_metric"]
    for e in summary["epochs"]:
        vals = "  ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in e.items() if k.startswith("val_"))
        star = " *" if e["epoch"] == summary["best_epoch"] else ""
        lines.append(f"  epoch {e['epoch']}: train_loss {e['train_loss']:.4f}  val: {vals}  "
                     f"{e['samples_per_s']:.1f} samples/s{star}")
    lines.append(f"  best epoch {summary['best_epoch']} by val_{metric}"
                 + (" (stopped early)" if summary.get("stopped_early") else ""))
    test = "  ".join(f"{k} {v:.4f}" for k, v in summary["test"].items())
    lines.append(f"  test: {test}" + (" (mean over tasks)" if summary.get("tasks") else ""))
    lines += task_lines(summary)
    base = (summary.get("baseline") or {}).get("majority_class_accuracy")
    if base is not None and "accuracy" in summary["test"]:
        lines.append(f"  majority-class baseline accuracy: {base:.4f} "
                     f"({summary['test']['accuracy'] - base:+.4f} for the fine-tuned model)")
    tfidf = (summary.get("baseline") or {}).get("tfidf_logreg")
    if tfidf and "macro_f1" in summary["test"]:
        sample = f", fitted on a sample of {tfidf['train_rows']} train rows" if tfidf.get("sampled") else ""
        lines.append(f"  TF-IDF + logistic regression baseline: accuracy {tfidf['test']['accuracy']:.4f}, macro_f1 "
                     f"{tfidf['test']['macro_f1']:.4f} ({summary['test']['macro_f1'] - tfidf['test']['macro_f1']:+.4f} "
                     f"macro_f1 for the fine-tuned model{sample})")
    if summary.get("test_per_class"):
        lines += per_class_table(summary["test_per_class"], "test per class")
    tp = summary.get("throughput") or {}
    if tp:
        mfu = f", MFU {tp['mfu']:.1%}" if tp.get("mfu") else ""
        lines.append(f"  throughput: {tp['samples_per_s']:.1f} samples/s, {tp['tokens_per_s']:.0f} tokens/s{mfu}")
    if summary.get("trainable_params") and summary.get("n_params"):
        lines.append(f"  parameters: {summary['trainable_params']:,} trainable of {summary['n_params']:,} "
                     f"({summary['trainable_params'] / summary['n_params']:.2%}); optimizer state "
                     f"{summary.get('optimizer_state_bytes', 0) / 2**20:.1f} MB")
    lines.append(f"  wall time {summary['wall_time_s']:.0f}s"
                 + (f", first step after {summary['time_to_first_step_s']:.0f}s" if summary.get("time_to_first_step_s") else ""))
    for d in summary.get("diagnoses") or []:
        lines.append(f"  ! {d['message']}")
    lines.append(f"  exported model: {summary['model_uri']}")
    lines.append(f"  summary: {join_uri(summary['run_dir'], layout.SUMMARY)}")
    return "\n".join(lines)


def per_class_table(rows: list[dict[str, Any]], title: str) -> list[str]:
    """A compact per-class table (label, precision, recall, F1, support), indented for the report."""
    width = max([len(title)] + [len(str(r["label"])) for r in rows])
    out = [f"  {title:<{width}}  precision  recall     f1  support"]
    for r in rows:
        out.append(f"  {str(r['label']):<{width}}  {r['precision']:9.3f}  {r['recall']:6.3f}  {r['f1']:5.3f}  "
                   f"{r['support']:7d}")
    return out
