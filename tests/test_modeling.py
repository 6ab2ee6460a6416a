"""Model loading: a new task head is expected; pre-trained weights missing from the checkpoint are not."""

from __future__ import annotations

import logging
import shutil

import pytest

from ftdist.config import ModelSection
from ftdist.modeling import load_model


def _load(path: str):
    return load_model(ModelSection(path=path, task="sequence-classification"), 3, None, 0)


def test_missing_pretrained_weights_warn_but_a_new_task_head_does_not(tiny_bert, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    with caplog.at_level(logging.INFO, logger="ftdist.modeling"):
        _load(tiny_bert)
    assert "new task head initialised: classifier.bias, classifier.weight" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_bert, damaged)
    weights = load_file(damaged / "model.safetensors")
    dropped = next(k for k in weights if "layer.1.output.dense.weight" in k)
    del weights[dropped]
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ftdist.modeling"):
        _load(str(damaged))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "layer.1.output.dense.weight" in warnings[0] and "is model.path" in warnings[0]


def _tiny_deberta(path) -> str:
    """DeBERTa-v2 declares no SDPA path in transformers (its ``_supports_sdpa`` is False)."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    cfg = DebertaV2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=32)
    DebertaV2ForSequenceClassification(cfg).save_pretrained(path)
    return str(path)


def test_an_architecture_without_sdpa_loads_its_default_attention_with_one_warning(tmp_path, caplog):
    path = _tiny_deberta(tmp_path / "deberta")
    for requested, says in (("sdpa", ["no sdpa path"]), ("flash_attention_2", ["flash-attn", "no sdpa path"])):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ftdist.modeling"):
            model = load_model(ModelSection(path=path, attn_implementation=requested), 2, None, 0)
        assert model.config._attn_implementation == "eager"
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and all(w in warnings[0] for w in says), warnings
        assert "\n" not in warnings[0]


def test_the_attention_is_decided_before_loading_from_what_the_architecture_declares(tiny_bert):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ftdist.modeling import supported_attention

    bert = AutoConfig.from_pretrained(tiny_bert)
    assert supported_attention(AutoModelForSequenceClassification, bert, "sdpa") == ("sdpa", None)
    assert supported_attention(AutoModelForSequenceClassification, bert, "eager") == ("eager", None)
    assert supported_attention(AutoModelForSequenceClassification, bert, None) == (None, None)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_a_masked_lm_export_gets_the_base_models_pooler(arch, tmp_path):
    """carry_base_pooler: a classifier loaded from a masked-LM export starts from the base model's
    pooler, not a random one; the encoder's prefix is found (bert., roberta.), nothing else changes."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    from ftdist.export import carry_base_pooler

    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64)
    AutoModel.from_config(config).save_pretrained(tmp_path / "base")  # an encoder with its pooler
    mlm = AutoModelForMaskedLM.from_pretrained(tmp_path / "base")
    mlm.save_pretrained(tmp_path / "export")
    before = (tmp_path / "export" / "model.safetensors").read_bytes()
    _, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export", output_loading_info=True)
    # what the export lacked (RoBERTa's classifier reads no pooler: carried anyway, unused)
    assert any(".pooler." in k for k in info["missing_keys"]) == (arch == "bert")
    added = carry_base_pooler(str(tmp_path / "export"), str(tmp_path / "base"))
    assert added == [f"{arch}.pooler.dense.bias", f"{arch}.pooler.dense.weight"]
    cls, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not [k for k in info["missing_keys"] if ".pooler." in k]
    base = AutoModel.from_pretrained(tmp_path / "base")
    if arch == "bert":
        assert torch.equal(cls.bert.pooler.dense.weight, base.pooler.dense.weight)
    assert carry_base_pooler(str(tmp_path / "export"), str(tmp_path / "base")) == []  # once
    assert len((tmp_path / "export" / "model.safetensors").read_bytes()) > len(before)
