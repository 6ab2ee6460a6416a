"""``ftdist serve`` as a user runs it: a subprocess that starts its own Ray cluster, answers HTTP on
loopback, and on SIGTERM drains, shuts Serve and Ray down and exits 0, leaving no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest
import requests

from conftest import free_port
from exports import export_tiny, wait_until_healthy

pytestmark = pytest.mark.slow


def test_serve_answers_then_stops_cleanly_on_sigterm(tmp_path, tiny_bert):
    model = export_tiny(tiny_bert, tmp_path / "run" / "model")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ftdist", "serve", str(tmp_path / "run"), "--port", str(port),
                             "--cpus-per-replica", "0.5", "--max-batch-size", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, 120, alive=lambda: (proc.poll() is None,
                                                     proc.communicate()[1][-2000:] if proc.poll() is not None else ""))
        r = requests.post(f"{url}/predict", json={"texts": ["the car was great", "awful"]}, timeout=60)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2
        assert requests.get(f"{url}/metadata", timeout=30).json()["model"] == model
        family = psutil.Process(proc.pid).children(recursive=True)  # raylet, GCS, Serve actors, ...
        assert family, "the local Ray cluster's processes should be children of ftdist serve"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert "[ftdist] stopped" in err and "Traceback" not in err, err[-2000:]
    _, alive = psutil.wait_procs(family, timeout=20)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)
