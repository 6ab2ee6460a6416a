"""Safe defaults: local Ray binds its dashboard/job server to loopback; remote code stays off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from ftdist.config import load_config

SCRIPT = r"""
import json, psutil, ray
from ftdist.config import load_config
from ftdist.ray_cluster import connect_ray
cfg = load_config(data={"model": {"path": "m"}, "data": {"path": "d"}, "scaling": {"num_workers": 1}})
connect_ray(cfg)
url = ray._private.worker.global_worker.node.address_info["webui_url"]
port = int(url.rsplit(":", 1)[1])
ips = sorted({c.laddr.ip for c in psutil.net_connections(kind="inet") if c.status == "LISTEN" and c.laddr.port == port})
print(json.dumps({"url": url, "ips": ips}))
ray.shutdown()
"""


@pytest.mark.slow
def test_local_mode_dashboard_and_job_server_on_loopback():
    ray_tmp = tempfile.mkdtemp(prefix="rd", dir="/tmp")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "RAY_TMPDIR": ray_tmp})
    try:
        assert proc.returncode == 0, proc.stderr[-2000:]
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        assert info["url"].startswith("127.0.0.1:")
        assert info["ips"] == ["127.0.0.1"], info
    finally:
        from test_cli import kill_processes_mentioning

        kill_processes_mentioning(ray_tmp)


def test_trust_remote_code_is_off_unless_enabled():
    cfg = load_config(data={"model": {"path": "m"}, "data": {"path": "d"}})
    assert cfg.model.trust_remote_code is False
