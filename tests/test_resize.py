"""A run killed mid-epoch and resumed on another number of workers (2 -> 1 at ZeRO-3, 1 -> 2 at
ZeRO-1): model and optimizer state re-partitioned, every sample of the interrupted epoch trained
exactly once, the next epoch planned on the new size, the LR continuing from where it was and the
schedule ending on the new last step. Real Ray workers, real SIGKILL, real DeepSpeed checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import base_config, train_killing_a_worker
from ftdist.config import load_config
from ftdist.data.reader import Resize, num_batches, plan_segments
from ftdist.engine import lr_lambda
from ftdist.launcher import run_training

pytestmark = pytest.mark.slow

LR, EPOCHS, BATCH, WARMUP = 1e-2, 2, 16, 0.2


def _train_ids(data: str) -> list[int]:
    import pyarrow.parquet as pq

    return sorted(i for f in Path(data, "train").glob("*.parquet") for i in pq.read_table(f)["sample_id"].to_pylist())


def _shard_rows(data: str) -> list[int]:
    return [s["rows"] for s in json.loads(Path(data, "train", "manifest.json").read_text())["shards"]]


@pytest.mark.parametrize("before,after,stage,lora", [(2, 1, 3, False), (1, 2, 1, False), (2, 1, 1, True)],
                         ids=["2to1-zero3", "1to2-zero1", "2to1-zero1-lora"])
def test_killed_mid_epoch_and_resumed_on_another_worker_count(before, after, stage, lora, tiny_bert, cls_data, tmp_path,
                                                              ray_local, capfd):
    """LoRA: its checkpoints leave the frozen base model out; the universal conversion still re-partitions them."""
    sections = dict(train={"epochs": EPOCHS, "batch_size": BATCH, "learning_rate": LR, "warmup_ratio": WARMUP,
                           "lr_schedule": "linear", "checkpoint_every_steps": 4},
                    deepspeed={"zero_stage": stage}, data={"record_sample_ids": True},
                    model={"lora": {"r": 4}} if lora else {})
    raw = base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": "resized"}, **sections)
    raw["scaling"]["num_workers"] = before
    run = tmp_path / "runs" / "resized"
    summary, killed = train_killing_a_worker(load_config(data=raw), run, "batch000004")
    assert killed is not None and not summary, "the first run was not killed mid-epoch"  # max_failures 0: it stops

    raw["scaling"]["num_workers"] = after
    summary = run_training(load_config(data=raw))
    assert summary["world_size"] == after and [e["epoch"] for e in summary["epochs"]] == list(range(1, EPOCHS + 1))
    out = capfd.readouterr().out
    assert f"checkpoint written by {before} worker(s), resumed on {after}" in out, out[-3000:]
    m = re.search(r"resumed from checkpoint at epoch 1, batch (\d+) \(step (\d+)\) at lr (\S+)", out)
    assert m and int(m[1]) > 0, "the resumed run did not start mid-epoch 1"
    step, lr = int(m[2]), float(m[3])

    # Exactly once: the sample ids kept in the final checkpoint (the old ranks' records folded into the
    # new ranks') cover every training row once, in the interrupted epoch and in the next one.
    final = run / sorted(p.name for p in run.iterdir() if p.name.startswith(f"epoch{EPOCHS:03d}"))[-1]
    per_epoch: dict[str, list[int]] = {}
    for f in final.glob("samples_rank*.json"):
        for epoch, ids in json.loads(f.read_text()).items():
            per_epoch.setdefault(epoch, []).extend(ids)
    assert sorted(per_epoch) == [str(e) for e in range(EPOCHS)]
    for epoch, ids in per_epoch.items():
        assert sorted(ids) == _train_ids(cls_data), f"epoch {epoch}: repeated or skipped samples"

    # The LR at the resume is the one the old plan had at that step (no jump); the rest of epoch 1 and
    # epoch 2 took the steps the new size needs, and the re-fitted schedule ended (0 for linear) on the last.
    rows = _shard_rows(cls_data)
    old_total = EPOCHS * num_batches(rows, before, BATCH)
    assert lr == pytest.approx(LR * lr_lambda(old_total, int(WARMUP * old_total), "linear")(step), rel=1e-6)
    rest = plan_segments(rows, BATCH, [Resize(before, int(m[1]))], after)[-1].steps
    assert summary["global_step"] == step + rest + num_batches(rows, after, BATCH)
    assert summary["epochs"][-1]["lr"] == pytest.approx(0.0, abs=1e-12) and summary["epochs"][0]["lr"] > 0
    # Each worker of the resumed run reports its peak RSS before the model and after training.
    rss = summary["memory"]["rss_mb"]
    assert len(rss) == after and all(0 < r["before_model"] <= r["after_training"] for r in rss), rss
