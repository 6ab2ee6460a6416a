"""Regression tasks in a multi-task run: float labels prepared (and still refused for classification),
MSE/RMSE/Pearson metrics, how a regression task enters the combined (mean over tasks) metric, the
mean-predictor baseline; end to end (slow): a classification and a regression head on one encoder,
the regression export loads as AutoModelForSequenceClassification (problem_type regression) and
predicts what the trained model predicted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import base_config, length_score_rows, prepare_local, write_jsonl
from ftdist import run_folder as layout
from ftdist.config import StorageSection, load_config
from ftdist.data.manifest import load_manifest
from ftdist.errors import UserError
from ftdist.metrics import mean_predictor_rmse, regression_metrics
from ftdist.multitask.loop import combined
from ftdist.session import LocalSession


def test_float_labels_are_prepared_for_regression_and_still_refused_for_classification(reg_data, tiny_bert, tmp_path):
    m = load_manifest(str(Path(reg_data) / "train"), StorageSection())
    assert m.task == "regression" and m.columns["label"] == "float32" and m.label_names is None
    labels = [x for f in Path(reg_data, "train").glob("*.parquet") for x in pq.read_table(f)["label"].to_pylist()]
    assert m.label_stats is not None and m.label_stats["count"] == len(labels) == m.num_rows
    assert m.label_stats["mean"] == pytest.approx(np.mean(labels)) and m.label_stats["std"] == pytest.approx(np.std(labels))
    assert any(not float(x).is_integer() for x in labels)
    raw = write_jsonl(tmp_path / "raw.jsonl", length_score_rows(40, 2))
    with pytest.raises(UserError, match="is not a whole number"):
        prepare_local(raw, tmp_path / "cls", tiny_bert)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a b", "label": "high"}] * 20)
    with pytest.raises(UserError, match="label 'high' in column 'label' is not a finite number"):
        prepare_local(bad, tmp_path / "reg", tiny_bert, task="regression")


def test_regression_metrics_and_the_mean_predictor_baseline():
    rng = np.random.default_rng(0)
    y = rng.normal(size=50)
    p = y + rng.normal(scale=0.5, size=50)
    sums = [50.0, float(((p - y) ** 2).sum()), y.sum(), p.sum(), (y * y).sum(), (p * p).sum(), (p * y).sum()]
    m = regression_metrics(sums)
    assert m["loss"] == pytest.approx(np.mean((p - y) ** 2)) and m["rmse"] == pytest.approx(math.sqrt(m["loss"]))
    assert m["pearson"] == pytest.approx(np.corrcoef(p, y)[0, 1])
    const = regression_metrics([50.0, 1.0, y.sum(), 50 * 0.3, (y * y).sum(), 50 * 0.09, 0.3 * y.sum()])
    assert const["pearson"] == 0.0  # a constant predictor explains nothing
    train, test = {"count": 10, "mean": 1.0, "std": 2.0}, {"count": 5, "mean": 4.0, "std": 3.0}
    assert mean_predictor_rmse(train, test) == pytest.approx(math.sqrt(9 + 9))
    assert mean_predictor_rmse(None, test) is None


def test_a_regression_task_enters_the_combined_metric_with_its_own_metric_of_the_same_direction():
    cls = {"loss": 0.6, "accuracy": 0.8, "macro_f1": 0.7}
    reg = {"loss": 0.2, "rmse": math.sqrt(0.2), "pearson": 0.5}
    c = combined({"sentiment": cls, "score": reg})
    assert c == pytest.approx({"loss": 0.4, "accuracy": 0.65, "macro_f1": 0.6})


def test_preflight_facts_and_summary_of_a_regression_task(reg_data, tiny_bert, cls_data, tmp_path):
    from ftdist.multitask.preflight import add_task_summary, multitask_preflight, task_lines

    raw = base_config(tiny_bert, cls_data, str(tmp_path / "runs"))
    del raw["data"]["path"]
    raw["tasks"] = [{"name": "sentiment", "data": {"path": cls_data}},
                    {"name": "score", "type": "regression", "data": {"path": reg_data}}]
    facts = multitask_preflight(load_config(data=raw))
    assert facts["tasks"]["score"]["type"] == "regression"
    stats = facts["tasks"]["score"]["label_stats"]
    summary = {"tasks": {"sentiment": {"test": {"accuracy": 0.5}, "model_uri": "m/s"},
                         "score": {"test": {"rmse": 0.1}, "model_uri": "m/r"}}}
    add_task_summary(summary, facts)
    base = summary["tasks"]["score"]["baseline"]["mean_predictor_rmse"]
    assert base == pytest.approx(mean_predictor_rmse(stats["train"], stats["test"])) and base > 0
    assert summary["baseline"]["majority_class_accuracy"] == summary["tasks"]["sentiment"]["baseline"][
        "majority_class_accuracy"]  # the mean over the classification tasks only
    assert "mean-predictor rmse baseline" in "\n".join(task_lines(summary))


@pytest.mark.slow
def test_a_classification_and_a_regression_head_train_together_and_the_regression_export_predicts_identically(
        reg_data, tiny_bert, cls_data, tmp_path, process_group):
    from transformers import AutoModelForSequenceClassification

    from ftdist.multitask.loop import train_worker

    raw = base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": "reg"}, train={"epochs": 1},
                      scaling={"num_workers": 1})
    del raw["data"]["path"]
    raw["tasks"] = [{"name": "sentiment", "data": {"path": cls_data}},
                    {"name": "score", "type": "regression", "data": {"path": reg_data}}]
    result = train_worker(load_config(data=raw), LocalSession(str(tmp_path / "ck")))
    assert result is not None
    reg, cls = result["tasks"]["score"]["test"], result["tasks"]["sentiment"]["test"]
    assert set(reg) == {"loss", "rmse", "pearson"} and result["tasks"]["score"]["type"] == "regression"
    assert result["test"]["accuracy"] == pytest.approx((cls["accuracy"] + reg["pearson"]) / 2)
    assert result["test"]["loss"] == pytest.approx((cls["loss"] + reg["loss"]) / 2)

    trained = {}
    for line in (tmp_path / "runs" / "reg" / layout.PREDICTIONS).read_text().splitlines():
        r = json.loads(line)
        if r["task"] == "score":
            trained[r["sample_id"]] = r["prediction"]
    model = AutoModelForSequenceClassification.from_pretrained(result["tasks"]["score"]["model_uri"]).eval()
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    rows = [r for f in sorted(Path(reg_data, "test").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert sorted(trained) == sorted(r["sample_id"] for r in rows)
    se = 0.0
    for r in rows:
        with torch.no_grad():
            out = float(model(input_ids=torch.tensor([r["input_ids"]])).logits.reshape(-1)[0])
        assert out == pytest.approx(trained[r["sample_id"]], abs=1e-4)
        se += (out - r["label"]) ** 2
    assert math.sqrt(se / len(rows)) == pytest.approx(reg["rmse"], rel=1e-4)  # the export's RMSE is the run's
