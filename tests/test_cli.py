"""The command line as a user runs it: exit codes, one-line errors, no tracebacks, resume after a kill."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import base_config, free_port, run_cli


def kill_processes_mentioning(text: str) -> None:
    """SIGKILL processes whose command line or environment mentions ``text`` (only ours: a unique
    temp dir), and wait until they are gone. Ray actors rename themselves (``ray::TrainController``),
    so their command line no longer shows the temp dir, but they inherit ``RAY_TMPDIR``; an actor
    that outlived the kill could still register a checkpoint behind the test's back."""
    import psutil

    victims = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            mentions = any(text in part for part in p.info["cmdline"] or [])
            if not mentions and p.pid != os.getpid():
                mentions = any(text in v for v in p.environ().values())
            if mentions:
                p.kill()
                victims.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    psutil.wait_procs(victims, timeout=30)


def _write(tmp_path: Path, cfg: dict, name: str = "job.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _assert_user_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("ftdist: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_data_prepare_tokenized_and_raw_text(tmp_path, tiny_bert):
    from conftest import synthetic_rows, write_jsonl

    raw = write_jsonl(tmp_path / "tickets.jsonl", synthetic_rows(300))
    p = run_cli("data", "prepare", "--input", str(raw), "--output", str(tmp_path / "tok"), "--model", tiny_bert,
                "--split", "0.8,0.1,0.1", "--rows-per-shard", "100", "--keep-text", "--max-length", "32", timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert sum(s["rows"] for s in out["splits"].values()) == 300 and out["splits"]["train"]["shards"] == 3
    m = json.loads((tmp_path / "tok" / "train" / "manifest.json").read_text())
    assert {"input_ids", "text", "label"} <= set(m["columns"]) and m["max_length"] == 32 and m["tokenizer"]["sha256"]
    # --raw-text needs no tokenizer at all: workers tokenize with the model's own.
    p = run_cli("data", "prepare", "--input", str(raw), "--output", str(tmp_path / "raw"), "--raw-text", timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads((tmp_path / "raw" / "train" / "manifest.json").read_text())
    assert "input_ids" not in m["columns"] and "text" in m["columns"] and m["tokenizer"] is None
    assert m["num_rows"] == out["splits"]["train"]["rows"]


def test_config_show_redacts_and_resolves(tmp_path, tiny_bert, cls_data):
    cfg = base_config(tiny_bert, cls_data, str(tmp_path / "runs"))
    cfg["storage"]["options"] = {"secret": "hunter2-secret"}
    proc = run_cli("config", _write(tmp_path, cfg), "--set", "train.learning_rate=3e-5")
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["train"]["learning_rate"] == 3e-5 and shown["storage"]["options"]["secret"] == "***"
    assert "hunter2" not in proc.stdout + proc.stderr
    # a default that follows from other keys is shown with the value it takes, as a comment: the
    # printed YAML still loads back to the same config (the same run folder)
    lines = proc.stdout.splitlines()
    assert "  eval_metric: null  # accuracy (model.task sequence-classification's default)" in lines, proc.stdout
    assert "  eval_mode: null  # max (accuracy is better higher)" in lines, proc.stdout
    assert f"  tokenizer: null  # model.path's ({tiny_bert})" in lines, proc.stdout
    assert shown["train"]["eval_metric"] is None and shown["model"]["tokenizer"] is None


# The process-level contract (exit status 2 and one stderr line from a real `ftdist` process) for a
# failure before anything heavy is imported and one after; every other bad input is a row of
# tests/test_bad_input.py, run in-process through the same entry point.
@pytest.mark.parametrize("case", ["missing-file", "data-missing"])
def test_bad_input_exit_2_one_line(case, tmp_path, tiny_bert, cls_data):
    cfg = base_config(tiny_bert, cls_data, str(tmp_path / "runs"))
    expect = {"missing-file": "not found", "data-missing": "does not exist or is empty"}[case]
    cfg["data"]["path"] = str(tmp_path / "no-data")
    path = _write(tmp_path, cfg) if case != "missing-file" else str(tmp_path / "nope.yaml")
    _assert_user_error(run_cli("train", path), expect)
    assert not (tmp_path / "runs" / "t" / "summary.json").exists()


def test_run_folder_of_another_config_is_never_overwritten(tmp_path, tiny_bert, cls_data):
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    (run / "ftdist_run.json").write_text(json.dumps({"fingerprint": "0000", "config": {"train": {"epochs": 9}}}))
    before = sorted(p.name for p in run.iterdir())
    proc = run_cli("train", _write(tmp_path, base_config(tiny_bert, cls_data, str(tmp_path / "runs"))))
    _assert_user_error(proc, "was made by a different config (differs in: ")
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.slow
def test_killed_driver_resumes_from_latest_checkpoint(tmp_path, tiny_bert, cls_data):
    """SIGKILL the whole `ftdist train` process group after its first checkpoint; the same command
    resumes from it (history kept, epochs not retrained) and finishes."""
    cfg = base_config(tiny_bert, cls_data, str(tmp_path / "runs"), train={"epochs": 6})
    path = _write(tmp_path, cfg)
    run = tmp_path / "runs" / "t"
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # AF_UNIX socket paths must stay short
    # The file `ray start` leaves behind, pointing at a cluster that is gone: local mode (no address,
    # no RAY_ADDRESS) must still start ftdist's own cluster rather than try to join that one.
    os.makedirs(os.path.join(ray_tmp, "ray"))
    Path(ray_tmp, "ray", "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen([sys.executable, "-m", "ftdist", "train", path], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    deadline = time.time() + 300
    snapshot = run / "checkpoint_manager_snapshot.json"
    while time.time() < deadline:
        if snapshot.exists() and "epoch00" in snapshot.read_text() and proc.poll() is None:
            break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_processes_mentioning(ray_tmp)  # Ray helpers a killed driver can leave behind
    kept = json.loads(snapshot.read_text())
    assert not (run / "summary.json").exists()
    second = run_cli("train", path, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = second.stdout + second.stderr
    assert "resuming run 't'" in out and "resumed from checkpoint at epoch" in out
    # ftdist's one-line epoch summaries, without Ray Train's per-report metric dumps beside them
    assert "epoch 6 done:" in out and "Reporting training result" not in out
    assert "Checkpoint successfully created" not in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed"] is True
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2, 3, 4, 5, 6]
    resumed_epoch = int(out.split("resumed from checkpoint at epoch ")[1].split(",")[0])
    # Resume started right after the latest checkpoint Ray had registered when the driver was killed.
    registered = [int(e) for e in re.findall(r"epoch(\d{3})-batch000000", json.dumps(kept))]
    assert registered and resumed_epoch == max(registered) + 1, (registered, resumed_epoch)
