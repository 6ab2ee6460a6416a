"""Multi-task training at ZeRO-0 and ZeRO-3 in one process (LocalSession, world size 1, real
DeepSpeed): ZeRO-3 partitions the shared encoder and every head, gathers only the active head's
weights per batch, and the per-task exports are consolidated into standard loadable folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import base_config, prepare_local, write_jsonl
from ftdist import run_folder as layout
from ftdist.config import ModelSection, load_config
from ftdist.modeling import load_model
from ftdist.multitask.export import load_multitask_weights
from ftdist.multitask.model import MultiTaskModel
from ftdist.session import LocalSession
from test_multitask_e2e import length_rows

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", [0, 3])
def test_multitask_trains_and_exports_at_zero_stage(stage, tiny_bert, cls_data, tmp_path, process_group):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ftdist.multitask.loop import train_worker

    length_data = prepare_local(write_jsonl(tmp_path / "len.jsonl", length_rows(120, 5)), tmp_path / "len-ds",
                                tiny_bert, label_names=["short", "long"])
    raw = base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": f"z{stage}"},
                      train={"epochs": 1}, deepspeed={"zero_stage": stage}, scaling={"num_workers": 1})
    del raw["data"]["path"]
    raw["tasks"] = [{"name": "sentiment", "data": {"path": cls_data}},
                    {"name": "length", "data": {"path": length_data}}]
    raw["multitask"] = {"sampling": "equal"}
    result = train_worker(load_config(data=raw), LocalSession(str(tmp_path / "ckpt")))
    assert result is not None
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    enc = tok(["the car was great today", "awful road"], return_tensors="pt", padding=True)
    logits = {}
    for task, k in (("sentiment", 3), ("length", 2)):
        model = AutoModelForSequenceClassification.from_pretrained(result["tasks"][task]["model_uri"]).eval()
        assert model.config.num_labels == k
        with torch.no_grad():
            logits[task] = model(**enc).logits
        assert torch.isfinite(logits[task]).all()
    # the two exports share the encoder: identical encoder weights in both folders
    a = AutoModelForSequenceClassification.from_pretrained(result["tasks"]["sentiment"]["model_uri"])
    b = AutoModelForSequenceClassification.from_pretrained(result["tasks"]["length"]["model_uri"])
    assert torch.equal(a.bert.embeddings.word_embeddings.weight, b.bert.embeddings.word_embeddings.weight)
    pre = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    assert not torch.equal(a.bert.embeddings.word_embeddings.weight, pre.bert.embeddings.word_embeddings.weight)

    # The multi-head export loads back into a multi-task model and predicts what each task's export does.
    models = {"sentiment": load_model(ModelSection(path=tiny_bert), 3, None, 0),
              "length": load_model(ModelSection(path=tiny_bert), 2, None, 0)}
    multi = MultiTaskModel(models, {"sentiment": 1.0, "length": 1.0}).eval()
    load_multitask_weights(multi, str(Path(result["model_uri"]) / layout.MULTITASK_HEADS))
    for task in ("sentiment", "length"):
        multi.active_task = task
        with torch.no_grad():
            assert torch.allclose(multi(**enc).logits, logits[task], atol=1e-5)
