"""The benchmark harness: ftdist's path, a plain loop and the HF Trainer run side by side without Ray."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_harness_imports_no_ray():
    code = "import sys, bench.throughput; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_tiny_cpu_run_has_every_contender_and_never_imports_ray(tmp_path):
    # A `ray` package that fails on import, first on the path: any import of Ray by the harness fails the run.
    fake = tmp_path / "hide" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the benchmark harness must not import ray')\n")
    out = tmp_path / "tiny.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "hide"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "bench.throughput", "--model", "tiny", "--device", "cpu",
                        "--contenders", "ftdist", "plain", "hf", "--rounds", "2", "--steps", "2", "--warmup", "1",
                        "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["ray_imported"] is False
    assert rep["suite"] == "fixed" and rep["meta"]["versions"]["torch"]
    by = {r["name"]: r for r in rep["results"]}
    for name in ("ftdist", "plain"):
        r = by[name]
        assert r["status"] == "ok" and r["samples_per_s"] > 0 and r["tokens_per_s"] > 0
        assert len(r["windows_s"]) == 2 and r["vs_plain"]["paired_median"] > 0
    assert "ZeRO-0" in by["ftdist"]["describe"]
    assert "contender" in p.stdout and "JSON:" in p.stdout  # the printed table
    if importlib.util.find_spec("accelerate") is None:
        assert by["hf"]["status"] == "skipped" and "accelerate" in by["hf"]["reason"]
        pytest.skip("accelerate is not installed: the HF Trainer contender was skipped (pip install -e '.[test]')")
    assert by["hf"]["status"] == "ok" and by["hf"]["samples_per_s"] > 0 and by["ftdist"]["vs_hf"]["paired_median"] > 0
