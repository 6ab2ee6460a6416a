"""MLflow tracking against a real ``mlflow server`` started here on loopback with its own backend
store (SQLite) and artifact folder, read back with MLflow's own client.

The server runs from its own venv (``make mlflow-server`` builds ``.cache/mlflow-server-venv``; full
mlflow 3 needs pyarrow<26, ftdist pins 26): a missing venv is a failure naming that command, not a
skip. A training run (``ftdist train``, real Ray) must land as one MLflow run with the config as
parameters, every log line and epoch as metrics, the summary, plots and model as artifacts; a sweep
(``ftdist tune``) as a parent run with one child run per trial; the credential in the environment
never in parameters or tags. The same run's stdout (a Ray job log, not a terminal) has plain
progress lines with elapsed time and ETAs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import base_config, free_port, run_cli
from test_cli import kill_processes_mentioning

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SERVER_VENV = Path(os.environ.get("FTDIST_MLFLOW_SERVER_VENV", ROOT / ".cache" / "mlflow-server-venv"))
TOKEN = "ftdist-test-token-9f3a"  # a credential as a user would export it; the server ignores it
LR = 2.0e-3


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    exe = SERVER_VENV / "bin" / "mlflow"
    if not exe.exists():
        pytest.fail(f"no MLflow server at {exe}: run `make mlflow-server` (part of `make test`) to build "
                    f"its venv, or set FTDIST_MLFLOW_SERVER_VENV", pytrace=False)
    d = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (d / "server.log").open("w")
    proc = subprocess.Popen([str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
                             "--artifacts-destination", str(d / "artifacts")],
                            cwd=d, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (d / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "the MLflow server did not answer /health in 120 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _env(ray_tmp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "RAY_TMPDIR": ray_tmp, "MLFLOW_TRACKING_TOKEN": TOKEN}


def _cli(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    ray_tmp = tempfile.mkdtemp(prefix="rm", dir="/tmp")  # AF_UNIX socket paths must stay short
    try:
        return run_cli(*args, env=_env(ray_tmp), timeout=timeout)
    finally:
        kill_processes_mentioning(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _no_token(client, run) -> None:
    everything = json.dumps([run.data.params, run.data.tags])
    assert TOKEN not in everything


def test_a_run_is_one_mlflow_run_with_params_metrics_summary_plots_and_model(mlflow_server, tiny_bert, cls_data,
                                                                           tmp_path):
    from mlflow import MlflowClient

    cfg = base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": "tracked"},
                      train={"epochs": 2, "learning_rate": LR, "log_every_steps": 4, "max_steps_per_epoch": 12},
                      scaling={"num_workers": 1},
                      tracking={"mlflow": {"tracking_uri": mlflow_server, "experiment": "e2e", "log_model": True}})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _cli("train", str(path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "tracked" / "summary.json").read_text())

    # progress in a Ray job log: plain lines (no live bar), each with elapsed time and both ETAs
    lines = [x for x in proc.stdout.splitlines() if "[ftdist] epoch 1/2 batch" in x]
    assert len(lines) == 3 and "\r" not in proc.stdout, proc.stdout[-2000:]
    assert all("elapsed " in x and "epoch ETA " in x and "run ETA " in x for x in lines), lines

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == ["tracked"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.learning_rate"] == str(LR) and run.data.params["model.task"] == \
        "sequence-classification"
    from ftdist.config import load_config
    from ftdist.tracking import hyperparameters

    # every scalar of the run's config is a parameter (the same set TensorBoard's hparams get), none left out
    assert set(run.data.params) == set(hyperparameters(load_config(path))), \
        set(hyperparameters(load_config(path))) ^ set(run.data.params)
    assert run.data.tags["ftdist.run_dir"] == str(tmp_path / "runs" / "tracked")
    rid = run.info.run_id
    loss = client.get_metric_history(rid, "train/loss")
    assert [(m.step, pytest.approx(m.value, rel=1e-6)) for m in sorted(loss, key=lambda m: m.step)] == \
        [(s, pytest.approx(v, rel=1e-6)) for s, v in summary["train_log"]]
    for tag in ("train/lr", "train/grad_norm", "train/samples_per_s", "train/tokens_per_s"):
        assert len(client.get_metric_history(rid, tag)) == len(summary["train_log"]), tag
    val = sorted(client.get_metric_history(rid, "val/accuracy"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in val] == [(e["step"], pytest.approx(e["val_accuracy"], rel=1e-6))
                                                for e in summary["epochs"]]
    assert run.data.metrics["test/accuracy"] == pytest.approx(summary["test"]["accuracy"], rel=1e-6)
    assert run.data.metrics["baseline/tfidf_macro_f1"] == pytest.approx(
        summary["baseline"]["tfidf_logreg"]["test"]["macro_f1"], rel=1e-6)
    assert run.data.tags["ftdist.diagnoses"] == (",".join(d["code"] for d in summary["diagnoses"]) or "none")
    top = {a.path for a in client.list_artifacts(rid)}
    assert {"summary.json", "plots", "model"} <= top, top
    assert {a.path for a in client.list_artifacts(rid, "plots")} == {"plots/learning_curves.png",
                                                                   "plots/confusion_matrix.png"}
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(rid, "model")}
    local = client.download_artifacts(rid, "summary.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["test"] == summary["test"]
    _no_token(client, run)
    assert json.loads((tmp_path / "runs" / "tracked" / "mlflow_run.json").read_text())["run_id"] == rid


def test_a_sweep_is_a_parent_run_with_a_child_run_per_trial(mlflow_server, tiny_bert, cls_data, tmp_path):
    from mlflow import MlflowClient

    base = base_config(tiny_bert, cls_data, str(tmp_path / "runs"),
                       train={"epochs": 1, "batch_size": 8, "learning_rate": LR, "max_steps_per_epoch": 6,
                              "log_every_steps": 3},
                       scaling={"num_workers": 1, "cpus_per_worker": 1, "local_num_cpus": 2},
                       tracking={"mlflow": {"tracking_uri": mlflow_server, "experiment": "sweeps"}})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "mlsweep", "base": {"path": str(tmp_path / "base.yaml")}, "storage_path": str(tmp_path / "sw"),
            "space": {"train.learning_rate": {"grid": [LR, 1.0e-4]}}, "max_concurrent_trials": 2}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = _cli("tune", str(tmp_path / "spec.yaml"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "sw" / "mlsweep" / "sweep_summary.json").read_text())

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_name for p in parents] == ["mlsweep"]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.info.run_name for c in children) == sorted(t["trial"] for t in summary["trials"])
    assert sorted(float(c.data.params["train.learning_rate"]) for c in children) == [1.0e-4, LR]
    for c in children:
        assert c.info.status == "FINISHED" and len(client.get_metric_history(c.info.run_id, "val/accuracy")) == 1
        _no_token(client, c)
    assert {"sweep_summary.json", "trials.csv"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    _no_token(client, parent)
