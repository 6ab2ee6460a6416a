"""The shared inference core (ftdist/inference.py): locating an export, tokenizing as training did,
scores and labels, causal-LM scoring. Fast: tiny models, no Ray."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from exports import export_tiny
from ftdist.errors import UserError
from ftdist.inference import Predictor, locate_export


@pytest.fixture(scope="module")
def cls_export(tmp_path_factory, tiny_bert) -> str:
    return export_tiny(tiny_bert, tmp_path_factory.mktemp("cls") / "run" / "model", max_length=12)


@pytest.fixture(scope="module")
def predictor(cls_export) -> Predictor:
    return Predictor(cls_export)


def test_refuses_a_folder_without_the_export_marker(cls_export, tmp_path):
    copy = tmp_path / "partial"
    shutil.copytree(cls_export, copy)
    (copy / "ftdist_export.json").unlink()
    with pytest.raises(UserError, match=r"not a complete ftdist export \(no ftdist_export.json"):
        locate_export(str(copy))
    with pytest.raises(UserError, match="does not exist"):
        locate_export(str(tmp_path / "nowhere"))
    (copy / "ftdist_export.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid ftdist export record"):
        locate_export(str(copy))


def test_a_run_folder_resolves_to_its_model(cls_export):
    run = cls_export.rsplit("/", 1)[0]
    info = locate_export(run)
    assert info.uri == cls_export and info.task == "sequence-classification"
    assert info.label_names == ["negative", "neutral", "positive"] and info.max_length == 12
    assert info.version.startswith("tiny-") and info.metadata()["version"] == info.version


def test_scores_and_labels_match_the_model_run_by_hand(predictor, cls_export):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["the car was great", "awful road today", "it is fine"]
    got = predictor.predict_texts(texts)
    model = AutoModelForSequenceClassification.from_pretrained(cls_export).eval()
    tok = AutoTokenizer.from_pretrained(cls_export)
    for text, row in zip(texts, got):
        with torch.no_grad():
            probs = model(**tok(text, return_tensors="pt")).logits.softmax(-1)[0].tolist()
        assert row["scores"] == pytest.approx(probs, abs=1e-6)
        assert row["label_id"] == max(range(3), key=probs.__getitem__)
        assert row["label"] == ["negative", "neutral", "positive"][row["label_id"]]
        assert sum(row["scores"]) == pytest.approx(1.0, abs=1e-6)


def test_truncates_to_the_recorded_max_length_and_batches_do_not_change_scores(predictor):
    long = " ".join(["great"] + ["road"] * 200)
    ids = predictor.tokenize([long])[0]
    assert len(ids) == 12  # the export's max_length, special tokens included (as `data prepare` does)
    alone = [predictor.predict_texts([t])[0]["scores"] for t in ("it was bad", long, "ok")]
    together = [r["scores"] for r in predictor.predict_texts(["it was bad", long, "ok"])]
    for a, b in zip(alone, together):  # padding to the batch's longest row is masked out
        assert a == pytest.approx(b, abs=1e-5)
    assert predictor.predict_texts([]) == []
    # length-sorted chunks (here of 2 rows) come back in input order with the same scores
    texts = [" ".join(["road"] * n) + " great" for n in (9, 1, 5, 3, 7)]
    chunked = Predictor(predictor.info.uri, chunk_size=2).predict_texts(texts)
    for a, b in zip(predictor.predict_texts(texts), chunked):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5) and a["label"] == b["label"]
    assert [r["scores"] for r in chunked] != sorted([r["scores"] for r in chunked])  # not returned sorted


def test_causal_lm_rows_get_loss_and_perplexity(tmp_path, tiny_gpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = export_tiny(tiny_gpt, tmp_path / "clm", task="causal-lm", max_length=32)
    p = Predictor(export)
    rows = p.predict_texts(["the car was great", "bad"])
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    ids = AutoTokenizer.from_pretrained(export)("the car was great", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss.item()
    assert rows[0]["loss"] == pytest.approx(ref, abs=1e-5) and rows[0]["tokens"] == ids.shape[1] - 1
    assert rows[0]["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    assert "label" not in rows[0] and json.loads((tmp_path / "clm" / "ftdist_export.json").read_text())["task"] == "causal-lm"
    # ftdist predict's worker turns them into the causal-LM output columns (id, loss, perplexity, tokens)
    import pyarrow as pa

    from ftdist.predict import PredictWorker, Source

    worker = PredictWorker(export, "{}", Source("jsonl", [], "id", "text", None, False), threads=1)
    out = worker(pa.table({"id": ["a", "b"], "text": ["the car was great", "bad"]}))
    assert out.column_names == ["id", "loss", "perplexity", "tokens"]
    assert out.column("loss")[0].as_py() == pytest.approx(rows[0]["loss"], abs=1e-6)
