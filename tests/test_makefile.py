"""The two set-up commands: what `make` would run (dry run, nothing installed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(*args: str) -> str:
    # -B: plan every recipe as if the venv were missing (a fresh machine), -n: print, don't run.
    return subprocess.run(["make", "-B", "-n", "install", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def test_torch_index_url_reaches_the_torch_install_only():
    plan = _dry_run("TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
    torch_line = next(l for l in plan.splitlines() if "torch==" in l and "pip install" in l)
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_line
    assert plan.count("--index-url") == 1  # ftdist and its other dependencies still come from PyPI


def test_without_torch_index_url_pip_uses_its_own_settings():
    plan = _dry_run()
    torch_line = next(l for l in plan.splitlines() if "torch==" in l and "pip install" in l)
    assert "--index-url" not in torch_line and '"torch==2.13.0"' in torch_line


def test_make_test_builds_the_mlflow_server_venv_once():
    """`make test` needs the MLflow server's own venv (tests/test_mlflow.py); a stamp keeps it to one build."""
    plan = subprocess.run(["make", "-B", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "-m venv .cache/mlflow-server-venv" in plan
    assert '.cache/mlflow-server-venv/bin/pip install -q "mlflow==3.17.2"' in plan
    assert "touch .cache/mlflow-server-venv/.installed" in plan
