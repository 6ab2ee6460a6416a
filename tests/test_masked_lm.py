"""model.task: masked-lm (issue 14, domain-adaptive pre-training): unlabelled text prepared without
labels, masking by transformers' language-modeling collator seeded per batch, loss and perplexity
over masked tokens, and an export that loads with AutoModelForMaskedLM."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_language_model_learned, base_config, run_cli, synthetic_rows, write_jsonl
from ftdist.config import PrepareSection, StorageSection, load_config
from ftdist.data.collate import IGNORE_INDEX, collate
from ftdist.data.masking import Masker


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def batch_of(tokenizer, n: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    rows = [{"input_ids": tokenizer(r["text"])["input_ids"], "sample_id": i}
            for i, r in enumerate(synthetic_rows(n, seed=seed))]
    return collate(rows, tokenizer.pad_token_id, "masked-lm")


def test_masking_is_seeded_by_position_and_never_touches_special_tokens_or_padding(tokenizer):
    masker = Masker(tokenizer, 0.15, seed=7, model_path="tiny")
    batch = batch_of(tokenizer, 64)
    original = batch["input_ids"].clone()
    a, b = masker(batch, (0, 0, 3)), masker(batch, (0, 0, 3))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])  # same position
    c = masker(batch, (0, 0, 4))
    assert not torch.equal(a["labels"], c["labels"])  # another batch position draws another mask
    masked = a["labels"] != IGNORE_INDEX
    # Labels hold the original tokens exactly where a token was masked, and nowhere else.
    assert torch.equal(a["labels"][masked], batch["input_ids"][masked])
    fixed = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids)) | (batch["attention_mask"] == 0)
    assert not (masked & fixed).any()
    share = masked.sum().item() / (~fixed).sum().item()
    assert 0.10 < share < 0.20, share  # mlm_probability 0.15 over ~700 maskable tokens
    assert (a["input_ids"][masked] == tokenizer.mask_token_id).float().mean() > 0.6  # 80% [MASK], rest random/kept
    assert torch.equal(a["input_ids"][~masked], batch["input_ids"][~masked])  # unmasked positions untouched
    assert torch.equal(batch["input_ids"], original)  # the collated batch itself is not modified


def test_a_batch_that_draws_no_mask_still_has_one_masked_token(tokenizer):
    """A masked-LM loss over zero tokens is NaN, which would stop the run as a diverged loss."""
    masker = Masker(tokenizer, 1e-6, seed=0, model_path="tiny")
    out = masker(batch_of(tokenizer, 2), (0, 0, 0))
    assert (out["labels"] != IGNORE_INDEX).sum() == 1


def test_a_tokenizer_without_a_mask_token_is_one_line(tiny_gpt):
    from transformers import AutoTokenizer

    from ftdist.errors import UserError

    with pytest.raises(UserError, match="needs a tokenizer with a mask token"):
        Masker(AutoTokenizer.from_pretrained(tiny_gpt), 0.15, 0, tiny_gpt)


def test_prepare_masked_lm_needs_no_labels(tiny_bert, tmp_path):
    from ftdist.data.prepare import prepare

    raw = write_jsonl(tmp_path / "raw.jsonl", [{"text": r["text"]} for r in synthetic_rows(60)])
    manifests = prepare(PrepareSection(input=str(raw), label_field=None), str(tmp_path / "ds"), tiny_bert, 64,
                        "masked-lm", StorageSection())
    assert manifests["train"].task == "masked-lm" and "label" not in manifests["train"].columns


@pytest.mark.slow
def test_masked_lm_trains_reports_perplexity_exports_and_is_not_served(tiny_bert, tmp_path, ray_local):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from ftdist.launcher import run_training

    raw = write_jsonl(tmp_path / "raw.jsonl", [{"text": r["text"]} for r in synthetic_rows(500, seed=2)])
    cfg = load_config(data=base_config(
        tiny_bert, str(tmp_path / "ds"), str(tmp_path / "runs"), run={"name": "mlm"},
        model={"task": "masked-lm"}, data={"prepare": {"input": str(raw), "label_field": None, "rows_per_shard": 150}},
        train={"epochs": 2, "learning_rate": 5e-3}, deepspeed={"zero_stage": 1}))
    summary = run_training(cfg)
    model_dir = tmp_path / "runs" / "mlm" / "model"
    model = AutoModelForMaskedLM.from_pretrained(model_dir)
    assert_language_model_learned(summary, model.config.vocab_size)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(f"the car was {tok.mask_token}", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size
    # A masked-LM export is a starting point for a task, not a service: refused in one line.
    out = run_cli("predict", str(model_dir), "--input", str(raw), "--output", str(tmp_path / "pred"))
    assert out.returncode == 2 and "masked-LM export" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert json.loads((tmp_path / "runs" / "mlm" / "model" / "ftdist_export.json").read_text())["task"] == "masked-lm"
