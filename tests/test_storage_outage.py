"""Object storage goes away for real (moto's S3 server stopped on its port) in the middle of a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import S3Server, base_config
import yaml

from ftdist.config import load_config
from ftdist.errors import UserError
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


def _read(path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_short_outage_is_ridden_out(own_s3, tiny_bert, cls_data, ray_local):
    fs = own_s3.fs()
    fs.mkdir("outage")
    fs.put(cls_data, "outage/ds", recursive=True)
    storage = {"endpoint_url": own_s3.endpoint, "retries": 6, "retry_budget_s": 30}

    # 1. Down for ~3 s mid-run: retries carry the run through.
    cfg = load_config(data=base_config(tiny_bert, "s3://outage/ds", "s3://outage/runs", run={"name": "short"},
                                       train={"epochs": 5}, storage=storage))
    t, out = _start(cfg)
    _wait_for_checkpoint(fs, "outage/runs/short", t)
    # A second driver on the same S3 run folder while the first trains refuses (conditional-PUT lease).
    with pytest.raises(UserError, match="is in use by another ftdist driver"):
        run_training(cfg)
    own_s3.stop()
    time.sleep(3)
    own_s3.start()
    t.join(timeout=600)
    assert "error" not in out, out.get("error")
    assert [e["epoch"] for e in out["summary"]["epochs"]] == [1, 2, 3, 4, 5]


def test_long_outage_exits_1_through_the_cli_and_rerun_resumes(own_s3, tiny_bert, cls_data, tmp_path):
    """Down beyond the retry budget: ``ftdist train`` exits 1 (an outage is not the user's mistake)
    with one line saying to rerun, after requests really failed inside the outage (retries logged);
    the last registered checkpoint is complete, and rerunning the same command resumes from it.

    The data set is on S3 and the run folder on local disk, so the outage meets ftdist's own storage
    layer (the reader) deterministically, rather than Ray's checkpoint upload first in some runs."""
    fs = own_s3.fs()
    fs.mkdir("outage-long")  # moto keeps buckets across servers in one process
    fs.put(cls_data, "outage-long/ds", recursive=True)
    # One attempt against a refused port takes ~4 s (botocore retries inside it): leave room for two of ours.
    tight = {"endpoint_url": own_s3.endpoint, "retries": 2, "retry_budget_s": 12}
    runs = tmp_path / "runs"
    cfg = base_config(tiny_bert, "s3://outage-long/ds", str(runs), run={"name": "long"}, train={"epochs": 12},
                      storage=tight)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ray_tmp = tempfile.mkdtemp(prefix="ro", dir="/tmp")  # AF_UNIX socket paths must stay short
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    cmd = [sys.executable, "-m", "ftdist", "train", str(path)]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 240
        while "epoch001" not in _read(runs / "long" / "checkpoint_manager_snapshot.json"):
            assert time.time() < deadline and proc.poll() is None, "no checkpoint appeared"
            time.sleep(0.2)
        # The same command again while the first driver trains: refused in one line, exit 2 (audit D14).
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert second.returncode == 2, (second.stdout[-2000:], second.stderr[-3000:])
        assert second.stderr.strip().splitlines()[-1].startswith("ftdist: error: run folder"), second.stderr[-2000:]
        assert "is in use by another ftdist driver" in second.stderr and "Traceback" not in second.stderr
        own_s3.stop()
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, (out[-2000:], err[-3000:])
        last = [line for line in err.strip().splitlines() if line.startswith("ftdist: error:")]
        assert len(last) == 1 and "storage unavailable" in last[0] and "rerun the same command" in last[0], err[-3000:]
        assert "Traceback" not in last[0]
        # A request really fell inside the outage: the retries were logged before giving up.
        assert "transient storage error on s3://outage-long/" in out + err, (out + err)[-3000:]
        own_s3.start()

        # The last registered checkpoint is intact...
        text = _read(runs / "long" / "checkpoint_manager_snapshot.json")
        names = sorted(p.name for p in (runs / "long").iterdir() if p.name.startswith("epoch"))
        registered = [n for n in names if n in text]
        assert registered, (names, text[:500])
        latest = registered[-1]
        files = {p.name for p in (runs / "long" / latest).rglob("*")}
        assert {"ftdist_state.json", "rng_rank0.pt", "rng_rank1.pt", "mp_rank_00_model_states.pt"} <= files
        latest_epoch = int(latest.split("-")[0].removeprefix("epoch"))
    finally:
        from test_cli import kill_processes_mentioning

        kill_processes_mentioning(ray_tmp)

    # ...and rerunning the same command resumes from it (not from scratch) and finishes.
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    try:
        both = again.stdout + again.stderr
        assert again.returncode == 0, both[-3000:]
        assert f"resumed from checkpoint at epoch {latest_epoch + 1}, batch 0" in both, both[-3000:]
        summary = json.loads((runs / "long" / "summary.json").read_text())
        assert summary["resumed"] is True and [e["epoch"] for e in summary["epochs"]] == list(range(1, 13))
    finally:
        kill_processes_mentioning(ray_tmp)
