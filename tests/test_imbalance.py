"""Class imbalance: ``train.class_weights`` (balanced or a list) resolved from the train split's label
counts, the weighted cross-entropy the real loop steps on, and picking the best checkpoint by
macro-F1 in a real run (worker loop, LocalSession, world size 1, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import NAMES, base_config, prepare_local, synthetic_rows, write_jsonl
from ftdist.config import load_config
from ftdist.errors import UserError
from ftdist.metrics import class_weights


def test_balanced_weights_are_n_over_k_times_count():
    assert class_weights("balanced", [80, 15, 5], 3) == pytest.approx([100 / 240, 100 / 45, 100 / 15])
    assert class_weights([1, 2.5, 3], [80, 15, 5], 3) == [1.0, 2.5, 3.0]
    assert class_weights(None, [80, 15, 5], 3) is None
    with pytest.raises(UserError, match="has 2 weight.s. but there are 3 classes"):
        class_weights([1, 2], [80, 15, 5], 3)
    with pytest.raises(UserError, match="label counts"):
        class_weights("balanced", None, 3)


@pytest.fixture(scope="module")
def no_dropout_bert(tiny_bert, tmp_path_factory) -> str:
    """The tiny BERT without dropout, so a forward pass gives the same logits twice."""
    import shutil

    d = tmp_path_factory.mktemp("bert-no-dropout") / "m"
    shutil.copytree(tiny_bert, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.fixture(scope="module")
def imbalanced_data(tiny_bert, tmp_path_factory) -> tuple[str, list[int]]:
    """80% negative, 15% neutral, 5% positive: the synthetic task, subsampled to an imbalanced mix."""
    rows = synthetic_rows(1500, seed=4)
    keep = {"negative": 320, "neutral": 60, "positive": 20}
    out = []
    for r in rows:
        if keep[r["label"]] > 0:
            keep[r["label"]] -= 1
            out.append(r)
    d = tmp_path_factory.mktemp("imbalanced")
    path = prepare_local(write_jsonl(d / "raw.jsonl", out), d / "ds", tiny_bert, rows_per_shard=100)
    counts = json.loads((Path(path) / "train" / "manifest.json").read_text())["label_counts"]
    return path, counts


@pytest.mark.slow
def test_the_loop_steps_on_the_weighted_cross_entropy(no_dropout_bert, imbalanced_data, tmp_path, process_group):
    import torch
    import torch.nn.functional as F

    from ftdist.data.collate import collate
    from ftdist.loop import setup, teardown, train_step
    from ftdist.session import LocalSession

    data, counts = imbalanced_data
    cfg = load_config(data=base_config(no_dropout_bert, data, str(tmp_path), scaling={"num_workers": 1},
                                       train={"class_weights": "balanced", "learning_rate": 1e-6}))
    s = setup(cfg, LocalSession(str(tmp_path / "ckpt")))
    try:
        assert s.class_weights is not None
        want = torch.tensor([sum(counts) / (3 * c) for c in counts])
        assert torch.allclose(s.class_weights, want)
        rows = next(iter(s.train_reader.batches(0)))
        batch = collate(rows, s.tokenizer.pad_token_id, cfg.model.task)
        inputs = {k: v for k, v in batch.items() if k != "sample_id"}
        with torch.no_grad():
            out = s.engine(**inputs)
        weighted = F.cross_entropy(out.logits.float(), inputs["labels"], weight=want).item()
        assert abs(weighted - out.loss.item()) > 1e-3, "the batch must tell the weighted and plain losses apart"
        assert train_step(s, batch).item() == pytest.approx(weighted, rel=1e-5)
    finally:
        teardown(s)


@pytest.mark.slow
def test_a_weighted_run_picks_its_best_checkpoint_by_macro_f1(tiny_bert, imbalanced_data, tmp_path, process_group):
    from ftdist.loop import train_worker
    from ftdist.session import LocalSession

    data, _ = imbalanced_data
    cfg = load_config(data=base_config(tiny_bert, data, str(tmp_path / "runs"), scaling={"num_workers": 1},
                                       train={"class_weights": "balanced", "eval_metric": "macro_f1", "epochs": 3,
                                              "max_steps_per_epoch": 8, "learning_rate": 3e-3}))
    result = train_worker(cfg, LocalSession(str(tmp_path / "ckpt")))
    f1 = [e["val_macro_f1"] for e in result["epochs"]]
    best = max(range(len(f1)), key=lambda i: (f1[i], i))  # ties go to the newer epoch
    assert result["eval_metric"] == "macro_f1" and result["best_metric"] == f1[best]
    assert result["best_epoch"] == best + 1, f1
    assert [r["label"] for r in result["val_per_class"]] == NAMES
