"""MLflow runs for ftdist runs and sweeps, through MLflow's client (``mlflow-skinny``: no server code).

What goes where: rank 0's :class:`MlflowTracker` creates the run, logs the config as parameters and
every log line's and epoch's scalars as metrics (the same names as TensorBoard's, steps are optimizer
steps), and ends it; the driver then adds what only it has (:func:`log_run_outputs`: the summary,
the plots, the baselines, the diagnoses and, with ``log_model``, the exported model). A sweep is a
parent run (:func:`start_sweep_parent`) whose trials are child runs (``mlflow.parentRunId``).

The MLflow run id is kept in the run folder (``mlflow_run.json``), so a resumed run continues its
MLflow run instead of starting another. Credentials are never in the config, parameters or tags:
MLflow's client reads ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN`` from
the environment itself (the config refuses a ``tracking_uri`` holding a user or password).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from ftdist import run_folder as layout
from ftdist import storage
from ftdist.sweep import layout as sweep_folder
from ftdist.config import MlflowSection, RunConfig
from ftdist.uri import join_uri
from ftdist.redaction import redact_uri

#: MLflow accepts at most 100 parameters per log_batch call
PARAMS_PER_CALL = 100
#: parameter values longer than this are cut (MLflow's own limit is several thousand characters)
MAX_PARAM_CHARS = 500


def _client(m: MlflowSection) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=m.tracking_uri)


def experiment_id(client: Any, name: str) -> str:
    """The experiment's id, created on first use (another process may create it at the same moment)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - created meanwhile by a concurrent trial: read it back
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _metrics(values: dict[str, float], step: int) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]


def read_run_id(cfg: RunConfig) -> str | None:
    """The MLflow run id recorded in the run folder, if this run has one."""
    uri = join_uri(cfg.run_uri(), layout.MLFLOW_RUN)
    if not storage.exists(uri, cfg.storage):
        return None
    return json.loads(storage.read_text(uri, cfg.storage))["run_id"]


