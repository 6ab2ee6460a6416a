"""A real two-node Ray cluster on one machine (`ray start --head` + `ray start --address`), a
training job submitted through the job server with `ftdist submit`, workers on both nodes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import base_config, free_port, run_cli

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def ray_cluster(second_node: bool) -> Iterator[dict]:
    """A head (and optionally a worker node), each 1 CPU with its own temp dir; stopped (only ours)
    afterwards. RAY_AUTH_MODE is the same for `ray start` and the submitting side (README)."""
    root = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: AF_UNIX socket paths
    gcs, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def start(*args: str) -> None:
        # Every per-node port is a free one: Ray's fixed defaults (agent 52365, client 10001, ...)
        # collide with any other Ray cluster on this machine, and the job agent then never comes up.
        ports = [f"--{name}={free_port()}" for name in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "metrics-export-port", "node-manager-port", "object-manager-port")]
        if "--head" in args:
            ports.append(f"--ray-client-server-port={free_port()}")
        proc = subprocess.run([RAY, "start", *args, *ports, "--num-cpus=1", "--disable-usage-stats"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    try:
        start("--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
              f"--dashboard-port={dash}", f"--temp-dir={root}/head", '--resources={"head_node": 1}')
        if second_node:
            start(f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", '--resources={"second_node": 1}')
        yield {"address": f"http://127.0.0.1:{dash}", "env": env, "root": root}
    finally:
        from test_cli import kill_processes_mentioning

        kill_processes_mentioning(root)  # both nodes' processes name the head's temp dir/session
        kill_processes_mentioning(f"127.0.0.1:{gcs}")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def two_nodes():
    with ray_cluster(second_node=True) as cluster:
        yield cluster


@pytest.fixture()
def one_node():
    with ray_cluster(second_node=False) as cluster:
        yield cluster


def test_submit_the_shipped_demo_job_to_a_ray_start_cluster(one_node, tiny_bert, tmp_path):
    """The README's `ftdist submit cluster/jobs/demo.yaml --address ...`, with its data.prepare kept
    (a tiny sample, tokenized with the tiny model's tokenizer) and one short epoch on one worker."""
    t0 = time.monotonic()
    tiny = [f"model.path={tiny_bert}", f"data.path={tmp_path / 'data'}", "data.prepare.limit=300",
            "scaling.num_workers=1", "train.epochs=1", "train.max_steps_per_epoch=3", f"storage.path={tmp_path / 'runs'}"]
    proc = run_cli("submit", str(REPO / "cluster" / "jobs" / "demo.yaml"), "--address", one_node["address"],
                   "--follow", *[a for kv in tiny for a in ("--set", kv)], env=one_node["env"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "submitted job" in proc.stdout and "finished: SUCCEEDED" in proc.stdout
    saved = (tmp_path / "runs" / "demo" / "config.yaml").read_text()
    assert "tokenize: true" in saved and "***" not in saved
    summary = json.loads((tmp_path / "runs" / "demo" / "summary.json").read_text())
    assert summary["status"] == "completed" and sum(summary["rows"].values()) == 300  # the whole tiny sample
    print(f"demo submit took {time.monotonic() - t0:.0f}s")


def test_submit_the_shipped_multitask_job_to_a_ray_start_cluster(one_node, tiny_bert, tmp_path):
    """`ftdist submit cluster/jobs/multitask.yaml` as shipped (both tasks' data.prepare kept, the second
    task's CSV written by cluster/jobs/multitask_data.py), tiny: small samples, 3 batches, one worker."""
    import runpy

    csv = tmp_path / "agreement.csv"
    runpy.run_path(str(REPO / "cluster" / "jobs" / "multitask_data.py"))["write_agreement"](str(csv))
    tiny = [f"model.path={tiny_bert}", f"tasks.0.data.path={tmp_path / 'sentiment'}", "tasks.0.data.prepare.limit=200",
            f"tasks.1.data.path={tmp_path / 'agreement'}", f"tasks.1.data.prepare.input={csv}",
            "tasks.1.data.prepare.limit=200", "scaling.num_workers=1", "train.epochs=1", "train.max_steps_per_epoch=3",
            f"storage.path={tmp_path / 'runs'}"]
    proc = run_cli("submit", str(REPO / "cluster" / "jobs" / "multitask.yaml"), "--address", one_node["address"],
                   "--follow", *[a for kv in tiny for a in ("--set", kv)], env=one_node["env"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "finished: SUCCEEDED" in proc.stdout
    summary = json.loads((tmp_path / "runs" / "multitask" / "summary.json").read_text())
    assert summary["status"] == "completed" and set(summary["tasks"]) == {"sentiment", "agreement"}
    for task in ("sentiment", "agreement"):
        assert sum(summary["tasks"][task]["rows"].values()) == 200
        assert (tmp_path / "runs" / "multitask" / "model" / task / "config.json").exists()


def test_submit_two_worker_job_across_two_nodes(two_nodes, tiny_bert, cls_data, tmp_path):
    cfg = base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": "multinode"},
                      train={"epochs": 1})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_cli("submit", str(path), "--address", two_nodes["address"], "--follow",
                   "--env", "FTDIST_TEST_MARK=visible", env=two_nodes["env"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "submitted job" in proc.stdout and "finished: SUCCEEDED" in proc.stdout
    summary = json.loads((tmp_path / "runs" / "multinode" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(set(summary["node_ids"])) == 2, summary["node_ids"]  # one worker on each node

    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(two_nodes["address"]).list_jobs()
    assert any(j.metadata.get("ftdist_run") == "multinode" for j in jobs)


def test_submit_refuses_literal_secrets_and_secret_env(tmp_path, tiny_bert, cls_data):
    cfg = base_config(tiny_bert, cls_data, str(tmp_path / "runs"))
    cfg["storage"]["options"] = {"secret": "literal-value"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_cli("submit", str(path), "--address", "http://127.0.0.1:1")
    assert proc.returncode == 2 and "holds a literal secret" in proc.stderr and "literal-value" not in proc.stderr
    cfg["storage"]["options"] = {}
    path.write_text(yaml.safe_dump(cfg))
    proc = run_cli("submit", str(path), "--address", "http://127.0.0.1:1", "--env", "AWS_SECRET_ACCESS_KEY=x")
    assert proc.returncode == 2 and "looks like a secret" in proc.stderr


def test_unplaceable_workers_fail_fast_saying_what_was_asked(tiny_bert, cls_data, tmp_path, ray_local):
    from ftdist.config import load_config
    from ftdist.errors import UserError
    from ftdist.launcher import run_training

    cfg = load_config(data=base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": "huge"},
                                       scaling={"num_workers": 2, "cpus_per_worker": 16, "placement_timeout_s": 2}))
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        run_training(cfg)
    assert time.monotonic() - t0 < 60
    msg = str(e.value)
    assert "asked for CPU=32" in msg and "the cluster has CPU=2" in msg and "\n" not in msg
