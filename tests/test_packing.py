"""Packed language-model data (issue 14): ``data prepare --pack`` concatenates the tokenized documents and
cuts ``max_length`` blocks (ftdist/data/prepare.py). No padding in a batch, every token kept but the
last partial block of each split, every block exactly once per epoch across ranks, and a masked-LM run
on packed data trains (through the worker loop, ZeRO-3)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import base_config, synthetic_rows, write_jsonl
from ftdist.config import PrepareSection, StorageSection, load_config
from ftdist.data.collate import collate
from ftdist.data.prepare import pack_blocks, prepare
from ftdist.data.reader import ShardReader

MAX_LEN = 32


def _tok(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _docs(n: int, seed: int = 3) -> list[str]:
    return [r["text"] for r in synthetic_rows(n, seed=seed)]


@pytest.mark.parametrize("model", ["tiny_gpt", "tiny_bert"])
def test_blocks_are_the_documents_concatenated_each_ended_by_its_separator(model, request):
    tok = _tok(request.getfixturevalue(model))
    docs = _docs(40)
    carry: list[int] = []
    blocks = pack_blocks(tok, docs[:25], MAX_LEN, carry) + pack_blocks(tok, docs[25:], MAX_LEN, carry)
    assert blocks and all(len(b) == MAX_LEN for b in blocks) and len(carry) < MAX_LEN
    end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    expected = []
    for d in docs:  # BERT's encoding ends with [SEP] already; GPT-2's gets its EOS appended
        ids = tok(d)["input_ids"]
        expected += ids + ([] if ids[-1] == end else [end])
    assert [t for b in blocks for t in b] + carry == expected


def _prepare_packed(tmp_path: Path, model: str, task: str, n: int = 300) -> tuple[str, list[str]]:
    docs = _docs(n)
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"text": d} for d in docs])
    out = str(tmp_path / "ds")
    prepare(PrepareSection(input=str(raw), label_field=None, rows_per_shard=40, pack=True), out, model, MAX_LEN, task,
            StorageSection())
    return out, docs


def test_packed_data_set_keeps_every_token_but_each_splits_last_partial_block(tiny_gpt, tmp_path):
    out, docs = _prepare_packed(tmp_path, tiny_gpt, "causal-lm")
    tok = _tok(tiny_gpt)
    doc_tokens = Counter(t for d in docs for t in tok(d)["input_ids"] + [tok.eos_token_id])
    packed: Counter[int] = Counter()
    for split in ("train", "validation", "test"):
        for f in sorted(Path(out, split).glob("*.parquet")):
            t = pq.read_table(f).to_pylist()
            assert {len(r["input_ids"]) for r in t} == {MAX_LEN} and {r["length"] for r in t} == {MAX_LEN}
            packed.update(x for r in t for x in r["input_ids"])
    missing = doc_tokens - packed
    assert not packed - doc_tokens  # nothing invented
    assert 0 <= sum(missing.values()) < 3 * MAX_LEN  # at most one partial block per split left out
    import json

    manifest = json.loads(Path(out, "train", "manifest.json").read_text())
    assert manifest["prepare"]["pack"] is True and manifest["token_lengths"] is None


def test_packed_batches_have_no_padding_and_every_block_is_read_once_per_epoch(tiny_bert, tmp_path):
    out, _ = _prepare_packed(tmp_path, tiny_bert, "masked-lm")
    tok = _tok(tiny_bert)
    n = sum(pq.read_metadata(f).num_rows for f in Path(out, "train").glob("*.parquet"))
    for epoch in range(2):
        seen = []
        for rank in range(2):
            reader = ShardReader(str(Path(out, "train")), StorageSection(), rank, 2, 8, seed=5, shuffle=True,
                                 shuffle_buffer=16, length_bucketing=True)
            for rows in reader.batches(epoch):
                batch = collate(rows, tok.pad_token_id, "masked-lm")
                assert batch["attention_mask"].all() and batch["input_ids"].shape[1] == MAX_LEN
                seen += batch["sample_id"].tolist()
        assert sorted(seen) == list(range(n))


@pytest.mark.slow
def test_masked_lm_trains_on_packed_data_at_zero_3(tiny_bert, tmp_path, process_group):
    from ftdist.loop import train_worker
    from ftdist.session import LocalSession

    out, _ = _prepare_packed(tmp_path, tiny_bert, "masked-lm", n=500)
    cfg = load_config(data=base_config(tiny_bert, out, str(tmp_path / "runs"), run={"name": "packed"},
                                       model={"task": "masked-lm"}, data={"max_length": MAX_LEN},
                                       train={"epochs": 2, "learning_rate": 5e-3}, deepspeed={"zero_stage": 3},
                                       scaling={"num_workers": 1}, tracking={"tensorboard": False, "plots": False}))
    result = train_worker(cfg, LocalSession(str(tmp_path / "ck")))
    e = result["epochs"]
    assert e[1]["val_loss"] < e[0]["val_loss"], e
    # Every token of a packed batch is real: tokens/s counts max_length per row.
    assert e[0]["tokens_per_s"] == pytest.approx(e[0]["samples_per_s"] * MAX_LEN, rel=1e-6)