class MlflowTracker:
    """Rank 0's MLflow run: the :class:`ftdist.tracking.Tracker` interface (log_step, log_epoch, close)."""

    def __init__(self, cfg: RunConfig, params: dict[str, Any]) -> None:
        m = cfg.tracking.mlflow
        assert m is not None
        self.client = _client(m)
        self.closed = False
        self.pending: list[Any] = []  # asynchronous log_batch operations not yet known to be sent
        self.run_id = read_run_id(cfg)
        if self.run_id is not None:  # a resumed run: same MLflow run, parameters already logged
            self.client.update_run(self.run_id, status="RUNNING")
            return
        tags = {"ftdist.run_dir": redact_uri(cfg.run_uri())}
        if m.parent_run_id:
            tags["mlflow.parentRunId"] = m.parent_run_id
        run = self.client.create_run(experiment_id(self.client, m.experiment), run_name=cfg.run.name, tags=tags)
        self.run_id = run.info.run_id
        storage.write_text(join_uri(cfg.run_uri(), layout.MLFLOW_RUN), json.dumps(
            {"run_id": self.run_id, "experiment": m.experiment, "tracking_uri": redact_uri(m.tracking_uri)}),
            cfg.storage)
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in sorted(params.items())]
        for i in range(0, len(items), PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[i:i + PARAMS_PER_CALL])

    def log_step(self, step: int, values: dict[str, float]) -> None:
        # Asynchronous: a synchronous call took ~75 ms against a loopback server (a step's worth of
        # time on small models); MLflow's queue sends it from a thread, and close() waits for it.
        self.pending.append(self.client.log_batch(self.run_id, metrics=_metrics(values, step), synchronous=False))

    def log_epoch(self, step: int, values: dict[str, float]) -> None:
        self.log_step(step, values)
        self._wait()  # at epoch ends everything so far is on the server (as TensorBoard publishes then)

    def _wait(self) -> None:
        for op in self.pending:
            op.wait()
        self.pending = []

    def close(self, final: dict[str, float], failed: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._wait()
        if final:
            self.client.log_batch(self.run_id, metrics=_metrics(final, 0))
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _local_file(uri: str, cfg: RunConfig, tmp: str) -> str:
    """A local path holding the file at ``uri`` (downloaded from remote storage)."""
    if not storage.is_remote(uri):
        return storage.local_path(uri)
    dest = os.path.join(tmp, os.path.basename(uri))
    with open(dest, "wb") as f:
        f.write(storage.read_bytes(uri, cfg.storage))
    return dest


def _local_dir(uri: str, cfg: RunConfig, tmp: str) -> str:
    """A local path holding the folder at ``uri`` (downloaded from remote storage)."""
    if not storage.is_remote(uri):
        return storage.local_path(uri)
    return storage.download_dir(uri, os.path.join(tmp, "dir"), cfg.storage)


def log_run_outputs(cfg: RunConfig, summary: dict[str, Any], plots: list[str]) -> None:
    """The driver's part of a run's MLflow record: summary, plots, baselines, diagnoses, the model."""
    m = cfg.tracking.mlflow
    run_id = read_run_id(cfg) if m else None
    if m is None or run_id is None:
        return
    client = _client(m)
    client.log_dict(run_id, summary, layout.SUMMARY)
    base = summary.get("baseline") or {}
    tfidf = base.get("tfidf_logreg") or {}
    extra = {"baseline/majority_class_accuracy": base.get("majority_class_accuracy"),
             "baseline/tfidf_accuracy": (tfidf.get("test") or {}).get("accuracy"),
             "baseline/tfidf_macro_f1": (tfidf.get("test") or {}).get("macro_f1"),
             "run/wall_time_s": summary.get("wall_time_s")}
    client.log_batch(run_id, metrics=_metrics({k: v for k, v in extra.items() if v is not None},
                                              int(summary.get("global_step") or 0)))
    client.set_tag(run_id, "ftdist.diagnoses", ",".join(d["code"] for d in summary.get("diagnoses") or []) or "none")
    with tempfile.TemporaryDirectory(prefix="ftdist-mlflow-") as tmp:
        for uri in plots:
            client.log_artifact(run_id, _local_file(uri, cfg, tmp), "plots")
        if m.log_model:
            client.log_artifacts(run_id, _local_dir(summary["model_uri"], cfg, tmp), "model")


def start_sweep_parent(cfg: RunConfig, sweep_uri: str, name: str) -> str | None:
    """The sweep's parent run (created once, kept in the sweep folder so a resumed sweep reuses it)."""
    m = cfg.tracking.mlflow
    if m is None:
        return None
    client = _client(m)
    uri = join_uri(sweep_uri, sweep_folder.MLFLOW_PARENT)
    if storage.exists(uri, cfg.storage):
        run_id = json.loads(storage.read_text(uri, cfg.storage))["run_id"]
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment_id(client, m.experiment), run_name=name,
                            tags={"ftdist.sweep_dir": redact_uri(sweep_uri)})
    storage.write_text(uri, json.dumps({"run_id": run.info.run_id, "experiment": m.experiment}), cfg.storage)
    return run.info.run_id


def finish_sweep_parent(cfg: RunConfig, sweep_uri: str, parent: str | None, summary: dict[str, Any]) -> None:
    """The sweep's outputs on its parent run: the summary, the trials table, the plots, the best metric."""
    m = cfg.tracking.mlflow
    if m is None or parent is None:
        return
    client = _client(m)
    client.log_dict(parent, summary, sweep_folder.SUMMARY)
    best = summary.get("best") or {}
    if best.get("best_metric") is not None:
        client.log_batch(parent, metrics=_metrics({"best/" + str(summary.get("metric", "metric")): best["best_metric"]},
                                                  0))
    with tempfile.TemporaryDirectory(prefix="ftdist-mlflow-") as tmp:
        for name in (sweep_folder.TRIALS_CSV, sweep_folder.CURVES_PNG, sweep_folder.PARAMS_PNG):
            uri = join_uri(sweep_uri, name)
            if storage.exists(uri, cfg.storage):
                client.log_artifact(parent, _local_file(uri, cfg, tmp))
    client.set_terminated(parent, status="FINISHED")
