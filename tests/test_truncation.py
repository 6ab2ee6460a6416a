"""What ``data prepare`` records about lengths (token counts before truncation) and the truncation
diagnosis the run derives from them: a real tokenizer on real texts, no training."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from conftest import base_config, prepare_local, synthetic_rows, write_jsonl
from ftdist.config import load_config
from ftdist.diagnoses import truncated_examples


def _long_rows(n_long: int, n_short: int) -> list[dict]:
    rng = random.Random(2)
    rows = synthetic_rows(n_long + n_short, seed=6)
    for r in rows[:n_long]:  # 60..200 words: far past max_length 64 tokens
        r["text"] += " " + " ".join(rng.choice(["road", "car", "today", "drive"]) for _ in range(rng.randint(60, 200)))
    return rows


def test_prepare_records_the_untruncated_lengths_and_the_run_diagnoses_truncation(tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    from ftdist.preflight import preflight

    rows = _long_rows(90, 210)
    data = prepare_local(write_jsonl(tmp_path / "raw.jsonl", rows), tmp_path / "ds", tiny_bert, rows_per_shard=50)
    man = json.loads((Path(data) / "train" / "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    # the train split's sample ids are row numbers: recompute its full lengths independently
    import pyarrow.parquet as pq

    train_ids = [i for f in sorted((Path(data) / "train").glob("*.parquet"))
                 for i in pq.read_table(f, columns=["sample_id"]).column(0).to_pylist()]
    full = sorted(len(tok(rows[i]["text"])["input_ids"]) for i in train_ids)
    want = {"truncated_rows": sum(n > 64 for n in full), "p95": full[math.ceil(0.95 * len(full)) - 1],
            "max": full[-1]}
    assert man["token_lengths"] == want and want["truncated_rows"] > 0.2 * len(full)
    cfg = load_config(data=base_config(tiny_bert, data, str(tmp_path / "runs"), scaling={"num_workers": 1}))
    lengths = preflight(cfg)["token_lengths"]
    assert lengths == {**want, "rows": len(full), "max_length": 64}
    d = truncated_examples(lengths)
    assert d is not None and f"data.max_length: {want['p95']}" in d["message"]
    assert f"{want['truncated_rows'] / len(full):.0%}" in d["message"]


def test_short_texts_are_not_truncated(tiny_bert, cls_data):
    man = json.loads((Path(cls_data) / "train" / "manifest.json").read_text())
    assert man["token_lengths"]["truncated_rows"] == 0 and man["token_lengths"]["max"] <= 64


def test_a_manifest_with_a_malformed_length_record_is_one_line(tiny_bert, cls_data, tmp_path):
    import shutil

    from ftdist.config import StorageSection
    from ftdist.data.manifest import load_manifest
    from ftdist.errors import UserError

    shutil.copytree(cls_data, tmp_path / "ds")
    path = tmp_path / "ds" / "train" / "manifest.json"
    man = json.loads(path.read_text())
    man["token_lengths"] = {"truncated_rows": -1, "p95": 3, "max": 4}
    path.write_text(json.dumps(man))
    with pytest.raises(UserError, match="token_lengths"):
        load_manifest(str(tmp_path / "ds" / "train"), StorageSection())
    del man["token_lengths"]  # manifests from before this field still load
    path.write_text(json.dumps(man))
    assert load_manifest(str(tmp_path / "ds" / "train"), StorageSection()).token_lengths is None


def test_position_limits_of_absolute_offset_and_relative_position_models():
    """Tokens a model can read: BERT's max_position_embeddings; RoBERTa's less the padding offset
    (a real forward pass at the limit works, one token more fails); none for T5 (relative)."""
    import torch
    from transformers import BertConfig, RobertaConfig, RobertaModel, T5Config

    from ftdist.preflight import position_limit

    assert position_limit(BertConfig(max_position_embeddings=128))[0] == 128
    assert position_limit(T5Config()) is None
    cfg = RobertaConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                        max_position_embeddings=20, pad_token_id=1)
    limit, why = position_limit(cfg)
    assert limit == 18 and "max_position_embeddings 20" in why
    model = RobertaModel(cfg).eval()
    with torch.no_grad():
        model(input_ids=torch.full((1, limit), 5))
        with pytest.raises((IndexError, RuntimeError)):  # position index 20 of 20 rows
            model(input_ids=torch.full((1, limit + 1), 5))
