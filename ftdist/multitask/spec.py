"""A task's view of a multi-task run config, and the checks made before any worker starts.

The view (``task_config``) is the run config with ``data.path``/``data.prepare`` and the labels of
one task, so the single-task machinery (preparing a data set on first use, preflight checks,
readers, ``ftdist.loop.evaluate``) serves each task unchanged.
"""

from __future__ import annotations

from typing import Any

from ftdist.config import RunConfig, TaskSpec
from ftdist.uri import join_uri
from ftdist.data.manifest import load_manifest
from ftdist.errors import UserError

TASK_CLS = "sequence-classification"


def task_config(cfg: RunConfig, task: TaskSpec) -> RunConfig:
    """``cfg`` as a single-task run on ``task``'s data set and labels."""
    data = cfg.data.model_copy(update={"path": task.data.path, "prepare": task.data.prepare})
    model = cfg.model.model_copy(update={"label_names": task.label_names,
                                         "num_labels": len(task.label_names) if task.label_names else None})
    return cfg.model_copy(update={"data": data, "model": model, "tasks": None})


def task_views(cfg: RunConfig) -> list[tuple[TaskSpec, RunConfig]]:
    return [(t, task_config(cfg, t)) for t in cfg.tasks or []]


def check_task_data(cfg: RunConfig, index: int, task: TaskSpec) -> list[str]:
    """The task's label names as its data set has them (none for a regression task); one line
    (UserError) for a data set of another task type or whose labels do not match ``label_names``."""
    where = f"tasks[{index}] ('{task.name}')"
    names: list[str] | None = None
    for split in ("train", "validation", "test"):
        uri = join_uri(task.data.path, split)
        m = load_manifest(uri, cfg.storage)
        if m.task != task.type:
            hint = (f"prepare it with --task {task.type}" if {m.task, task.type} <= {"regression", TASK_CLS}
                    else f"point tasks[{index}].data.path at a {task.type} data set")
            raise UserError(f"{where}: data set '{uri}' was prepared for task {m.task}, not {task.type}; {hint}")
        if task.type == "regression":
            continue
        if not m.label_names:
            raise UserError(f"{where}: data set '{uri}' has no labels; re-prepare it with a label field")
        if names is not None and m.label_names != names:
            raise UserError(f"{where}: split '{uri}' has labels {m.label_names}, the train split {names}; "
                            f"re-prepare the data set")
        names = m.label_names
    if task.type == "regression":
        return []
    assert names is not None
    if task.label_names is not None and len(task.label_names) != len(names):
        raise UserError(f"{where}: label_names has {len(task.label_names)} names but data set '{task.data.path}' "
                        f"has {len(names)} labels ({', '.join(names)}); make tasks[{index}].label_names match")
    return task.label_names or names


def task_facts(facts: dict[str, Any]) -> dict[str, Any]:
    """What the summary keeps of one task's preflight facts."""
    return {"label_counts": facts["label_counts"], "rows": facts["rows"]}
