"""Failures caused for real: a training worker SIGKILLed mid-epoch (plain, with gradient accumulation, with ZeRO-2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import base_config, train_killing_a_worker
from ftdist.config import load_config
from ftdist.launcher import run_training

pytestmark = pytest.mark.slow


def _train_ids(data: str) -> list[int]:
    import pyarrow.parquet as pq

    return sorted(i for f in Path(data, "train").glob("*.parquet") for i in pq.read_table(f)["sample_id"].to_pylist())




# (id, train/deepspeed settings, epochs). Accumulation 2 with a checkpoint every 3 batches puts the
# checkpoint points inside windows: checkpoints land on the next boundary (batches 4, 6, 10, 12).
VARIANTS = [
    ("plain", {"checkpoint_every_steps": 4}, {"zero_stage": 0}, 4),
    ("gas2", {"checkpoint_every_steps": 3, "gradient_accumulation_steps": 2}, {"zero_stage": 0}, 2),
    ("zero2", {"checkpoint_every_steps": 4}, {"zero_stage": 2}, 2),
]


@pytest.mark.parametrize("name,train,deepspeed,epochs", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_worker_sigkill_mid_epoch_restarts_and_trains_every_sample_once(name, train, deepspeed, epochs, tiny_bert,
                                                                          cls_data, tmp_path, ray_local, capfd):
    sections = dict(train={"epochs": epochs, "learning_rate": 1e-2, **train}, deepspeed=deepspeed,
                    data={"record_sample_ids": True}, scaling={"max_failures": 2})
    cfg = load_config(data=base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": "killed"}, **sections))
    run = tmp_path / "runs" / "killed"
    summary, killed = train_killing_a_worker(cfg, run, "batch000004")
    assert killed is not None, "the run ended before a worker could be killed"
    assert [e["epoch"] for e in summary["epochs"]] == list(range(1, epochs + 1))

    # The restarted workers restored a checkpoint (not a fresh start), and only ever a boundary one.
    out = capfd.readouterr().out
    resumed = [(int(e), int(b)) for e, b in re.findall(r"resumed from checkpoint at epoch (\d+), batch (\d+)", out)]
    assert resumed, "the restarted workers did not resume from a checkpoint"
    assert all(p > (1, 0) for p in resumed), resumed  # later than the very start
    assert all(b % train.get("gradient_accumulation_steps", 1) == 0 for _, b in resumed), resumed

    # Exactly once: the sample ids kept in the final checkpoint cover every training row once per epoch.
    final = run / sorted(p.name for p in run.iterdir() if p.name.startswith(f"epoch{epochs:03d}"))[-1]
    per_epoch: dict[str, list[int]] = {}
    for f in final.glob("samples_rank*.json"):
        for epoch, ids in json.loads(f.read_text()).items():
            per_epoch.setdefault(epoch, []).extend(ids)
    expected = _train_ids(cls_data)
    assert sorted(per_epoch) == [str(e) for e in range(epochs)]
    for epoch, ids in per_epoch.items():
        assert sorted(ids) == expected, f"epoch {epoch}: repeated or skipped samples"

    # The same run uninterrupted ends with the same metrics (RNG, optimizer, schedule and reader restored).
    # Both runs are deterministic on CPU: they measured bitwise equal; 1e-6 leaves room for summation order.
    clean = load_config(data=base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": "clean"}, **sections))
    reference = run_training(clean)
    for got, want in zip(summary["epochs"], reference["epochs"], strict=True):
        assert got["step"] == want["step"]
        assert abs(got["val_loss"] - want["val_loss"]) < 1e-6, (got["epoch"], got["val_loss"], want["val_loss"])
    assert abs(summary["test"]["loss"] - reference["test"]["loss"]) < 1e-6
    assert summary["test"]["accuracy"] == reference["test"]["accuracy"]
