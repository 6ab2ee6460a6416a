"""LoRA on a multi-task model's shared encoder, through the worker loop in one process (LocalSession,
world size 1, real DeepSpeed): adapters in the encoder, every head trained in full, each task's
export merged into a plain HF folder that predicts exactly what the trained model predicted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import base_config, prepare_local, write_jsonl
from ftdist import run_folder as layout
from ftdist.config import load_config
from ftdist.session import LocalSession
from test_lora import CrashAfterMidEpochCheckpoint
from test_multitask_e2e import length_rows

pytestmark = pytest.mark.slow


def _config(model: str, data: dict[str, str], root: Path, stage: int, **train):
    raw = base_config(model, "unused", str(root / "runs"), run={"name": "mtl"},
                      model={"lora": {"r": 4, "alpha": 8}}, deepspeed={"zero_stage": stage},
                      train={"epochs": 1, "learning_rate": 2e-2, **train}, scaling={"num_workers": 1})
    del raw["data"]["path"]
    raw["tasks"] = [{"name": n, "data": {"path": p}} for n, p in data.items()]
    return load_config(data=raw)


def _worker_scores(run: Path) -> dict[str, dict[int, list[float]]]:
    """Per task, the trained model's class scores of each test sample (the run's test predictions)."""
    out: dict[str, dict[int, list[float]]] = {}
    for line in (run / layout.PREDICTIONS).read_text().splitlines():
        r = json.loads(line)
        out.setdefault(r["task"], {})[r["sample_id"]] = r["scores"]
    return out


def _scores(model: torch.nn.Module, data: str) -> dict[int, list[float]]:
    import pyarrow.parquet as pq

    from ftdist.inference import class_scores

    out = {}
    for f in sorted(Path(data, "test").glob("*.parquet")):
        for row in pq.read_table(f).to_pylist():
            with torch.no_grad():
                out[row["sample_id"]] = class_scores(model(input_ids=torch.tensor([row["input_ids"]])).logits)[0]
    return out


@pytest.mark.parametrize("stage", [0, 3])
def test_lora_on_the_shared_encoder_trains_heads_in_full_and_merged_exports_predict_identically(
        stage, tiny_bert, cls_data, tmp_path, process_group):
    from transformers import AutoModelForSequenceClassification

    from ftdist.multitask.loop import train_worker

    data = {"sentiment": cls_data,
            "length": prepare_local(write_jsonl(tmp_path / "len.jsonl", length_rows(120, 5)), tmp_path / "len-ds",
                                    tiny_bert, label_names=["short", "long"])}
    result = train_worker(_config(tiny_bert, data, tmp_path, stage), LocalSession(str(tmp_path / "ck")))
    assert result is not None
    # Adapters on query/value of the one encoder (2 layers x 2 x r*(32+32)), both heads in full
    # (3-way 32*3+3, 2-way 32*2+2); nothing else trains (the encoder's pooler is frozen like its base).
    assert result["trainable_params"] == 2 * 2 * 4 * 64 + 99 + 66

    run = tmp_path / "runs" / "mtl"
    trained = _worker_scores(run)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3).state_dict()
    encoders = []
    for task, path in data.items():
        model = AutoModelForSequenceClassification.from_pretrained(result["tasks"][task]["model_uri"]).eval()
        assert not any("lora" in n or "base_layer" in n for n, _ in model.state_dict().items())
        exported = _scores(model, path)
        assert exported.keys() == trained[task].keys()
        for i, sc in exported.items():  # the same class scores (not only the same argmax)
            assert sc == pytest.approx(trained[task][i], abs=1e-4), f"{task}: the merged export scores otherwise"
        sd = model.state_dict()
        w = "bert.encoder.layer.0.attention.self."
        assert not torch.equal(sd[w + "query.weight"], base[w + "query.weight"])  # the adapter is merged in
        assert torch.equal(sd[w + "key.weight"], base[w + "key.weight"])  # not adapted: the base's, untouched
        encoders.append(sd[w + "value.weight"])
    assert torch.equal(encoders[0], encoders[1])  # one shared encoder in both exports
    info = json.loads((run / layout.MODEL / layout.MULTITASK_HEADS / "multitask.json").read_text())
    assert info["lora"]["r"] == 4


def test_lora_multitask_resumes_mid_epoch_to_the_same_result(tiny_bert, cls_data, tmp_path, process_group):
    """Adapters, heads, their optimizer state and every task's position come back from a mid-epoch checkpoint.

    ZeRO-0: at ZeRO-3 a resumed multi-task run (with or without LoRA) drifts from the uninterrupted one
    from the first step after the restore on (losses equal at that step, ~0.4% apart at the next); a
    single-task ZeRO-3 run resumes exactly (test_lora). Not resolved here: see the branch's report."""
    from ftdist.multitask.loop import train_worker

    data = {"sentiment": cls_data, "again": cls_data}
    kw = {"max_steps_per_epoch": 6, "checkpoint_every_steps": 4}
    clean = train_worker(_config(tiny_bert, data, tmp_path / "a", 0, **kw), LocalSession(str(tmp_path / "ca")))
    cfg = _config(tiny_bert, data, tmp_path / "b", 0, **kw)
    with pytest.raises(RuntimeError, match="worker killed"):
        train_worker(cfg, CrashAfterMidEpochCheckpoint(str(tmp_path / "cb")))
    resumed = train_worker(cfg, LocalSession(str(tmp_path / "cb")))
    assert clean is not None and resumed is not None
    assert [e["val_loss"] for e in resumed["epochs"]] == [e["val_loss"] for e in clean["epochs"]]
    assert resumed["test"] == clean["test"]
    for got, want in zip(resumed["epochs"], clean["epochs"], strict=True):
        # The resumed epoch's train losses (each task's and the mean) and throughput cover its
        # batches before the kill too, as a single-task run's do (issue 24, item 8).
        for key in sorted(k for k in want if k.endswith("train_loss")):
            assert got[key] == pytest.approx(want[key], rel=1e-12), key
        assert got["samples_per_s"] * got["train_time_s"] == pytest.approx(want["samples_per_s"] * want["train_time_s"])
