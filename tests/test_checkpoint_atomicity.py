"""Killing everything while a checkpoint is being written (asserted: at the kill a checkpoint folder
was on disk that Ray had not registered) never leaves a half-written checkpoint that resume would
pick up: only checkpoints Ray registered (after every rank's part was persisted) are resumed from,
and they are complete."""

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


def _registered(snapshot) -> str | None:
    """The snapshot's text once it parses (Ray rewrites it in place: a read may catch it half written);
    "" before the first registration."""
    if not snapshot.exists():
        return ""
    text = snapshot.read_text()
    try:
        json.loads(text)
    except ValueError:
        return None
    return text


def _unregistered(run, snapshot) -> tuple[str | None, list[str]]:
    """(the snapshot's text, checkpoint folders on disk that it does not name): a folder that a rank
    has begun to persist but Ray has not registered is a checkpoint being written."""
    text = _registered(snapshot)
    if text is None:
        return None, []
    on_disk = sorted(p.name for p in run.iterdir() if p.name.startswith("epoch")) if run.is_dir() else []
    return text, [n for n in on_disk if n not in text]


def _signal_all(pgid: int, ray_tmp: str, sig: int) -> None:
    """``sig`` to the run's process group and to every process that inherited its RAY_TMPDIR."""
    import psutil

    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and any(ray_tmp in v for v in p.environ().values()):
                p.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass


def test_kill_during_checkpoint_writes_resumes_from_a_complete_one(tiny_bert, cls_data, tmp_path):
    # A checkpoint after every batch gives many chances to catch one being written: poll until a
    # checkpoint folder is on disk that Ray has not registered, freeze every process of the run
    # (SIGSTOP), check again that it is still unregistered (else let the run go on and wait for the
    # next checkpoint), then SIGKILL: the kill provably lands while that checkpoint is being written.
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
    caught: list[str] = []
    misses = 0
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not caught:
            text, pending = _unregistered(run, snapshot)
            if pending and text.count("epoch000-batch") >= 2:  # resume will have a registered one
                _signal_all(proc.pid, ray_tmp, signal.SIGSTOP)
                text, still = _unregistered(run, snapshot)
                if text is not None and still:
                    caught = still
                    _signal_all(proc.pid, ray_tmp, signal.SIGKILL)
                else:  # registered meanwhile (or the snapshot was half written): try the next one
                    misses += 1
                    _signal_all(proc.pid, ray_tmp, signal.SIGCONT)
            time.sleep(0.01)
        assert caught, "no checkpoint was caught being written before the run ended or 300 s passed"
        proc.wait()
    finally:
        kill_processes_mentioning(ray_tmp)
    print(f"killed while {caught} was being written ({misses} earlier catch(es) registered before the freeze)")

    text = snapshot.read_text()
    assert all(n not in text for n in caught), (caught, "registered after the kill")
    on_disk = sorted(p.name for p in run.iterdir() if p.name.startswith("epoch"))
    registered = [n for n in on_disk if n in text]
    assert registered
    for name in registered:  # every checkpoint resume could pick is complete
        assert COMPLETE <= _files(run / name), (name, _files(run / name))
    latest = registered[-1]
    assert latest < min(caught), (latest, caught)  # the one being written is newer than any registered

    second = run_cli("train", str(path), env=env)
    kill_processes_mentioning(ray_tmp)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    batch = int(latest.split("-batch")[1].split("-")[0])
    out = second.stdout + second.stderr
    said = [l for l in out.splitlines() if "resumed from checkpoint" in l]
    assert f"resumed from checkpoint at epoch 1, batch {batch} " in out, (latest, registered, caught, said)
    summary = json.loads((run / "summary.json").read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
