"""Sweeps (``ftdist tune``): the spec and its translation to Tune (pure), PBT's restore with changed
hyperparameters at every ZeRO stage (in-process DeepSpeed), and real Ray Tune sweeps run through
the CLI on tiny models: ASHA stops trials, a killed sweep resumes without retraining finished
trials, PBT exploits, and the outputs agree with each other."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import base_config, run_cli
from test_cli import kill_processes_mentioning
from ftdist.errors import UserError
from ftdist.sweep.spec import Dimension, load_sweep_spec, resolve_sweep, trial_config

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": {"path": "m"}, "data": {"path": "d"}}
LR = {"train.learning_rate": {"loguniform": [1.0e-5, 1.0e-3]}}
EPOCHS = 4  # per trial in the end-to-end sweeps
GOOD_LR = 2.0e-3  # with batch 8 the seeded tiny model learns in epoch 2 (after a plateau); 1e-9 never does


def spec(**kw) -> dict:
    return {"name": "s", "base": {"config": BASE}, "space": dict(LR), **kw}


# ---------------------------------------------------------------------------------------------
# The spec and its translation (no Ray)


def test_space_translates_to_tune_samplers():
    from ray.tune.search.sample import Categorical, Float, Integer

    from ftdist.sweep.space import clamp_to_space, grid_points, param_space, pbt_mutations, total_trials

    s = load_sweep_spec(data=spec(space={
        "train.learning_rate": {"loguniform": [1e-5, 1e-3]}, "train.weight_decay": {"uniform": [0, 0.1]},
        "train.gradient_accumulation_steps": {"randint": [1, 4]}, "train.batch_size": {"choice": [16, 32]},
        "train.epochs": {"grid": [2, 3, 4]}}, num_samples=2))
    ps = param_space(s)
    lr = ps["train.learning_rate"]
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-5, 1e-3) and type(lr.sampler).__name__ == "_LogUniform"
    assert isinstance(ps["train.weight_decay"], Float) and type(ps["train.weight_decay"].sampler).__name__ == "_Uniform"
    ga = ps["train.gradient_accumulation_steps"]
    assert isinstance(ga, Integer) and (ga.lower, ga.upper) == (1, 5)  # inclusive bounds in the spec
    assert isinstance(ps["train.batch_size"], Categorical) and ps["train.batch_size"].categories == [16, 32]
    assert ps["train.epochs"] == {"grid_search": [2, 3, 4]}
    assert grid_points(s) == 3 and total_trials(s) == 6
    # grid search enumerates choices too
    g = load_sweep_spec(data=spec(space={"train.batch_size": {"choice": [16, 32]}, "train.epochs": {"grid": [2, 3]}},
                                  search="grid"))
    assert param_space(g)["train.batch_size"] == {"grid_search": [16, 32]} and total_trials(g) == 4
    # PBT resamples from the same space, and perturbed values are clamped back into it
    p = load_sweep_spec(data=spec(space={"train.learning_rate": {"loguniform": [1e-5, 1e-3]},
                                         "train.batch_size": {"choice": [16, 32]}}, scheduler={"type": "pbt"}))
    m = pbt_mutations(p)
    assert m["train.batch_size"] == [16, 32] and isinstance(m["train.learning_rate"], Float)
    space = {"train.warmup_ratio": Dimension("uniform", 0.0, 0.2), "train.x": Dimension("randint", 1, 4)}
    assert clamp_to_space({"train.warmup_ratio": 0.24, "train.x": 4.6, "o": 9}, space) == {
        "train.warmup_ratio": 0.2, "train.x": 4, "o": 9}


def test_schedulers_and_searchers_are_built_from_the_spec():
    from ray.tune.schedulers import (
        AsyncHyperBandScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule, PopulationBasedTraining,
    )

    from ftdist.sweep.space import build_scheduler, build_searcher

    def sched(s: dict, **kw):
        return build_scheduler(resolve_sweep(load_sweep_spec(data=spec(scheduler=s, **kw))))

    asha = sched({"type": "asha", "grace_period": 1, "reduction_factor": 3},
                 base={"config": BASE, "set": ["train.epochs=6"]})
    assert isinstance(asha, AsyncHyperBandScheduler) and asha._max_t == 6 and asha._time_attr == "epoch"
    assert isinstance(sched({"type": "hyperband"}), HyperBandScheduler)
    assert isinstance(sched({"type": "median_stopping"}), MedianStoppingRule)
    assert isinstance(sched({"type": "fifo"}), FIFOScheduler)
    assert isinstance(sched({"type": "pbt", "perturbation_interval": 1}), PopulationBasedTraining)
    rs = resolve_sweep(load_sweep_spec(data=spec(search={"type": "optuna"})))
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install optuna"):
            build_searcher(rs, 2)
    else:
        from ray.tune.search.optuna import OptunaSearch

        searcher = build_searcher(rs, 2)
        assert isinstance(getattr(searcher, "searcher", searcher), OptunaSearch)


def test_warmup_longer_than_the_grace_period_is_flagged():
    from ftdist.sweep.spec import warmup_note

    def note(warmup_hi: float, grace: int):
        return warmup_note(resolve_sweep(load_sweep_spec(data=spec(
            space={"train.warmup_ratio": {"uniform": [0.0, warmup_hi]}},
            scheduler={"type": "asha", "grace_period": grace}, base={"config": BASE, "set": ["train.epochs=6"]}))))

    flagged = note(0.2, 1)
    assert flagged and "up to 1.2 epochs" in flagged and "train.warmup_ratio <= 0.167" in flagged
    assert note(0.1, 1) is None and note(0.2, 2) is None


def test_asha_rung_records_survive_a_restore(tmp_path):
    """Tune restores the scheduler from the copy it pickled at the start (empty rungs); ftdist's ASHA
    reloads its saved records, so a resumed trial is still judged against the trials before it."""
    import pickle
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from ftdist.config import StorageSection
    from ftdist.sweep.asha import PersistentASHA

    def fresh() -> PersistentASHA:
        s = PersistentASHA(str(tmp_path / "scheduler" / "asha_rungs.json"), StorageSection(), time_attr="epoch",
                           max_t=6, grace_period=1, reduction_factor=2)
        s.set_search_properties("val_accuracy", "max")
        return s

    first = fresh()
    pickled_at_start = pickle.dumps(first)
    a, b, c = (SimpleNamespace(trial_id=i) for i in ("a", "b", "c"))
    for t, acc in ((a, 0.9), (b, 0.8)):
        first.on_trial_add(None, t)
        first.on_trial_result(None, t, {"epoch": 1, "val_accuracy": acc})
    # the driver dies; the restored scheduler is the start-of-sweep copy
    restored = pickle.loads(pickled_at_start)
    restored.on_trial_add(None, c)
    assert restored.on_trial_result(None, c, {"epoch": 1, "val_accuracy": 0.5}) == TrialScheduler.STOP
    without_records = fresh()
    (tmp_path / "scheduler" / "asha_rungs.json").unlink()
    without_records.on_trial_add(None, c)
    assert without_records.on_trial_result(None, c, {"epoch": 1, "val_accuracy": 0.5}) == TrialScheduler.CONTINUE


def test_metric_forms_defaults_and_trial_config(tmp_path):
    rs = resolve_sweep(load_sweep_spec(data=spec(metric="accuracy")))
    assert (rs.metric, rs.mode) == ("val_accuracy", "max")
    rs = resolve_sweep(load_sweep_spec(data=spec(metric="val_macro_f1", storage_path=str(tmp_path))))
    assert (rs.metric, rs.mode, rs.sweep_uri) == ("val_macro_f1", "max", str(tmp_path / "s"))
    clm_base = {**BASE, "model": {"path": "m", "task": "causal-lm"}}
    clm = resolve_sweep(load_sweep_spec(data=spec(base={"config": clm_base})))
    assert (clm.metric, clm.mode) == ("val_loss", "min")  # default: the task's validation metric
    cfg = trial_config(rs, {"train.learning_rate": 3e-4}, "trial_x")
    assert cfg.run.name == "trial_x" and cfg.storage.path == str(tmp_path / "s" / "trials")
    assert cfg.train.learning_rate == 3e-4 and cfg.eval_metric == "macro_f1" and cfg.eval_mode == "max"
    # --set reaches the spec (spec keys, space.<key>) and the base config (config keys)
    s = load_sweep_spec(data=spec(), overrides=["num_samples=3", "scheduler.type=fifo", "train.epochs=5",
                                                "space.train.batch_size={choice: [8, 16]}"])
    assert s.num_samples == 3 and s.scheduler.type == "fifo" and s.space["train.batch_size"].values == (8, 16)
    assert resolve_sweep(s).base["train"]["epochs"] == 5


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d.update(schedular={"type": "asha"}), "unknown key 'schedular'; did you mean 'scheduler'?"),
    (lambda d: d.update(scheduler={"type": "asha", "grace": 2}), "did you mean 'scheduler.grace_period'?"),
    (lambda d: d.update(scheduler={"type": "ashaa"}), "unknown scheduler 'ashaa'; did you mean 'asha'?"),
    (lambda d: d.update(space={}), "space is empty"),
    (lambda d: d.update(space={"train.learnin_rate": {"uniform": [0, 1]}}), "did you mean 'train.learning_rate'?"),
    (lambda d: d.update(space={"train": {"uniform": [0, 1]}}), "is a config section"),
    (lambda d: d.update(space={"run.name": {"choice": ["a"]}}), "cannot be swept"),
    (lambda d: d.update(space={"train.learning_rate": {"loguniform": [0, 1e-3]}}), "loguniform needs low > 0"),
    (lambda d: d.update(space={"train.learning_rate": {"uniform": [1e-3, 1e-5]}}), "low must be below high"),
    (lambda d: d.update(space={"train.learning_rate": {"uniform": [1e-3, 2]}}), "value 2.0 is not a valid run config"),
    (lambda d: d.update(space={"train.batch_size": {"choice": []}}), "non-empty list"),
    (lambda d: d.update(space={"train.batch_size": {"choise": [16]}}), "did you mean 'choice'?"),
    (lambda d: d.update(space={"train.batch_size": {"randint": [1.5, 4]}}), "randint bounds must be integers"),
    (lambda d: d.update(metric="val_f1"), "metric 'val_f1' is not reported for task sequence-classification"),
    (lambda d: d.update(search="grid"), "search 'grid' enumerates values"),
    (lambda d: d.update(search={"type": "bayes"}), "unknown search 'bayes'"),
    (lambda d: d.update(scheduler={"type": "pbt"}, space={"deepspeed.zero_stage": {"choice": [1, 2]}}),
     "scheduler 'pbt' cannot perturb 'deepspeed.zero_stage'"),
    (lambda d: d.update(scheduler={"type": "asha", "grace_period": 5}), "exceeds the most epochs a trial runs"),
    (lambda d: d.update(num_samples=0), "'num_samples'"),
    (lambda d: d.update(base={}), "base needs exactly one of"),
    (lambda d: d.update(resources_per_trial={"num_workerz": 1}), "did you mean 'resources_per_trial.num_workers'?"),
])
def test_bad_spec_is_one_line_user_error(mutate, fragment):
    d = spec()
    mutate(d)
    with pytest.raises(UserError) as e:
        resolve_sweep(load_sweep_spec(data=d))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_shipped_specs_validate(monkeypatch):
    """tune/*.yaml against the demo config; the KubeRay sweep specs against their ConfigMap train.yaml."""
    monkeypatch.chdir(ROOT)  # base paths are relative to the current directory
    for path in sorted((ROOT / "tune").glob("*.yaml")):
        rs = resolve_sweep(load_sweep_spec(path))
        assert rs.metric == "val_accuracy" and rs.spec.resources_per_trial.num_workers == 1, path
    for d in (ROOT / "k8s" / "base", ROOT / "k8s" / "overlays" / "cpu-kind"):
        raw = yaml.safe_load((d / "sweep.yaml").read_text())
        train_path = d / "train.yaml" if (d / "train.yaml").exists() else ROOT / "k8s" / "base" / "train.yaml"
        train = yaml.safe_load(train_path.read_text())
        rs = resolve_sweep(load_sweep_spec(data=raw), base_raw=train)
        assert rs.storage_path.startswith("s3://") and rs.spec.base.path == "/config/train.yaml"


def test_pbt_segments_and_report_rules():
    from ftdist.sweep.trial import is_final_report, plan_segment
    from ftdist.sweep.report import TrialRecord, checkpoint_epoch, choose_best, classify, dedupe_rows

    other = {"trial": "trial_b", "run": "trial_b", "checkpoint": "epoch002", "uri": "/s/trials/trial_b/epoch002"}
    assert plan_segment("trial_a", None, {}).run == "trial_a"
    own = {**other, "trial": "trial_a", "run": "trial_a-pbt1"}
    seg = plan_segment("trial_a", own, {"trial_a": None, "trial_a-pbt1": "x"})
    assert (seg.run, seg.source) == ("trial_a-pbt1", None)  # its own progress: Train resumes the run itself
    seg = plan_segment("trial_a", other, {"trial_a": None})
    assert (seg.run, seg.source) == ("trial_a-pbt1", other["uri"])  # an exploit starts a new segment
    again = plan_segment("trial_a", other, {"trial_a": None, "trial_a-pbt1": other["uri"]})
    assert again == seg  # restarted before it reported: reuse the segment (and its copy)
    third = plan_segment("trial_a", {**other, "uri": "/y"}, {"trial_a": None, "trial_a-pbt1": "/x"})
    assert third.run == "trial_a-pbt2"
    assert is_final_report({"epoch": 3}, 3) and is_final_report({"epoch": 1, "stopped_early": True}, 3)
    assert not is_final_report({"epoch": 2, "stopped_early": False}, 3)

    rows = [{"epoch": 1, "val_accuracy": 0.5, "ftdist_run": "t"}, {"epoch": 2, "val_accuracy": 0.6, "ftdist_run": "t"}]
    done = TrialRecord("a", "TERMINATED", {}, rows, ["a"], [], {"stopped_early": False})
    assert classify(done, 2, "asha") == ("completed", "completed all 2 epochs")
    stopped = TrialRecord("b", "TERMINATED", {}, rows[:1])
    assert classify(stopped, 4, "asha") == ("stopped", "stopped by asha after epoch 1 of 4")
    assert classify(TrialRecord("c", "ERROR", {}, error="boom"), 4, "asha")[0] == "error"
    assert classify(TrialRecord("d", "RUNNING", {}, rows[:1]), 4, "asha")[0] == "unfinished"
    assert len(dedupe_rows(rows + rows[1:])) == 2
    assert checkpoint_epoch("/s/trials/t/epoch003-batch000000-step00000090") == 3
    trials = [{"trial": "a", "status": "completed", "best_metric": 0.6},
              {"trial": "b", "status": "stopped", "best_metric": 0.9},
              {"trial": "c", "status": "completed", "best_metric": 0.7}]
    assert choose_best(trials, "max")["trial"] == "c"  # a stopped trial has no test metrics or export
    assert choose_best(trials, "min")["trial"] == "a"


@pytest.fixture
def single_process_group():
    from conftest import single_process_group_env

    with single_process_group_env():
        yield


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_restore_with_perturbed_hyperparameters_at_every_zero_stage(stage, tiny_bert, cls_data, tmp_path,
                                                                    single_process_group):
    """What a PBT exploit does, without Ray: trial B continues trial A's DeepSpeed checkpoint (copied,
    best-tracking reset) with another learning rate and weight decay, and trains with B's values."""
    from ftdist.config import load_config
    from ftdist.loop import train_worker
    from ftdist.session import LocalSession
    from ftdist.sweep.trial import reset_best_tracking

    common = {"deepspeed": {"zero_stage": stage}, "train": {"lr_schedule": "constant", "max_steps_per_epoch": 3,
                                                             "epochs": 1, "learning_rate": 1e-2}}
    a = load_config(data=base_config(tiny_bert, cls_data, str(tmp_path), run={"name": "a"}, **common))
    sa = LocalSession(str(tmp_path / "a"))
    train_worker(a, sa)
    name = json.loads((tmp_path / "a" / "latest.json").read_text())["name"]
    shutil.copytree(tmp_path / "a" / name, tmp_path / "b" / name)
    reset_best_tracking(str(tmp_path / "b" / name / "ftdist_state.json"))
    (tmp_path / "b" / "latest.json").write_text(json.dumps({"name": name}))
    b = load_config(data=base_config(tiny_bert, cls_data, str(tmp_path), run={"name": "b"}, **common),
                    overrides=["train.learning_rate=2e-3", "train.weight_decay=0.5", "train.epochs=2"])
    sb = LocalSession(str(tmp_path / "b"))
    result = train_worker(b, sb)
    assert [r["lr"] for r in sa.reports] == [1e-2]
    assert [(r["epoch"], r["lr"]) for r in sb.reports] == [(2, 2e-3)]  # continued A's epoch 1 with B's LR
    assert result["best_epoch"] == 2 and len(result["epochs"]) == 2  # A's history kept, best is B's own
    # B's weight decay is applied too: the same continuation without decay ends with larger weights.
    shutil.copytree(tmp_path / "a" / name, tmp_path / "c" / name)
    reset_best_tracking(str(tmp_path / "c" / name / "ftdist_state.json"))
    (tmp_path / "c" / "latest.json").write_text(json.dumps({"name": name}))
    c = load_config(data=base_config(tiny_bert, cls_data, str(tmp_path), run={"name": "c"}, **common),
                    overrides=["train.learning_rate=2e-3", "train.weight_decay=0.0", "train.epochs=2"])
    train_worker(c, LocalSession(str(tmp_path / "c")))
    from safetensors.torch import load_file

    decayed, plain = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in ("b", "c"))
    key = next(k for k in decayed if k.endswith("attention.self.query.weight"))
    assert decayed[key].norm() < plain[key].norm() * (1 - 1e-4), (decayed[key].norm(), plain[key].norm())


# ---------------------------------------------------------------------------------------------
# Real sweeps through the CLI (Ray Tune + Ray Train + DeepSpeed, tiny models, 2 CPUs)


def _sweep_env(ray_tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # Tune saves its experiment state every second (default: >= 10 s), so the kill test sees it promptly.
    return {**env, "RAY_TMPDIR": ray_tmp, "TUNE_GLOBAL_CHECKPOINT_S": "1"}


def _tune_once(spec_path: str, prefix: str, timeout: float) -> subprocess.CompletedProcess:
    """``ftdist tune SPEC`` in its own Ray temp dir; every process it left behind is killed after."""
    ray_tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # AF_UNIX socket paths must stay short
    try:
        return run_cli("tune", spec_path, env=_sweep_env(ray_tmp), timeout=timeout)
    finally:
        kill_processes_mentioning(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _write_spec(tmp_path: Path, model: str, cls_data: str, name: str, sweep: dict, **train) -> str:
    base = base_config(model, cls_data, str(tmp_path / "runs"),
                       train={"epochs": EPOCHS, "batch_size": 8, "learning_rate": GOOD_LR, "weight_decay": 0.0,
                              **train},
                       deepspeed={"zero_stage": 1},
                       scaling={"num_workers": 1, "cpus_per_worker": 1, "local_num_cpus": 2})
    (tmp_path / f"{name}-base.yaml").write_text(yaml.safe_dump(base))
    doc = {"name": name, "base": {"path": str(tmp_path / f"{name}-base.yaml")},
           "storage_path": str(tmp_path / "sweeps"), **sweep}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _tune_state(sweep_dir: Path) -> dict[str, str]:
    """trial id -> status, from Tune's latest experiment state file (JSON)."""
    files = sorted(sweep_dir.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except (json.JSONDecodeError, OSError):
        return {}
    out = {}
    for trial_json, _meta in data["trial_data"]:
        t = json.loads(trial_json)
        out[t["trial_id"]] = t["status"]
    return out


@pytest.fixture(scope="module")
def asha_sweep(tmp_path_factory, tiny_bert, cls_data):
    """An ASHA sweep (4 trials: a learning rate that learns and one that does not, twice; 2 at a time),
    SIGKILLed once a trial has finished and another was stopped, then resumed with --resume. The
    first rung is at epoch 2: in epoch 1 the tiny model is still on its initial plateau."""
    tmp = tmp_path_factory.mktemp("asha")
    spec_path = _write_spec(tmp, tiny_bert, cls_data, "asha", {
        "space": {"train.learning_rate": {"grid": [GOOD_LR, 1.0e-9]}},
        "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
        "num_samples": 2, "max_concurrent_trials": 2})
    sweep = tmp / "sweeps" / "asha"
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # AF_UNIX socket paths must stay short
    env = _sweep_env(ray_tmp)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "ftdist", "tune", spec_path], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    before: dict[str, dict] = {}
    try:
        deadline = time.time() + 420
        while time.time() < deadline:
            state = _tune_state(sweep)
            done = {t for t, s in state.items() if s == "TERMINATED"}
            finished = {t for t in done if (sweep / "trials" / f"trial_{t}" / "train_result.json").exists()}
            if finished and done - finished and len(done) < len(state) and proc.poll() is None:
                break
            assert proc.poll() is None, f"the sweep ended before it could be killed:\n{proc.stdout.read()[-4000:]}"
            time.sleep(0.3)
        else:
            pytest.fail("no trial finished in time")
        for t in finished:  # what the finished trials left, to check nothing of theirs is redone
            run = sweep / "trials" / f"trial_{t}"
            before[f"trial_{t}"] = {"result_mtime": (run / "train_result.json").stat().st_mtime,
                                    "files": sorted(p.name for p in run.iterdir())}
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_processes_mentioning(ray_tmp)  # Ray helpers a killed driver leaves behind
    first_phase_s = time.time() - t0
    second = run_cli("tune", spec_path, "--resume", env=env, timeout=420)
    kill_processes_mentioning(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    return {"dir": sweep, "before": before, "out": second.stdout, "spec": spec_path, "env": env,
            "times": (first_phase_s, time.time() - t0 - first_phase_s)}


@pytest.mark.slow
def test_asha_stops_a_trial_before_the_last_epoch(asha_sweep):
    s = json.loads((asha_sweep["dir"] / "sweep_summary.json").read_text())
    assert s["status"] == "completed" and s["resumed"] is True and s["num_trials"] == 4
    stopped = [t for t in s["trials"] if t["status"] == "stopped"]
    assert stopped and all(t["epochs_run"] < t["max_epochs"] == EPOCHS for t in stopped)
    assert all(t["stop_reason"].startswith("stopped by asha after epoch") for t in stopped)
    assert all(t["config"]["train.learning_rate"] == 1e-9 for t in stopped)  # the one that does not learn
    assert all(t["stop_reason"].endswith(f"after epoch 2 of {EPOCHS}") for t in stopped)  # at the first rung
    assert s["epochs_trained"] < s["full_budget_epochs"] == 4 * EPOCHS


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(asha_sweep):
    s = json.loads((asha_sweep["dir"] / "sweep_summary.json").read_text())
    by = {t["trial"]: t for t in s["trials"]}
    assert asha_sweep["before"], "the sweep was killed before any trial finished"
    for name, seen in asha_sweep["before"].items():
        run = asha_sweep["dir"] / "trials" / name
        assert (run / "train_result.json").stat().st_mtime == seen["result_mtime"], f"{name} was run again"
        assert by[name]["status"] == "completed" and by[name]["epochs_run"] == EPOCHS  # not retrained
        # at most re-reported from its saved result (if Tune's state predates its end), never trained
        lines = [l for l in asha_sweep["out"].splitlines() if l.startswith(f"[ftdist] {name} ")]
        assert all(" started" in l or "(finished" in l for l in lines), lines
    assert "resuming" in asha_sweep["out"]
    assert all(t["status"] in ("completed", "stopped") for t in s["trials"])
    # ASHA's rung records survived the kill: trials that finished before it never report again,
    # so theirs are in the saved rungs only because the scheduler state was persisted and restored.
    rungs = json.loads((asha_sweep["dir"] / "scheduler" / "asha_rungs.json").read_text())
    recorded = {tid for bracket in rungs["brackets"] for rung in bracket for tid in rung["recorded"]}
    assert {name.removeprefix("trial_") for name in asha_sweep["before"]} <= recorded
    assert len(recorded) == s["num_trials"]  # every trial reached the first rung (epoch 2)
    # the same command without --resume refuses to start over
    again = run_cli("tune", asha_sweep["spec"], env=asha_sweep["env"], timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr and "--resume" in again.stderr


@pytest.mark.slow
def test_sweep_outputs_exist_and_agree(asha_sweep):
    d = asha_sweep["dir"]
    s = json.loads((d / "sweep_summary.json").read_text())
    rows = list(csv.DictReader((d / "trials.csv").open()))
    assert [r["trial"] for r in rows] == [t["trial"] for t in s["trials"]]
    for r, t in zip(rows, s["trials"]):
        # epochs_run counts what the trial's runs trained; the curve is what Tune saw (a killed driver
        # may not have passed on every epoch before it died)
        assert r["status"] == t["status"] and int(r["epochs_run"]) == t["epochs_run"] >= len(t["curve"]) >= 1
        assert float(r["best_val_accuracy"]) == pytest.approx(t["best_metric"])
        assert float(r["train.learning_rate"]) == t["config"]["train.learning_rate"]
    best = s["best"]
    completed = [t for t in s["trials"] if t["status"] == "completed"]
    assert best["best_metric"] == max(t["best_metric"] for t in completed) and best["best_metric"] > 0.6
    assert best["config"]["train.learning_rate"] == GOOD_LR
    export = json.loads((d / "best_model" / "ftdist_export.json").read_text())
    assert export["test"] == best["test"] and best["test"]["accuracy"] > 0.5
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (d / "best_model" / name).exists(), name
    for png in ("learning_curves.png", "hyperparameters.png"):
        data = (d / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    assert s["epochs_trained"] == sum(t["epochs_run"] for t in s["trials"])
    assert f"best config: train.learning_rate={GOOD_LR:.4g}" in asha_sweep["out"]
    assert "epochs trained:" in asha_sweep["out"]
    assert "test (best checkpoint): " in asha_sweep["out"]
    # retention: only the best trial keeps checkpoints (its best and latest); exports of others stay
    best_run = Path(best["run_dir"])
    for t in s["trials"]:
        run = d / "trials" / t["trial"]
        ckpts = [p for p in run.iterdir() if p.name.startswith("epoch")]
        if run == best_run:
            assert 1 <= len(ckpts) <= 2 and t["checkpoint"]
        else:
            assert not ckpts and t["checkpoint"] is None
        assert (run / "model").exists() == (t["status"] == "completed")
    # one TensorBoard event folder per trial under the sweep: `tensorboard --logdir <sweep>` compares them
    from test_tracking import read_scalars

    for t in s["trials"]:
        scalars = read_scalars(d / "trials" / t["trial"] / "tensorboard")
        # A trial running when the driver was killed resumed from its last checkpoint and logged the
        # epochs after it again (same steps): count the epochs, not the events. A trial the scheduler
        # stopped may have written one more epoch than it reported: an epoch's scalars are on disk
        # before its report (so none is lost), and the stop reaches the workers while they train on.
        epochs = len({step for step, _ in scalars["val/accuracy"]})
        extra = 1 if t["status"] != "completed" else 0
        assert t["epochs_run"] <= epochs <= t["epochs_run"] + extra, (t["trial"], t["status"], scalars)


@pytest.mark.slow
def test_pbt_exploits_a_better_trials_checkpoint(tmp_path, tiny_bert, cls_data):
    spec_path = _write_spec(tmp_path, tiny_bert, cls_data, "pbt", {
        "space": {"train.learning_rate": {"grid": [GOOD_LR, 1.0e-9]}},
        # decisions from epoch 2 on: in epoch 1 both trials are still on the model's initial plateau
        "scheduler": {"type": "pbt", "perturbation_interval": 1, "burn_in_period": 2, "quantile_fraction": 0.5,
                      "resample_probability": 0.0},
        "num_samples": 1, "max_concurrent_trials": 2}, lr_schedule="constant")
    p = _tune_once(spec_path, "rp", timeout=420)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    d = tmp_path / "sweeps" / "pbt"
    s = json.loads((d / "sweep_summary.json").read_text())
    assert s["pbt_exploits"] >= 1 and "PBT exploits:" in p.stdout
    assert "Reporting training result" not in p.stdout + p.stderr  # trials log ftdist's epoch lines only
    assert all(t["status"] == "completed" for t in s["trials"])
    names = {t["trial"] for t in s["trials"]}

    def first_lr(t: dict) -> float:
        return yaml.safe_load((d / "trials" / t["runs"][0] / "config.yaml").read_text())["train"]["learning_rate"]

    bad = [t for t in s["trials"] if first_lr(t) == 1.0e-9]
    assert len(bad) == 1 and bad[0]["exploits"], "the trial that could not learn never exploited the other"
    t = bad[0]
    assert t["best_metric"] > t["curve"][0][1] + 0.1  # it continued from the donor's weights, far above chance
    for e in t["exploits"]:
        assert e["from_trial"] in names - {t["trial"]} and e["run"].startswith(f"{t['trial']}-pbt")
        assert Path(e["copied"]).parent.name.startswith(e["from_trial"])  # a Train checkpoint of the donor
    last = t["exploits"][-1]
    # The summary reports the hyperparameters the trial ended with: those its last run was configured with.
    last_cfg = yaml.safe_load((d / "trials" / last["run"] / "config.yaml").read_text())
    assert last_cfg["train"]["learning_rate"] == pytest.approx(t["config"]["train.learning_rate"])
    result = json.loads((d / "trials" / last["run"] / "train_result.json").read_text())
    assert [r["epoch"] for r in result["epochs"]] == list(range(1, EPOCHS + 1))  # donor's history, then its own
    restored_at = int(Path(last["copied"]).name[len("epoch"):len("epoch") + 3])
    if restored_at < EPOCHS:  # the first epoch it trained itself used its own (perturbed) learning rate
        assert result["epochs"][restored_at]["lr"] == pytest.approx(t["config"]["train.learning_rate"])
    assert not list((d / "trials").glob("*/pbt_init"))  # the copies are pruned with the other checkpoints


