"""A stalled rank (SIGSTOP: alive but silent, the worst kind) fails the run within the configured
timeout (scaling.collective_timeout_s), with a one-line message naming the rank, instead of
hanging forever. Runs through the CLI, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
import yaml

from conftest import base_config, worker_pids
from test_cli import kill_processes_mentioning

pytestmark = pytest.mark.slow
TIMEOUT_S = 15


def test_stalled_rank_fails_within_timeout_naming_it(tiny_bert, cls_data, tmp_path):
    cfg = base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": "stall"}, train={"epochs": 200},
                      scaling={"collective_timeout_s": TIMEOUT_S})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    proc = subprocess.Popen([sys.executable, "-m", "ftdist", "train", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_TMPDIR": ray_tmp})
    stopped = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            pids = worker_pids(proc.pid)
            if (tmp_path / "runs" / "stall" / "checkpoint_manager_snapshot.json").exists() and len(pids) == 2:
                stopped = psutil.Process(pids[-1])
                stopped.suspend()  # SIGSTOP one rank mid-training
                break
            time.sleep(0.1)
        assert stopped is not None, "the run ended before a rank could be stalled"
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=TIMEOUT_S + 120)
        assert time.monotonic() - t0 < TIMEOUT_S + 90  # the timeout plus teardown, not forever
        assert proc.returncode == 1, err[-3000:]
        lines = [l for l in err.splitlines() if l.startswith("ftdist: error:")]
        assert len(lines) == 1, err[-3000:]
        assert "stopped responding" in lines[0] or "timed out" in lines[0]
        assert "rank " in lines[0] and "rerun the same command to resume" in lines[0]
    finally:
        if stopped is not None:
            try:
                stopped.resume()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()
        kill_processes_mentioning(ray_tmp)
