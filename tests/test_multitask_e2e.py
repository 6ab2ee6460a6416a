"""A multi-task run end to end: real Ray Train, 2 workers, ZeRO-1, two tiny tasks, temperature
sampling; a worker SIGKILLed mid-epoch; the restarted run continues every task where it was."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from conftest import FILLER, base_config, prepare_local, train_killing_a_worker, write_jsonl
from exports import assert_card_matches
from ftdist import run_folder as layout
from ftdist.config import load_config
from ftdist.launcher import format_summary

pytestmark = pytest.mark.slow


def length_rows(n: int, seed: int) -> list[dict]:
    """A second task on the same kind of text: is it long (> 9 words) or short? Learnable from length."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(2, 16)
        rows.append({"text": " ".join(rng.choice(FILLER) for _ in range(k)), "label": "long" if k > 9 else "short"})
    return rows


def _train_ids(data: str) -> list[int]:
    import pyarrow.parquet as pq

    return sorted(i for f in Path(data, "train").glob("*.parquet") for i in pq.read_table(f)["sample_id"].to_pylist())




def test_multitask_run_killed_mid_epoch_resumes_every_task_and_exports_a_model_per_task(
        tiny_bert, cls_data, tmp_path, ray_local, capfd):
    from transformers import AutoModelForSequenceClassification

    length_data = prepare_local(write_jsonl(tmp_path / "len.jsonl", length_rows(200, 3)), tmp_path / "len-ds",
                                tiny_bert, label_names=["short", "long"])
    raw = base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": "mt"},
                      train={"epochs": 2, "checkpoint_every_steps": 5}, deepspeed={"zero_stage": 1},
                      data={"record_sample_ids": True}, scaling={"max_failures": 2})
    del raw["data"]["path"]
    raw["tasks"] = [{"name": "sentiment", "data": {"path": cls_data}},
                    {"name": "length", "data": {"path": length_data}, "loss_weight": 0.5}]
    raw["multitask"] = {"sampling": "temperature", "temperature": 2.0}
    cfg = load_config(data=raw)
    run = tmp_path / "runs" / "mt"
    summary, killed = train_killing_a_worker(cfg, run, "batch000005")
    assert killed is not None, "the run ended before a worker could be killed"
    out = capfd.readouterr().out
    resumed = re.findall(r"resumed from checkpoint at epoch (\d+), batch (\d+) .*task positions (\{[^}]*\})", out)
    assert resumed, "the restarted workers did not resume from a checkpoint"

    # Every task continued where it was: within each pass over a task's training split, every sample
    # once (the sentiment task's first pass ends in epoch 2, the length task's passes repeat within an epoch).
    final = run / sorted(p.name for p in run.iterdir() if p.name.startswith("epoch002"))[-1]
    per_pass: dict[str, list[int]] = {}
    for f in final.glob("samples_rank*.json"):
        for key, ids in json.loads(f.read_text()).items():
            per_pass.setdefault(key, []).extend(ids)
    state = json.loads((final / "ftdist_state.json").read_text())
    cursors = state["tasks"]["cursors"]
    per_task_batches = {n: summary["tasks"][n]["batches_per_pass"] for n in ("sentiment", "length")}
    for task, data in (("sentiment", cls_data), ("length", length_data)):
        expected = _train_ids(data)
        complete, partial = divmod(cursors[task], per_task_batches[task])
        assert complete >= 1
        for p in range(complete):
            assert sorted(per_pass[f"{task}/{p}"]) == expected, f"{task} pass {p}: repeated or skipped samples"
        if partial:
            ids = per_pass[f"{task}/{complete}"]
            assert len(set(ids)) == len(ids) and set(ids) < set(expected)
    assert sum(cursors.values()) == 2 * sum(per_task_batches.values())  # two epochs of sum(S_t) batches

    # Per-task validation every epoch, combined = mean, per-task test with baselines, one model per task.
    for e in summary["epochs"]:
        mean = (e["sentiment/val_accuracy"] + e["length/val_accuracy"]) / 2
        assert abs(e["val_accuracy"] - mean) < 1e-9
    for task, labels in (("sentiment", {0: "negative", 1: "neutral", 2: "positive"}), ("length", {0: "short", 1: "long"})):
        info = summary["tasks"][task]
        assert 0 < info["baseline"]["majority_class_accuracy"] < 1 and "accuracy" in info["test"]
        model = AutoModelForSequenceClassification.from_pretrained(info["model_uri"])
        assert model.config.id2label == labels
        assert_card_matches(Path(info["model_uri"]), info["test"], task)  # each task export's README.md
    assert (run / "model" / "multitask" / "model.safetensors").exists()
    assert summary["tasks"]["sentiment"]["test"]["accuracy"] > summary["tasks"]["sentiment"]["baseline"][
        "majority_class_accuracy"], "the sentiment head learned nothing"
    assert "task length: test" in format_summary(summary)
    assert list((run / layout.TENSORBOARD).rglob("events.out.tfevents.*")), "no TensorBoard events for a multi-task run"
