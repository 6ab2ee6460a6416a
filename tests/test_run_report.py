"""What a finished run says about itself: per-class figures from a confusion matrix, diagnoses a
user can act on (each a pure function over the run's history and metrics), the printed report,
and the one line a diverged loss stops the run with. No training: hand-made numbers."""

from __future__ import annotations

import math

import pytest
import torch

from ftdist.diagnoses import (check_loss_finite, diagnose, few_optimizer_steps, loss_not_decreasing,
                              minority_classes_missed, one_class_predictions, overfitting, truncated_examples)
from ftdist.errors import LossDiverged, RunFailed
from ftdist.metrics import per_class_metrics

NAMES = ["negative", "neutral", "positive"]


def test_per_class_precision_recall_f1_and_support_from_a_confusion_matrix():
    # rows: true class, columns: predicted class
    conf = torch.tensor([[5, 1, 0], [2, 3, 1], [0, 0, 0]])
    rows = per_class_metrics(conf, NAMES)
    assert [r["label"] for r in rows] == NAMES
    neg, neu, pos = rows
    assert neg["precision"] == pytest.approx(5 / 7) and neg["recall"] == pytest.approx(5 / 6)
    assert neg["f1"] == pytest.approx(2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6)) and neg["support"] == 6
    assert neu["precision"] == pytest.approx(3 / 4) and neu["recall"] == pytest.approx(0.5)
    assert neu["f1"] == pytest.approx(0.6) and neu["support"] == 6
    assert pos == {"label": "positive", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_per_class_names_default_to_class_ids():
    assert [r["label"] for r in per_class_metrics(torch.eye(2, dtype=torch.long), None)] == ["0", "1"]


def test_one_class_predictions_is_diagnosed_at_95_percent_of_predictions():
    collapsed = [[40, 0, 1], [30, 0, 0], [29, 0, 0]]  # 99 of 100 predictions are class 0
    d = one_class_predictions(collapsed, NAMES, learning_rate=5e-5)
    assert d is not None and d["code"] == "one_class"
    assert "negative" in d["message"] and "99%" in d["message"] and "learning_rate" in d["message"]
    assert one_class_predictions([[40, 0, 7], [30, 0, 0], [29, 0, 0]], NAMES, 5e-5) is None  # 99 of 106: 93%
    assert one_class_predictions([[10, 2, 1], [1, 9, 3], [0, 2, 12]], NAMES, 5e-5) is None
    assert one_class_predictions([[0, 0], [0, 0]], None, 5e-5) is None  # nothing predicted: nothing to say


def test_too_few_optimizer_steps_names_the_count_and_what_to_try():
    d = few_optimizer_steps(12)
    assert d is not None and d["code"] == "few_optimizer_steps"
    assert "12 optimizer steps" in d["message"] and "train.epochs" in d["message"] and "batch_size" in d["message"]
    assert few_optimizer_steps(50) is None


def _history(vals: list[float], losses: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "train_loss": l, "val_accuracy": v} for i, (v, l) in enumerate(zip(vals, losses))]


def test_overfitting_when_validation_falls_for_two_epochs_while_train_loss_falls():
    h = _history([0.70, 0.74, 0.72, 0.69], [0.9, 0.6, 0.4, 0.2])
    d = overfitting(h, "accuracy", "max", early_stopping_patience=None)
    assert d is not None and d["code"] == "overfitting"
    assert "early_stopping_patience" in d["message"] and "epoch 2" in d["message"]
    assert overfitting(h, "accuracy", "max", early_stopping_patience=2) is None  # early stopping is on
    assert overfitting(_history([0.70, 0.74, 0.72, 0.75], [0.9, 0.6, 0.4, 0.2]), "accuracy", "max", None) is None
    # falling validation while train loss rises too is not overfitting
    assert overfitting(_history([0.70, 0.74, 0.72, 0.69], [0.9, 0.6, 0.7, 0.8]), "accuracy", "max", None) is None
    # mode min: a rising validation loss is the fall
    hl = [{"epoch": i + 1, "train_loss": l, "val_loss": v} for i, (v, l) in
          enumerate(zip([0.8, 0.6, 0.65, 0.7], [0.9, 0.6, 0.4, 0.2]))]
    assert overfitting(hl, "loss", "min", None) is not None


def test_diagnose_collects_every_finding_of_a_summary():
    summary = {"val_confusion": [[40, 0, 1], [30, 0, 0], [29, 0, 0]], "label_names": NAMES, "global_step": 9,
               "epochs": _history([0.4, 0.4], [1.1, 1.0]), "eval_metric": "accuracy", "eval_mode": "max",
               "config": {"train": {"learning_rate": 5e-5, "early_stopping_patience": None}}}
    assert [d["code"] for d in diagnose(summary)] == ["one_class", "few_optimizer_steps"]
    summary.update(train_log=[[1, 1.1], [2, 1.1], [3, 1.12], [4, 1.1]],
                   train_token_lengths={"truncated_rows": 30, "p95": 200, "max": 400, "rows": 100, "max_length": 128})
    assert [d["code"] for d in diagnose(summary)] == ["one_class", "few_optimizer_steps", "loss_not_decreasing",
                                                      "truncated"]


