"""Killing everything while checkpoints are being written never leaves a half-written checkpoint
that resume would pick up: only checkpoints Ray registered (after every rank's part was persisted)
are resumed from, and they are complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from conftest import base_config, run_cli
from test_cli import kill_processes_mentioning

pytestmark = pytest.mark.slow
COMPLETE = {"ftdist_state.json", "rng_rank0.pt", "rng_rank1.pt", "latest", "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}


def _files(d) -> set[str]:
    return {p.name for p in d.rglob("*") if p.is_file()}


def test_kill_during_checkpoint_writes_resumes_from_a_complete_one(tiny_bert, cls_data, tmp_path):
    # A checkpoint after every batch: the process group is almost always inside a save when killed.
    cfg = base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": "atomic"},
                      train={"epochs": 2, "checkpoint_every_steps": 1}, deepspeed={"zero_stage": 1},
                      storage={"num_checkpoints_to_keep": 50})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / "atomic"
    snapshot = run / "checkpoint_manager_snapshot.json"
    ray_tmp = tempfile.mkdtemp(prefix="ra", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen([sys.executable, "-m", "ftdist", "train", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if snapshot.exists() and snapshot.read_text().count("epoch000-batch") >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        kill_processes_mentioning(ray_tmp)

    text = snapshot.read_text()
    on_disk = sorted(p.name for p in run.iterdir() if p.name.startswith("epoch"))
    registered = [n for n in on_disk if n in text]
    assert registered
    for name in registered:  # every checkpoint resume could pick is complete
        assert COMPLETE <= _files(run / name), (name, _files(run / name))
    latest = registered[-1]

    second = run_cli("train", str(path), env=env)
    kill_processes_mentioning(ray_tmp)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    batch = int(latest.split("-batch")[1].split("-")[0])
    out = second.stdout + second.stderr
    said = [l for l in out.splitlines() if "resumed from checkpoint" in l]
    assert f"resumed from checkpoint at epoch 1, batch {batch} " in out, (latest, registered, said)
    summary = json.loads((run / "summary.json").read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
