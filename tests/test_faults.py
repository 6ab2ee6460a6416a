"""Failures caused for real: a training worker SIGKILLed mid-epoch."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import base_config
from ftdist.config import load_config
from ftdist.launcher import run_training

pytestmark = pytest.mark.slow


def _train_ids(data: str) -> list[int]:
    import pyarrow.parquet as pq

    return sorted(i for f in Path(data, "train").glob("*.parquet") for i in pq.read_table(f)["sample_id"].to_pylist())


def _worker_pids(root_pid: int | None = None) -> list[int]:
    """Ray Train worker processes started under ``root_pid`` (default: this test process), in start order."""
    out = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if any("RayTrainWorker" in c for c in p.cmdline()):
                out.append((p.create_time(), p.pid))
        except psutil.NoSuchProcess:
            pass
    return [pid for _, pid in sorted(out)]


def test_worker_sigkill_mid_epoch_restarts_and_trains_every_sample_once(tiny_bert, cls_data, tmp_path, ray_local):
    sections = dict(train={"epochs": 4, "checkpoint_every_steps": 4, "learning_rate": 1e-2},
                    data={"record_sample_ids": True}, scaling={"max_failures": 2})
    cfg = load_config(data=base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": "killed"}, **sections))
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("summary", run_training(cfg)))
    t.start()
    run = tmp_path / "runs" / "killed"
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and t.is_alive():
        snap = run / "checkpoint_manager_snapshot.json"
        if snap.exists() and "batch000004" in snap.read_text() and _worker_pids():
            killed = _worker_pids()[0]
            psutil.Process(killed).kill()  # SIGKILL, mid-epoch (a mid-epoch checkpoint exists)
            break
        time.sleep(0.05)
    t.join(timeout=600)
    assert killed is not None, "the run ended before a worker could be killed"
    summary = result["summary"]
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2, 3, 4]

    # Exactly once: the sample ids kept in the final checkpoint cover every training row once per epoch.
    final = run / sorted(p.name for p in run.iterdir() if p.name.startswith("epoch004"))[-1]
    per_epoch: dict[str, list[int]] = {}
    for f in final.glob("samples_rank*.json"):
        for epoch, ids in json.loads(f.read_text()).items():
            per_epoch.setdefault(epoch, []).extend(ids)
    expected = _train_ids(cls_data)
    assert sorted(per_epoch) == ["0", "1", "2", "3"]
    for epoch, ids in per_epoch.items():
        assert sorted(ids) == expected, f"epoch {epoch}: repeated or skipped samples"

    # The same run uninterrupted ends with the same metrics (RNG, optimizer, schedule and reader restored).
    clean = load_config(data=base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": "clean"}, **sections))
    reference = run_training(clean)
    assert abs(reference["epochs"][-1]["val_loss"] - summary["epochs"][-1]["val_loss"]) < 1e-3
    assert abs(reference["test"]["accuracy"] - summary["test"]["accuracy"]) < 0.02
