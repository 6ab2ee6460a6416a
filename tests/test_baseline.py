"""The classical baseline beside the majority class: TF-IDF + logistic regression fitted on the run's
real prepared train split and scored on its test split (scikit-learn, no mocks, no Ray), the
bounded sample, the switch, and the plain sentence when fine-tuning does not beat it."""

from __future__ import annotations

import pytest

from conftest import NAMES, base_config, prepare_local, synthetic_rows, write_jsonl
from ftdist.baseline import read_split, tfidf_baseline
from ftdist.config import load_config
from ftdist.diagnoses import baseline_wins, diagnose


def _cfg(model: str, data: str, tmp_path, **tracking):
    return load_config(data=base_config(model, data, str(tmp_path), tracking=tracking))


def test_the_baseline_learns_the_synthetic_task_from_token_ids(tiny_bert, cls_data, tmp_path):
    """The label is carried by one word: a bag of word pieces separates the classes almost perfectly."""
    b = tfidf_baseline(_cfg(tiny_bert, cls_data, tmp_path), 3, NAMES)
    assert b is not None and b["features"] == "input_ids" and not b["sampled"]
    docs, labels, _ = read_split(_cfg(tiny_bert, cls_data, tmp_path), "train", None)
    assert b["train_rows"] == len(docs) == len(labels) > 400
    assert b["test"]["macro_f1"] > 0.9 and b["test"]["accuracy"] > 0.9, b["test"]
    assert [r["label"] for r in b["test_per_class"]] == NAMES
    assert b["fit_time_s"] < 30


def test_the_baseline_uses_the_text_when_the_data_set_keeps_it(tiny_bert, tmp_path):
    from ftdist.config import PrepareSection, StorageSection
    from ftdist.data.prepare import prepare

    raw = write_jsonl(tmp_path / "raw.jsonl", synthetic_rows(300, seed=3))
    spec = PrepareSection(input=str(raw), rows_per_shard=100, tokenize=False)
    prepare(spec, str(tmp_path / "ds"), None, 64, "sequence-classification", StorageSection(), label_names=NAMES)
    b = tfidf_baseline(_cfg(tiny_bert, str(tmp_path / "ds"), tmp_path / "runs"), 3, NAMES)
    assert b is not None and b["features"] == "text" and b["test"]["macro_f1"] > 0.9


def test_a_bounded_sample_of_train_rows_and_the_switch_off(tiny_bert, cls_data, tmp_path):
    b = tfidf_baseline(_cfg(tiny_bert, cls_data, tmp_path, baseline_max_rows=20), 3, NAMES)
    assert b is not None and b["train_rows"] == 20 and b["sampled"]
    assert tfidf_baseline(_cfg(tiny_bert, cls_data, tmp_path, baseline=False), 3, NAMES) is None


def test_a_baseline_on_data_without_signal_is_near_chance(tiny_bert, tmp_path):
    """Labels drawn independently of the text: the baseline must not score well (it is really fitted)."""
    import random

    rng = random.Random(5)
    rows = [{**r, "label": rng.choice(NAMES)} for r in synthetic_rows(450, seed=9)]
    data = prepare_local(write_jsonl(tmp_path / "raw.jsonl", rows), tmp_path / "ds", tiny_bert, rows_per_shard=100)
    b = tfidf_baseline(_cfg(tiny_bert, data, tmp_path / "runs"), 3, NAMES)
    assert b is not None and b["test"]["macro_f1"] < 0.6, b["test"]


def test_fine_tuning_that_does_not_beat_the_baseline_is_said_plainly():
    base = {"test": {"accuracy": 0.8, "macro_f1": 0.7}}
    d = baseline_wins({"accuracy": 0.7, "macro_f1": 0.55}, base)
    assert d is not None and d["code"] == "baseline_wins"
    assert "does not beat" in d["message"] and "0.550 vs 0.700" in d["message"]
    assert baseline_wins({"accuracy": 0.9, "macro_f1": 0.71}, base) is None
    assert baseline_wins({"accuracy": 0.9, "macro_f1": 0.71}, None) is None
    summary = {"test": {"macro_f1": 0.6}, "baseline": {"tfidf_logreg": base}, "global_step": 500, "epochs": [],
               "eval_metric": "accuracy", "eval_mode": "max", "config": {"train": {}}}
    assert [d["code"] for d in diagnose(summary)] == ["baseline_wins"]


def test_the_printed_report_shows_the_baseline_and_its_sample():
    from ftdist.launcher import format_summary

    summary = {"run": "r", "world_size": 1, "device": "cpu", "precision": "fp32", "eval_metric": "accuracy",
               "epochs": [{"epoch": 1, "train_loss": 1.0, "val_accuracy": 0.6, "samples_per_s": 10.0}],
               "best_epoch": 1, "test": {"loss": 0.9, "accuracy": 0.6, "macro_f1": 0.5}, "throughput": {},
               "wall_time_s": 3.0, "model_uri": "/m", "run_dir": "/r",
               "baseline": {"tfidf_logreg": {"test": {"accuracy": 0.75, "macro_f1": 0.7}, "train_rows": 50000,
                                             "sampled": True}}}
    line = next(x for x in format_summary(summary).splitlines() if "TF-IDF" in x)
    assert "macro_f1 0.7000" in line and "-0.2000" in line and "sample of 50000 train rows" in line


@pytest.mark.parametrize("bad", [{"baseline_max_rows": 0}, {"baseline": "maybe"}])
def test_bad_baseline_keys_are_one_line(tiny_bert, cls_data, tmp_path, bad):
    from ftdist.errors import UserError

    with pytest.raises(UserError, match="tracking.baseline"):
        _cfg(tiny_bert, cls_data, tmp_path, **bad)
