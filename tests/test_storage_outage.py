"""Object storage goes away for real (moto's S3 server stopped on its port) in the middle of a run."""

from __future__ import annotations

import json
import threading
import time

import pytest

from conftest import S3Server, base_config
from ftdist.config import load_config
from ftdist.errors import RunFailed, UserError
from ftdist.launcher import run_training

pytestmark = pytest.mark.slow


@pytest.fixture()
def own_s3():
    server = S3Server()
    server.start()
    yield server
    server.stop()


def _start(cfg) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["summary"] = run_training(cfg)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _wait_for_checkpoint(fs, run: str, t: threading.Thread, timeout: float = 240) -> None:
    """Until Ray has registered a first checkpoint (its snapshot names it)."""
    deadline = time.time() + timeout
    while time.time() < deadline and t.is_alive():
        try:
            if "epoch001" in fs.cat(f"{run}/checkpoint_manager_snapshot.json").decode():
                return
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def test_short_outage_is_ridden_out_long_outage_fails_cleanly_and_resumes(own_s3, tiny_bert, cls_data, ray_local):
    fs = own_s3.fs()
    fs.mkdir("outage")
    fs.put(cls_data, "outage/ds", recursive=True)
    storage = {"endpoint_url": own_s3.endpoint, "retries": 6, "retry_budget_s": 30}

    # 1. Down for ~3 s mid-run: retries carry the run through.
    cfg = load_config(data=base_config(tiny_bert, "s3://outage/ds", "s3://outage/runs", run={"name": "short"},
                                       train={"epochs": 5}, storage=storage))
    t, out = _start(cfg)
    _wait_for_checkpoint(fs, "outage/runs/short", t)
    own_s3.stop()
    time.sleep(3)
    own_s3.start()
    t.join(timeout=600)
    assert "error" not in out, out.get("error")
    assert [e["epoch"] for e in out["summary"]["epochs"]] == [1, 2, 3, 4, 5]

    # 2. Down beyond the retry budget: the run fails with a clear one-line message...
    tight = {**storage, "retries": 2, "retry_budget_s": 3}
    cfg = load_config(data=base_config(tiny_bert, "s3://outage/ds", "s3://outage/runs", run={"name": "long"},
                                       train={"epochs": 12}, storage=tight))
    t, out = _start(cfg)
    _wait_for_checkpoint(fs, "outage/runs/long", t)
    own_s3.stop()
    t.join(timeout=300)
    assert not t.is_alive(), "the run hung while storage was down"
    err = out.get("error")
    assert isinstance(err, (UserError, RunFailed)), repr(err)[:2000]
    assert "\n" not in str(err)
    assert "storage" in str(err).lower() or "endpoint" in str(err).lower() or "connect" in str(err).lower(), str(err)
    own_s3.start()

    # ...its last registered checkpoint is intact...
    snapshot = json.loads(fs.cat("outage/runs/long/checkpoint_manager_snapshot.json"))
    text = json.dumps(snapshot)
    names = sorted({p.rsplit("/", 1)[-1] for p in fs.ls("outage/runs/long", refresh=True) if "/epoch" in p})
    registered = [n for n in names if n in text]
    assert registered, (names, text[:500])
    latest = registered[-1]
    files = {p.rsplit("/", 1)[-1] for p in fs.find(f"outage/runs/long/{latest}")}
    assert {"ftdist_state.json", "rng_rank0.pt", "rng_rank1.pt", "mp_rank_00_model_states.pt"} <= files

    # ...and rerunning the same config resumes from it and finishes.
    cfg = load_config(data=base_config(tiny_bert, "s3://outage/ds", "s3://outage/runs", run={"name": "long"},
                                       train={"epochs": 12}, storage=tight))
    summary = run_training(cfg)
    assert summary["resumed"] is True and len(summary["epochs"]) == 12
