"""``ftdist serve`` as a user runs it: a subprocess that starts its own Ray cluster, answers HTTP on
loopback, and on SIGTERM drains (every request in flight answered, new ones 503), shuts Serve and
Ray down and exits 0, leaving no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

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
                             "--cpus-per-replica", "0.5", "--max-batch-size", "2"],
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
        # 80 requests of 64 texts (seconds of work together, 2 texts per forward), SIGTERM while they
        # run: more than the replica takes at once (max_ongoing_requests 64), so some wait in Serve's
        # router when the drain starts; admitted before it, they are answered too.
        body = {"texts": ["the car was great and the service was awful " * 3] * 64}

        def send(_: int) -> int | str:
            try:
                return requests.post(f"{url}/predict", json=body, timeout=90).status_code
            except requests.RequestException as e:  # a dropped request: what the drain must prevent
                return type(e).__name__
        with ThreadPoolExecutor(80) as pool:
            in_flight = [pool.submit(send, i) for i in range(80)]
            time.sleep(0.5)
            assert sum(not f.done() for f in in_flight) >= 70, "too few requests still running at SIGTERM"
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            late = requests.post(f"{url}/predict", json={"text": "awful"}, timeout=60)  # while draining
            answers = [f.result() for f in in_flight]
        _, err = proc.communicate(timeout=90)
        assert answers == [200] * 80, answers
        assert late.status_code == 503 and "draining" in late.json()["error"], late.text
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


def test_adversarial_load_then_sigterm_fails_no_good_request_and_drops_none(tmp_path, tiny_bert):
    """bench/serve_load.py on a small budget: 8 clients for 8 s, 10% adversarial, SIGTERM under load."""
    import json
    from pathlib import Path

    model = export_tiny(tiny_bert, tmp_path / "run" / "model")
    out = tmp_path / "load.json"
    p = subprocess.run([sys.executable, "-m", "bench.serve_load", "--model", model, "--concurrency", "8",
                        "--seconds", "8", "--cpus", "0.5", "--json", str(out)], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["good"] > 50 and r["bad"] > 5, r
    assert r["good_failed"] == {} and r["bad_not_4xx"] == {} and r["dropped_at_sigterm"] == {}, r
    assert r["cut_past_drain_timeout"] == {}, r  # 8 clients: nothing should wait 20 s
    assert r["exit_code"] == 0, r["stderr_tail"]