@pytest.mark.parametrize("case, fragment", [
    ("unknown-key", "did you mean 'train.learning_rate'?"),
    ("empty-space", "space is empty"),
    ("bad-bounds", "low must be below high"),
    ("bad-metric", "is not reported for task sequence-classification"),
    ("unknown-scheduler", "unknown scheduler 'hyperbandd'; did you mean 'hyperband'?"),
    ("nothing-to-resume", "nothing to resume"),
])
def test_cli_bad_spec_exit_2_one_line(case, fragment, tmp_path, tiny_bert, cls_data, capsys):
    """In-process through the CLI's entry point (the process-level contract, exit status and stderr of a
    real ``ftdist`` process, is held by tests/test_cli.py)."""
    from ftdist.cli import main

    sweep = {"space": {"train.learning_rate": {"loguniform": [1e-4, 1e-2]}}}
    if case == "unknown-key":
        sweep["space"] = {"train.learnig_rate": {"loguniform": [1e-4, 1e-2]}}
    elif case == "empty-space":
        sweep["space"] = {}
    elif case == "bad-bounds":
        sweep["space"] = {"train.learning_rate": {"uniform": [1e-2, 1e-4]}}
    elif case == "bad-metric":
        sweep["metric"] = "val_perplexity"
    elif case == "unknown-scheduler":
        sweep["scheduler"] = {"type": "hyperbandd"}
    args = ["--resume"] if case == "nothing-to-resume" else []
    code = main(["tune", _write_spec(tmp_path, tiny_bert, cls_data, "bad", sweep), *args])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("ftdist: error:") and fragment in lines[0], err[-2000:]
    assert not (tmp_path / "sweeps" / "bad").exists()