def test_a_loss_that_does_not_fall_is_diagnosed_from_the_log_lines():
    flat = [[i, v] for i, v in enumerate([0.69, 0.70, 0.68, 0.71, 0.69, 0.70, 0.70, 0.69])]
    d = loss_not_decreasing(flat)
    assert d is not None and d["code"] == "loss_not_decreasing" and "learning_rate" in d["message"]
    assert "0.6950" in d["message"] and "0.6950" in d["message"].split("first")[1]
    falling = [[i, v] for i, v in enumerate([1.1, 1.0, 0.9, 0.8, 0.6, 0.5, 0.4, 0.3])]
    assert loss_not_decreasing(falling) is None
    rising = [[i, v] for i, v in enumerate([0.5, 0.6, 0.7, 0.9])]
    assert loss_not_decreasing(rising) is not None
    assert loss_not_decreasing(flat[:3]) is None  # too few log lines to tell


def test_minority_classes_missed_without_class_weights_names_the_fix():
    rows = per_class_metrics(torch.tensor([[160, 8, 2], [11, 8, 1], [9, 2, 1]]), NAMES)
    d = minority_classes_missed(rows, None)
    assert d is not None and d["code"] == "minority_classes_missed"
    assert "'neutral' 0.40 (20 examples)" in d["message"] and "'positive' 0.08 (12 examples)" in d["message"]
    assert "'negative' has 0.94" in d["message"] and "class_weights: balanced" in d["message"]
    assert "macro_f1" in d["message"]
    assert minority_classes_missed(rows, "balanced") is None  # weights already on: nothing new to advise
    balanced = per_class_metrics(torch.tensor([[50, 5, 5], [6, 40, 4], [3, 3, 44]]), NAMES)
    assert minority_classes_missed(balanced, None) is None
    weak = per_class_metrics(torch.tensor([[30, 20, 10], [20, 20, 10], [20, 10, 20]]), NAMES)
    assert minority_classes_missed(weak, None) is None  # no class is found reliably: not a lean to one


def test_truncation_names_the_share_and_the_length_keeping_95_percent_whole():
    d = truncated_examples({"truncated_rows": 25, "p95": 212, "max": 900, "rows": 100, "max_length": 128})
    assert d is not None and d["code"] == "truncated"
    assert "25%" in d["message"] and "max_length 128" in d["message"] and "data.max_length: 212" in d["message"]
    assert truncated_examples({"truncated_rows": 9, "p95": 120, "max": 900, "rows": 100, "max_length": 128}) is None
    assert truncated_examples(None) is None  # a raw-text data set: prepare did not tokenize


def test_a_non_finite_loss_stops_with_one_line_naming_the_step_and_what_to_try():
    check_loss_finite(0.5, step=3)
    for bad in (math.nan, math.inf):
        with pytest.raises(LossDiverged) as e:
            check_loss_finite(bad, step=7)
        msg = str(e.value)
        assert isinstance(e.value, RunFailed) and e.value.exit_code == 1 and "\n" not in msg
        assert "step 7" in msg and "learning_rate" in msg and "checkpoint" in msg


def test_a_diverged_loss_on_a_worker_is_recovered_as_its_line():
    import traceback

    from ray.train import WorkerGroupError

    from ftdist.failures import diverged_loss_from_ray

    with pytest.raises(LossDiverged) as raised:
        check_loss_finite(math.nan, step=4)
    remote = RuntimeError("".join(traceback.format_exception(raised.value)))
    err = WorkerGroupError("Training failed due to worker errors", {0: remote})
    assert diverged_loss_from_ray(err) == str(raised.value)
    assert diverged_loss_from_ray(RuntimeError("boom")) is None


def test_the_printed_report_has_a_per_class_table_and_the_diagnoses():
    from ftdist.launcher import format_summary

    per_class = per_class_metrics(torch.tensor([[5, 1, 0], [2, 3, 1], [0, 0, 4]]), NAMES)
    summary = {"run": "r", "world_size": 1, "device": "cpu", "precision": "fp32", "eval_metric": "accuracy",
               "epochs": [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_accuracy": 0.6,
                           "samples_per_s": 10.0}], "best_epoch": 1, "test": {"loss": 0.9, "accuracy": 0.6},
               "test_per_class": per_class, "throughput": {}, "wall_time_s": 3.0, "model_uri": "/m",
               "run_dir": "/r", "diagnoses": [{"code": "few_optimizer_steps", "message": "only 3 optimizer steps"}]}
    text = format_summary(summary)
    lines = text.splitlines()
    header = next(i for i, l in enumerate(lines) if "precision" in l and "recall" in l and "support" in l)
    assert "negative" in lines[header + 1] and "0.714" in lines[header + 1] and lines[header + 1].rstrip().endswith("6")
    assert "positive" in lines[header + 3]
    assert any("only 3 optimizer steps" in l for l in lines)
