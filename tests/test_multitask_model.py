"""The multi-head model: one encoder in the module tree, each task's forward is that task's own HF
model, and a task's export is a standard folder AutoModelForSequenceClassification loads alone."""

from __future__ import annotations

import torch

from ftdist.config import ModelSection
from ftdist.modeling import load_model
from ftdist.multitask.model import MultiTaskModel, task_state_dict


def _model(tiny_bert: str) -> MultiTaskModel:
    torch.manual_seed(0)
    models = {"sent": load_model(ModelSection(path=tiny_bert), 3, ["neg", "neu", "pos"], 0),
              "len": load_model(ModelSection(path=tiny_bert), 2, ["short", "long"], 0)}
    return MultiTaskModel(models, {"sent": 1.0, "len": 0.25})


def test_encoder_is_shared_and_heads_have_their_own_shapes(tiny_bert):
    m = _model(tiny_bert)
    names = [n for n, _ in m.named_parameters()]
    assert not any(n.startswith("heads.sent.bert.") or n.startswith("heads.len.bert.") for n in names)
    assert m.heads["sent"].classifier.weight.shape == (3, 32) and m.heads["len"].classifier.weight.shape == (2, 32)
    enc = sum(p.numel() for n, p in m.named_parameters() if n.startswith("encoder."))
    heads = sum(p.numel() for n, p in m.named_parameters() if n.startswith("heads."))
    assert heads == (3 * 32 + 3) + (2 * 32 + 2) and enc > 10 * heads


def test_loss_weight_applies_in_training_only_and_gradients_reach_the_shared_encoder(tiny_bert):
    m = _model(tiny_bert)
    batch = {"input_ids": torch.tensor([[101, 2000, 102], [101, 3000, 102]]),
             "attention_mask": torch.ones(2, 3, dtype=torch.long), "labels": torch.tensor([0, 1])}
    m.eval()
    m.active_task = "len"
    plain = m(**batch).loss
    m.train()
    torch.manual_seed(1)
    weighted = m(**batch)
    m.loss_weights["len"] = 1.0
    torch.manual_seed(1)  # the same dropout masks
    assert torch.allclose(weighted.loss, 0.25 * m(**batch).loss)
    m.eval()
    assert torch.allclose(m(**batch).loss, plain)  # validation losses are not weighted
    weighted.loss.backward()
    assert m.encoder.embeddings.word_embeddings.weight.grad is not None
    assert m.heads["len"].classifier.weight.grad is not None and m.heads["sent"].classifier.weight.grad is None


def test_task_export_loads_with_automodel_alone_and_predicts_the_same(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    m = _model(tiny_bert).eval()
    with torch.no_grad():
        m.encoder.embeddings.word_embeddings.weight.add_(0.5)  # trained weights, not the pre-trained ones
    batch = {"input_ids": torch.tensor([[101, 2000, 2001, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    for task, labels in (("sent", {0: "neg", 1: "neu", 2: "pos"}), ("len", {0: "short", 1: "long"})):
        m.active_task = task
        with torch.no_grad():
            want = m(**batch).logits
        with m.task_model(task) as hf:
            hf.save_pretrained(tmp_path / task, state_dict=task_state_dict(m.state_dict(), m.prefix, task))
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / task).eval()
        assert loaded.config.id2label == labels
        with torch.no_grad():
            assert torch.allclose(loaded(**batch).logits, want, atol=1e-6)
    assert "bert" not in dict(m.heads["sent"].named_children())  # the encoder was only lent for the save