@pytest.mark.slow
def test_cli_trial_larger_than_the_cluster_fails_fast(tmp_path, tiny_bert, cls_data):
    path = _write_spec(tmp_path, tiny_bert, cls_data, "big", {
        "space": dict(LR), "resources_per_trial": {"num_workers": 3, "cpus_per_worker": 1}})
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    try:
        t0 = time.time()
        p = run_cli("tune", path, env=_sweep_env(ray_tmp), timeout=180)
        took = time.time() - t0
    finally:
        kill_processes_mentioning(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    line = [l for l in p.stderr.splitlines() if l.startswith("ftdist: error:")][0]
    assert "one trial asks for CPU=3" in line and "the local Ray cluster has CPU=2" in line
    assert took < 90


def test_every_trial_failed_only_when_no_trial_got_anywhere():
    from ftdist.sweep.report import every_trial_failed

    def summary(*statuses: str) -> dict:
        return {"sweep": "s", "sweep_dir": "/x", "status": "completed",
                "trials": [{"trial": f"t{i}", "status": st, "error": f"boom {i}"} for i, st in enumerate(statuses)]}

    assert every_trial_failed(summary("error", "error")) == (
        "every trial of sweep 's' failed (2 of 2); the first, t0: boom 0; details in /x")
    assert every_trial_failed(summary("error", "completed")) is None
    assert every_trial_failed(summary("error", "stopped")) is None
    assert every_trial_failed({**summary("error"), "status": "interrupted"}) is None


@pytest.mark.slow
def test_cli_sweep_whose_every_trial_errored_exits_1_with_the_first_error(tmp_path, tiny_bert, cls_data):
    """A model whose weights are corrupt passes the driver's checks (the tokenizer loads) and fails in
    every trial: the sweep must not report success."""
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_bert, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    path = _write_spec(tmp_path, str(broken), cls_data, "allfail", {
        "space": {"train.learning_rate": {"grid": [1e-3, 1e-2]}}, "scheduler": {"type": "fifo"}}, epochs=1)
    p = _tune_once(path, "ra", timeout=300)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    lines = [l for l in p.stderr.strip().splitlines() if l.startswith("ftdist: error:")]
    assert len(lines) == 1, p.stderr[-2000:]
    assert "every trial" in lines[0] and "2 of 2" in lines[0], lines[0]
    s = json.loads((tmp_path / "sweeps" / "allfail" / "sweep_summary.json").read_text())
    first = sorted(s["trials"], key=lambda t: t["trial"])[0]
    assert first["status"] == "error" and first["error"] and first["error"] in lines[0]
