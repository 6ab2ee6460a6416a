"""The driver side of a multi-task run: every task's data set built and checked before any worker
starts, and the per-task part of the summary (test metrics against majority baselines)."""

from __future__ import annotations

from typing import Any

from ftdist.config import RunConfig
from ftdist.errors import UserError
from ftdist.metrics import majority_baseline, mean_predictor_rmse
from ftdist.multitask.spec import check_task_data, task_views
from ftdist.preflight import preflight, prepare_data_if_needed


def multitask_preflight(cfg: RunConfig) -> dict[str, Any]:
    """Prepare (on first use) and check each task's data set; facts per task (label counts, rows).

    The top-level ``label_counts``/``rows`` are the first task's, the keys a single-task run has."""
    from ftdist.lora import check_lora_config
    from ftdist.modeling import resolve_model_path

    # the adapters go into the shared encoder: its modules are the ones model.lora may name
    check_lora_config(cfg.model, resolve_model_path(cfg.model.path, cfg.storage), shared_encoder=True)
    per_task: dict[str, Any] = {}
    for i, (task, view) in enumerate(task_views(cfg)):
        where = f"tasks[{i}] ('{task.name}')"
        try:
            prepare_data_if_needed(view, task.type)
            names = check_task_data(cfg, i, task)
            if names:
                view.model.num_labels = len(names)
            per_task[task.name] = {**preflight(view, task.type), "type": task.type}
        except UserError as e:  # the single-task checks name data.path: say which task's it is
            msg = str(e)
            if not msg.startswith(where):
                msg = f"{where}: " + msg.replace("data.path", f"tasks[{i}].data.path")
            raise UserError(msg) from None
    first = next(iter(per_task.values()))
    return {**first, "tasks": per_task}


def add_task_summary(summary: dict[str, Any], facts: dict[str, Any]) -> None:
    """Each task's baseline beside its test metrics: the majority class's accuracy (classification),
    the RMSE of predicting the train split's mean label (regression). The run's majority baseline is
    the mean over the classification tasks."""
    baselines = []
    for name, t in summary.get("tasks", {}).items():
        f = facts["tasks"][name]
        if f.get("type") == "regression":
            stats = f.get("label_stats") or {}
            t["baseline"] = {"mean_predictor_rmse": mean_predictor_rmse(stats.get("train"), stats.get("test"))}
        else:
            base = majority_baseline(f["label_counts"].get("test") or None)
            t["baseline"] = {"majority_class_accuracy": base}
            if base is not None:
                baselines.append(base)
        t["rows"] = f["rows"]
    summary["baseline"] = {"majority_class_accuracy": sum(baselines) / len(baselines) if baselines else None}


def task_lines(summary: dict[str, Any]) -> list[str]:
    """The per-task lines of the end-of-run report."""
    out = []
    for name, t in (summary.get("tasks") or {}).items():
        test = "  ".join(f"{k} {v:.4f}" for k, v in t["test"].items())
        base = t.get("baseline") or {}
        vs = "".join(f"  ({what} baseline {base[key]:.4f})" for key, what in
                     (("majority_class_accuracy", "majority"), ("mean_predictor_rmse", "mean-predictor rmse"))
                     if base.get(key) is not None)
        out.append(f"  task {name}: test {test}{vs}; model {t['model_uri']}")
    return out
