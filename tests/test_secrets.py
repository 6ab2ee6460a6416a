"""Secrets never leak: a real run with known fake credentials passed the supported ways, then a
grep of every file it produced (stdout/stderr, Ray's session logs, the run folder in S3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import base_config

pytestmark = pytest.mark.slow

FAKE = {
    "AWS_ACCESS_KEY_ID": "AKIAFTDISTFAKE000001",
    "AWS_SECRET_ACCESS_KEY": "ftdist-fake-secret-access-key-0001",
    "FTDIST_FAKE_SESSION_TOKEN": "ftdist-fake-session-token-0001",
    "HF_TOKEN": "hf_ftdistfaketoken0001",
}


def test_no_secret_in_any_output(s3_server, s3_bucket, tiny_bert, cls_data, tmp_path):
    fs = s3_server.fs()
    fs.put(cls_data, f"{s3_bucket[5:]}/ds", recursive=True)
    cfg = base_config(tiny_bert, f"{s3_bucket}/ds", f"{s3_bucket}/runs", run={"name": "secret"},
                      train={"epochs": 1}, storage={"endpoint_url": s3_server.endpoint,
                                                    "options": {"token": "${env:FTDIST_FAKE_SESSION_TOKEN}"}})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    env = {**os.environ, **FAKE, "RAY_TMPDIR": ray_tmp}
    proc = subprocess.run([sys.executable, "-m", "ftdist", "train", str(path)], capture_output=True, text=True,
                          env=env, timeout=600)
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outputs: dict[str, bytes] = {"stdout": proc.stdout.encode(), "stderr": proc.stderr.encode()}
        for p in Path(ray_tmp).rglob("*"):
            if p.is_file() and not p.is_symlink():
                try:
                    outputs[str(p)] = p.read_bytes()
                except OSError:
                    pass
        run_files = fs.find(f"{s3_bucket[5:]}/runs/secret")
        assert any(f.endswith("summary.json") for f in run_files) and any("/ds/mp_rank" in f for f in run_files)
        for f in run_files:
            outputs[f"s3://{f}"] = fs.cat(f)
        assert len(outputs) > 20
        for name, value in FAKE.items():
            leaks = [where for where, data in outputs.items() if value.encode() in data]
            assert not leaks, f"{name} leaked into {leaks[:5]}"
    finally:
        from test_cli import kill_processes_mentioning

        kill_processes_mentioning(ray_tmp)


def test_env_refs_in_paths_resolve_where_used_and_stay_references(tiny_bert, cls_data, tmp_path):
    """README: any string value may be ``${env:NAME}``. storage.path, model.path and data.path are
    references here; the run completes, and what it saved still holds the references."""
    from ftdist.config import load_config

    cfg = base_config("${env:FTDIST_E2E_MODEL}", "${env:FTDIST_E2E_DATA}", "${env:FTDIST_E2E_RUNS}",
                      run={"name": "envrefs"}, train={"epochs": 1, "max_steps_per_epoch": 3},
                      scaling={"num_workers": 1})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runs = tmp_path / "elsewhere" / "runs"
    ray_tmp = tempfile.mkdtemp(prefix="re", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "FTDIST_E2E_MODEL": tiny_bert, "FTDIST_E2E_DATA": cls_data,
           "FTDIST_E2E_RUNS": str(runs)}
    try:
        proc = subprocess.run([sys.executable, "-m", "ftdist", "train", str(path)], capture_output=True, text=True,
                              env=env, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        from test_cli import kill_processes_mentioning

        kill_processes_mentioning(ray_tmp)
    run = runs / "envrefs"
    saved = (run / "config.yaml").read_text()
    for name in ("FTDIST_E2E_MODEL", "FTDIST_E2E_DATA", "FTDIST_E2E_RUNS"):
        assert "${env:" + name + "}" in saved
    assert tiny_bert not in saved and cls_data not in saved and str(runs) not in saved
    marker = json.loads((run / "ftdist_run.json").read_text())
    assert marker["fingerprint"] == load_config(path).fingerprint() == load_config(run / "config.yaml").fingerprint()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["config"]["model"]["path"] == "${env:FTDIST_E2E_MODEL}"


def test_a_presigned_input_url_is_recorded_without_its_signature():
    """``data.prepare.input`` may be a presigned URL; the manifest's record of how the data set was
    built (compared on reuse) must not carry its signature."""
    from ftdist.config import PrepareSection
    from ftdist.data.prepare import spec_record

    url = ("https://bucket.s3.amazonaws.com/raw/t.jsonl?X-Amz-Algorithm=AWS4-HMAC-SHA256"
           "&X-Amz-Credential=AKIAFTDISTFAKE0002%2F20261129&X-Amz-Signature=ftdistfakesig0002")
    record = json.dumps(spec_record(PrepareSection(input=url), "sequence-classification", 42, 64))
    assert "ftdistfakesig0002" not in record and "AKIAFTDISTFAKE0002" not in record
    assert "bucket.s3.amazonaws.com/raw/t.jsonl" in record
