"""Ray Tune wiring: ``ftdist tune SPEC`` runs a sweep whose trials are real distributed runs.

Each trial is a Tune *function trainable* that builds the trial's run config (base config + the
sampled dotted keys), starts a Ray Train ``TorchTrainer`` (:func:`ftdist.launcher.build_trainer`)
and forwards its per-epoch reports to Tune, so schedulers (ASHA, HyperBand, median stopping, PBT)
decide after every epoch. Ray 2.60 refuses ``Tuner(trainer)`` with Train v2; this is the supported
pattern. The trial's own driver asks Tune for ``{"cpu": 0, "memory": 1}`` only; its Train workers
take the real resources, so the number of concurrent trials is computed here from the cluster's
resources and one trial's needs (Tune cannot see them).

Why not Ray's stock ``TuneReportCallback``: it forwards metrics only, without a Tune checkpoint,
so PBT has nothing to exploit, and it forwards the last epoch's report immediately, so a scheduler
stopping a trial at its final rung kills it while it tests and exports its best checkpoint.
:class:`ForwardReports` is the same mechanism (a Train ``UserCallback`` feeding a queue actor)
with two changes: each report carries a small *pointer* checkpoint (which Train checkpoint, of
which run) and a trial's final report is held back until its Train run has finished.

PBT exploit: Tune hands the weaker trial the stronger trial's pointer. The trial then starts a new
Train run ("segment", ``<trial>-pbt<n>``) from a copy of that checkpoint (DeepSpeed state, ZeRO
shards, optimizer, schedule, reader position; the copy is taken at once, before the source
trial's retention can delete it) and the loop re-applies the perturbed optimizer hyperparameters
(:func:`ftdist.engine.reapply_hyperparameters`).

Layout of ``<storage>/<sweep name>/``: Tune's experiment state and per-trial result logs
(``trial_<id>/``), the Train run folder of every trial segment (``trials/<run>/``: checkpoints,
``model/``, ``train_result.json``), and the outputs written by :mod:`ftdist.sweep.report`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from typing import Any

from ray import tune

from ftdist import storage
from ftdist.config import RunConfig
from ftdist.uri import join_uri
from ftdist.errors import UserError
from ftdist.mlflow_tracking import finish_sweep_parent, start_sweep_parent
from ftdist.sweep.layout import SPEC, SWEEP_MARKER, trial_name
from ftdist.sweep.spec import ResolvedSweep, dump_spec, warmup_note
from ftdist.sweep.trial import run_trial

# ---------------------------------------------------------------------------------------------
# The driver


def check_sweep_folder(rs: ResolvedSweep, resume: bool) -> str:
    """'new' or 'resume'; refuse to mix a sweep with another spec or to start over an existing one."""
    st = rs.base_config.resolved().storage
    marker = join_uri(rs.sweep_uri, SWEEP_MARKER)
    exists = storage.exists(marker, st)
    if not resume:
        if exists:
            raise UserError(f"sweep '{rs.spec.name}' already exists at {rs.sweep_uri}; add --resume to continue it "
                            f"(finished trials are kept) or choose another name (--set name=...)")
        if storage.listdir(rs.sweep_uri, st):
            raise UserError(f"sweep folder {rs.sweep_uri} exists but was not made by ftdist tune; choose another "
                            f"name or storage_path")
        return "new"
    if not exists:
        raise UserError(f"nothing to resume: no sweep '{rs.spec.name}' at {rs.sweep_uri}; run without --resume")
    saved = json.loads(storage.read_text(marker, st))
    if saved.get("fingerprint") != rs.fingerprint():
        raise UserError(f"sweep folder {rs.sweep_uri} was made by a different spec or base config; resume with the "
                        f"original spec (saved in {join_uri(rs.sweep_uri, SPEC)}) or choose another name")
    return "resume"


def local_cluster_cpus(cfg: RunConfig) -> int:
    if cfg.scaling.local_num_cpus:
        return cfg.scaling.local_num_cpus
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plan_concurrency(rs: ResolvedSweep, local: bool) -> tuple[int, dict[str, float], dict[str, float]]:
    """(trials at a time, one trial's needs, the cluster's resources); fail fast when none fits."""
    import ray

    from ftdist.ray_cluster import use_gpu, wait_for_resources, worker_resources
    from ftdist.sweep.space import concurrency, describe, total_trials, trial_resources

    cfg = rs.base_config
    gpu = use_gpu(cfg)
    need = trial_resources(rs, gpu)
    cluster = dict(ray.cluster_resources())
    fits = concurrency(need, cluster)
    if fits == 0:
        have = describe({k: v for k, v in cluster.items() if k in ("CPU", "GPU", "memory") or k in need})
        if local:
            raise UserError(f"one trial asks for {describe(need)} ({cfg.scaling.num_workers} worker(s)); the local Ray "
                            f"cluster has {have}; lower resources_per_trial (num_workers, cpus_per_worker) or set "
                            f"scaling.local_num_cpus in the base config")
        wait_for_resources(cfg, worker_resources(cfg, gpu))  # an autoscaler may add nodes; else a clear error
        cluster = dict(ray.cluster_resources())
        fits = max(concurrency(need, cluster), 1)
    limit = min(fits, rs.spec.max_concurrent_trials or fits, total_trials(rs.spec))
    return limit, need, cluster


def run_sweep(rs: ResolvedSweep, resume: bool = False, address: str | None = None) -> dict[str, Any]:
    """Run (or resume) a checked sweep (:func:`ftdist.sweep.spec.resolve_sweep`) and write its
    outputs; returns the sweep summary."""
    from ftdist.launcher import check_data
    from ftdist.ray_cluster import connect_ray
    from ftdist.sweep.report import collect_trials, write_outputs
    from ftdist.sweep.space import describe, total_trials

    started = time.time()
    spec = rs.spec
    cfg = rs.base_config.resolved()
    state = check_sweep_folder(rs, resume)
    check_data(cfg)
    addr = address or cfg.scaling.address or os.environ.get("RAY_ADDRESS")
    connect_ray(cfg.model_copy(update={"scaling": cfg.scaling.model_copy(
        update={"address": addr, "local_num_cpus": local_cluster_cpus(cfg)})}))
    limit, need, cluster = plan_concurrency(rs, local=not addr)
    if state == "new":  # only now: a sweep refused above leaves nothing behind
        storage.write_text(join_uri(rs.sweep_uri, SPEC), dump_spec(rs), cfg.storage)
        storage.write_text(join_uri(rs.sweep_uri, SWEEP_MARKER), json.dumps(
            {"fingerprint": rs.fingerprint(), "created": time.time()}, indent=1), cfg.storage)
    n = total_trials(spec)
    print(f"[ftdist] sweep '{spec.name}': {n} trial(s), {spec.scheduler_type} scheduler, {spec.search.type} search, "
          f"{limit} at a time (each trial: {describe(need)}; cluster: "
          f"{describe({k: v for k, v in cluster.items() if k in ('CPU', 'GPU')})}); metric {rs.metric} ({rs.mode})"
          + ("; resuming" if state == "resume" else ""), flush=True)
    if spec.scheduler_type == "pbt" and limit < n:
        print(f"[ftdist] note: PBT works best with the whole population running at once; {n} trials, {limit} at a "
              f"time means trials are paused and their Train runs restarted", flush=True)
    note = warmup_note(rs)
    if note:
        print(f"[ftdist] note: {note}", flush=True)
    parent = start_sweep_parent(cfg, rs.sweep_uri, spec.name)
    if parent is not None:  # each trial's MLflow run becomes a child of the sweep's
        base = copy.deepcopy(rs.base)
        base["tracking"]["mlflow"]["parent_run_id"] = parent
        rs = dataclasses.replace(rs, base=base)
    tuner = make_tuner(rs, limit, resume=state == "resume")
    # Tune's output engine prints an experiment banner whatever `verbose` is, with a TensorBoard path in
    # Ray's temp folder (the trials' TensorBoard files are in their run folders: README, Sweeps); the
    # legacy engine at verbose=0 prints nothing, and ProgressPrinter says what happens.
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        tuner.fit()
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before
    records = collect_trials(rs)
    summary = write_outputs(rs, records, started_at=started, concurrency=limit, resumed=state == "resume")
    finish_sweep_parent(cfg, rs.sweep_uri, parent, summary)
    return summary


def make_tuner(rs: ResolvedSweep, limit: int, resume: bool) -> Any:
    from ftdist.sweep.space import build_scheduler, build_searcher, param_space

    cfg = rs.base_config.resolved()
    trainable = tune.with_resources(tune.with_parameters(run_trial, rs=rs), {"cpu": 0, "memory": 1})
    fs, path = storage.pyarrow_filesystem(rs.storage_path, cfg.storage)
    exp_path = f"{path.rstrip('/')}/{rs.spec.name}"
    if resume and tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        return tune.Tuner.restore(exp_path, trainable=trainable, param_space=param_space(rs.spec),
                                  resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    return tune.Tuner(
        trainable,
        param_space=param_space(rs.spec),
        tune_config=tune.TuneConfig(
            metric=rs.metric, mode=rs.mode, scheduler=build_scheduler(rs), search_alg=build_searcher(rs, limit),
            num_samples=rs.spec.num_samples, trial_name_creator=trial_name, trial_dirname_creator=trial_name,
            reuse_actors=False),
        run_config=tune.RunConfig(
            name=rs.spec.name, storage_path=path, storage_filesystem=fs, verbose=0,
            callbacks=[ProgressPrinter(rs.metric, rs.max_epochs)],
            # Tune's checkpoints are pointers of a few bytes; PBT may hand any of them to another trial.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            failure_config=tune.FailureConfig(max_failures=0)),
    )


class ProgressPrinter(tune.Callback):
    """One line per trial event on the driver (Tune's own tables are turned off: verbose=0)."""

    def __init__(self, metric: str, max_epochs: int) -> None:
        self.metric, self.max_epochs = metric, max_epochs

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.config.items())
        print(f"[ftdist] {trial_name(trial)} started: {params}", flush=True)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        tail = " (finished: tested and exported)" if result.get("ftdist_completed") else ""
        print(f"[ftdist] {trial_name(trial)} epoch {result.get('epoch')}/{self.max_epochs}: {self.metric} "
              f"{_fmt(result.get(self.metric))}{tail}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if not last.get("ftdist_completed"):
            print(f"[ftdist] {trial_name(trial)} stopped by the scheduler after epoch {last.get('epoch')}", flush=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        print(f"[ftdist] {trial_name(trial)} failed (details: {trial.path})", flush=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
