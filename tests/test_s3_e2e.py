"""The whole object-storage path against a real S3 server (moto, on loopback):
raw file in S3 -> prepare -> 2-worker Ray Train + DeepSpeed streaming from S3 -> checkpoints,
summary and export in S3 -> the export loads."""

from __future__ import annotations

import json
import tempfile

import pytest

from conftest import base_config, synthetic_rows
from ftdist.config import PrepareSection, StorageSection, load_config
from ftdist.data.prepare import prepare
from ftdist.launcher import run_training

pytestmark = pytest.mark.slow


def test_prepare_train_checkpoint_export_all_in_s3(s3_server, s3_bucket, tiny_bert, ray_local):
    fs = s3_server.fs()
    raw = f"{s3_bucket}/raw/tickets.jsonl"
    fs.pipe(raw[5:], "".join(json.dumps(r) + "\n" for r in synthetic_rows(600, seed=3)).encode())
    storage = StorageSection(endpoint_url=s3_server.endpoint)
    ms = prepare(PrepareSection(input=raw, rows_per_shard=100), f"{s3_bucket}/ds/tickets", tiny_bert, 64,
                 "sequence-classification", storage, label_names=["negative", "neutral", "positive"])
    assert ms["train"].num_rows + ms["validation"].num_rows + ms["test"].num_rows == 600
    assert len(ms["train"].shards) >= 4
    assert fs.exists(f"{s3_bucket[5:]}/ds/tickets/train/manifest.json")

    fs.put(tiny_bert, f"{s3_bucket[5:]}/models/tiny-bert", recursive=True)  # model.path may be s3:// too
    cfg = load_config(data=base_config(f"{s3_bucket}/models/tiny-bert", f"{s3_bucket}/ds/tickets", f"{s3_bucket}/runs",
                                       run={"name": "s3run"}, deepspeed={"zero_stage": 2},
                                       storage={"endpoint_url": s3_server.endpoint}))
    summary = run_training(cfg)
    run = f"{s3_bucket[5:]}/runs/s3run"
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(run)}
    assert {"summary.json", "config.yaml", "model", "train_result.json"} <= names
    assert any(n.startswith("epoch002") for n in names)
    assert json.loads(fs.cat(f"{run}/summary.json"))["test"] == summary["test"]
    assert summary["test"]["accuracy"] > summary["baseline"]["majority_class_accuracy"]

    from transformers import AutoModelForSequenceClassification

    with tempfile.TemporaryDirectory() as d:
        fs.get(f"{run}/model/", d, recursive=True)
        model = AutoModelForSequenceClassification.from_pretrained(d)
        assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
