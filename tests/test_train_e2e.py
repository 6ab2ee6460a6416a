"""End to end through Ray Train + DeepSpeed: 2 CPU workers, tiny real models, real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_language_model_learned, base_config, synthetic_rows, write_jsonl
from exports import assert_card_matches
from ftdist.config import load_config
from ftdist.launcher import run_training

pytestmark = pytest.mark.slow


def _predict(model_dir: str, data: str, task: str = "sequence-classification") -> dict[int, int]:
    """Predictions of the exported model, computed here from its files alone."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = {}
    for f in sorted(Path(data, "test").glob("*.parquet")):
        t = pq.read_table(f).to_pylist()
        for row in t:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([row["input_ids"]])).logits
            out[row["sample_id"]] = int(logits.argmax(-1))
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_trains_exports_and_predicts_identically(stage, tiny_bert, cls_data, tmp_path, ray_local):
    cfg = load_config(data=base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": f"z{stage}"},
                                       deepspeed={"zero_stage": stage},
                                       train={"epochs": 3, "learning_rate": 5e-3, "warmup_ratio": 0.1}))
    summary = run_training(cfg)
    epochs = summary["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"] or epochs[-1]["val_accuracy"] > 0.6
    assert summary["test"]["accuracy"] > summary["baseline"]["majority_class_accuracy"]
    assert summary["world_size"] == 2 and len(summary["node_ids"]) == 2
    run = tmp_path / "runs" / f"z{stage}"
    for name in ("summary.json", "config.yaml", "model/model.safetensors", "model/config.json",
                 "model/tokenizer.json", "model/ftdist_export.json"):
        assert (run / name).exists(), name
    # The export predicts exactly what the workers predicted on the test split.
    worker_preds = {json.loads(l)["sample_id"]: json.loads(l)["prediction"]
                    for l in (run / "test_predictions.jsonl").read_text().splitlines()}
    assert _predict(str(run / "model"), cls_data) == worker_preds
    cfg_text = (run / "config.yaml").read_text()
    assert f"zero_stage: {stage}" in cfg_text
    assert_card_matches(run / "model", summary["test"], f"z{stage}")  # the export's README.md: the summary's numbers


def test_causal_lm_trains_reports_perplexity_and_exports(tiny_gpt, clm_data, tmp_path, ray_local):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config(data=base_config(tiny_gpt, clm_data, str(tmp_path / "runs"), run={"name": "clm"},
                                       model={"task": "causal-lm"}, deepspeed={"zero_stage": 2}))
    summary = run_training(cfg)
    model_dir = tmp_path / "runs" / "clm" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert_language_model_learned(summary, model.config.vocab_size)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.pad_token is not None  # GPT-style tokenizer got a pad token (= eos)
    ids = tok("the car was great", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def test_early_stopping_triggers_on_a_raw_text_data_set_tokenized_on_the_fly(tiny_bert, tmp_path, ray_local):
    """Also the raw-text path end to end: data.prepare with tokenize: false builds text-only shards on
    first use, and each worker tokenizes its rows while reading."""
    raw = write_jsonl(tmp_path / "raw.jsonl", synthetic_rows(600))
    data = str(tmp_path / "raw-ds")
    cfg = load_config(data=base_config(tiny_bert, data, str(tmp_path / "runs"), run={"name": "es"},
                                       data={"prepare": {"input": str(raw), "tokenize": False, "rows_per_shard": 150}},
                                       train={"epochs": 6, "learning_rate": 1e-9, "eval_metric": "loss",
                                              "early_stopping_patience": 2, "early_stopping_min_delta": 0.01}))
    summary = run_training(cfg)
    assert json.loads(Path(data, "train", "manifest.json").read_text())["tokenizer"] is None
    assert summary["epochs"][0]["tokens_per_s"] > 0 and summary["test"]["loss"] > 0
    assert summary["stopped_early"] is True
    assert len(summary["epochs"]) == 3  # epoch 1 sets the bar, epochs 2-3 fail to beat it by min_delta
    # The best checkpoint is the lowest val_loss (ties: the newer), the same order Ray's retention uses,
    # and it is the one that was tested and exported.
    losses = [e["val_loss"] for e in summary["epochs"]]
    best = max(i for i, v in enumerate(losses) if v == min(losses)) + 1
    assert summary["best_epoch"] == best
    result = json.loads((tmp_path / "runs" / "es" / "train_result.json").read_text())
    assert result["best_checkpoint"].startswith(f"epoch{best:03d}")
    export = json.loads((tmp_path / "runs" / "es" / "model" / "ftdist_export.json").read_text())
    assert export["best_epoch"] == best and export["test"] == summary["test"]
