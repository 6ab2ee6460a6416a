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
``model/``, ``train_result.json``), and the outputs written by :mod:`ftdist.sweep_report`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.train.v2.api.callback import UserCallback

from ftdist import run_folder as layout
from ftdist import storage, sweep_folder
from ftdist.checkpoint import STATE_FILE
from ftdist.config import RunConfig, join_uri
from ftdist.errors import UserError
from ftdist.mlflow_tracking import finish_sweep_parent, start_sweep_parent
# trial_name is also importable from here: Tune pickled it by this module's path into the
# experiment state of sweeps started before it moved to ftdist.sweep_folder.
from ftdist.sweep_folder import INIT_CHECKPOINT, POINTER, SEGMENT, SEGMENT_MARKER, SPEC, SWEEP_MARKER, trial_name
from ftdist.sweep_spec import ResolvedSweep, dump_spec, trial_config, warmup_note


# ---------------------------------------------------------------------------------------------
# Which Train run a trial (re)starts: pure, unit-tested


@dataclass(frozen=True)
class Segment:
    run: str  # Train run name under <sweep>/trials/
    source: str | None  # checkpoint URI of another trial to start from (PBT exploit), else None


def plan_segment(trial: str, pointer: dict[str, Any] | None, segments: dict[str, str | None]) -> Segment:
    """The Train run a trial starts, from the Tune checkpoint it was handed and its existing runs.

    ``segments``: this trial's existing run names -> the checkpoint each was started from.
    No pointer: the trial's first run (Train resumes it if it has checkpoints). A pointer of this
    trial: continue that run (a pause/resume or an interrupted sweep). A pointer of another trial:
    a PBT exploit; reuse the segment already started from that checkpoint, else start a new one.
    """
    if pointer is None:
        return Segment(trial, None)
    if pointer["trial"] == trial:
        return Segment(pointer["run"], None)
    for run, source in segments.items():
        if source == pointer["uri"]:
            return Segment(run, source)
    n = 1 + max([int(m["n"]) for r in segments if (m := SEGMENT.match(r))] + [0])
    return Segment(f"{trial}-pbt{n}", pointer["uri"])


def is_final_report(metrics: dict[str, Any], epochs: int) -> bool:
    return bool(metrics.get("stopped_early")) or metrics.get("epoch", 0) >= epochs


# ---------------------------------------------------------------------------------------------
# Inside a trial


class ForwardReports(UserCallback):
    """Runs in the Train controller: hands every epoch report, with the name of the checkpoint
    reported with it, to the trial's queue. Mid-epoch checkpoints are not forwarded: their metric
    is a placeholder and schedulers decide at epoch ends."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        m = dict(metrics[0])
        if m.get("mid_epoch"):
            return
        name = os.path.basename(checkpoint.path.rstrip("/")) if checkpoint is not None else None
        self.queue.put({"metrics": m, "checkpoint": name})


def run_trial(config: dict[str, Any], rs: ResolvedSweep) -> None:
    """The Tune function trainable: one trial = one (or, after PBT exploits, several) Train runs."""
    from ftdist.ray_worker import quiet_ray_train_logs

    quiet_ray_train_logs()
    trial = tune.get_context().get_trial_name()
    values = {k: config[k] for k in rs.spec.space}
    pointer = read_pointer(tune.get_checkpoint())
    seg = plan_segment(trial, pointer, existing_segments(rs, trial))
    cfg = trial_config(rs, values, seg.run).resolved()  # ${env:...} resolved here; config.yaml keeps them
    restore_from = start_from_copy(cfg, seg, pointer) if seg.source else None
    reporter = Reporter(cfg, trial)
    saved = read_train_result(cfg)
    if saved is not None:  # finished before the sweep driver was interrupted: report, do not retrain
        reporter.finish(saved)
        return
    if not storage.exists(join_uri(cfg.run_uri(), layout.CONFIG), cfg.storage):
        from ftdist.config import dump_config

        storage.write_text(join_uri(cfg.run_uri(), layout.CONFIG), dump_config(cfg), cfg.storage)
    reporter.run(restore_from)


class Reporter:
    """Forwards a trial's epoch reports to Tune with pointer checkpoints; holds back the final one."""

    def __init__(self, cfg: RunConfig, trial: str) -> None:
        self.cfg, self.trial = cfg, trial
        self.pending: dict[str, Any] | None = None

    def run(self, restore_from: str | None) -> None:
        """Train (in a thread) and forward each epoch report as it arrives."""
        from ray.util.queue import Queue

        from ftdist.failures import user_error_from_ray
        from ftdist.launcher import build_trainer

        cfg = self.cfg
        queue = Queue(actor_options={"num_cpus": 0})
        trainer = build_trainer(cfg, callbacks=[ForwardReports(queue)], restore_from=restore_from)
        failure: list[BaseException] = []

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread below
                failure.append(e)
            finally:
                with contextlib.suppress(Exception):  # the trial is being stopped: the queue may be gone
                    queue.put({"done": True})

        threading.Thread(target=fit, name="ftdist-trial-fit", daemon=True).start()
        while True:
            item = queue.get()
            if item.get("done"):
                break
            if is_final_report(item["metrics"], cfg.train.epochs):
                self.pending = item
            else:
                self.report(item)
        if failure:
            ue = user_error_from_ray(failure[0])
            raise (ue or failure[0])
        saved = read_train_result(cfg)
        if saved is None:
            raise RuntimeError(f"trial run {cfg.run.name} ended without {layout.RESULT}")
        self.finish(saved)

    def finish(self, result: dict[str, Any]) -> None:
        """The final report: the last epoch's metrics plus the test metrics of the best checkpoint."""
        item = self.pending
        if item is None:  # this segment reported nothing (it had finished all epochs before a restart)
            last = dict(result["epochs"][-1]) if result.get("epochs") else {"epoch": 0}
            item = {"metrics": {**last, "stopped_early": result.get("stopped_early", False)},
                    "checkpoint": latest_checkpoint(self.cfg.run_uri(), self.cfg)}
        extra = {f"test_{k}": v for k, v in (result.get("test") or {}).items()}
        # done=True: Tune ends the trial without asking the scheduler, so PBT cannot "exploit" a
        # trial that has already finished (and restart it), and ASHA records it as complete.
        self.report(item, {**extra, "ftdist_completed": True, "done": True})

    def report(self, item: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        metrics = {k: v for k, v in item["metrics"].items() if isinstance(v, (int, float, str, bool)) or v is None}
        metrics.update(extra or {})
        metrics["ftdist_run"] = self.cfg.run.name
        name = item.get("checkpoint")
        if name is None:
            tune.report(metrics)
            return
        pointer = {"trial": self.trial, "run": self.cfg.run.name, "checkpoint": name,
                   "uri": join_uri(self.cfg.run_uri(), name), "epoch": metrics.get("epoch")}
        with tempfile.TemporaryDirectory(prefix="ftdist-pointer-") as d:
            with open(os.path.join(d, POINTER), "w") as f:
                json.dump(pointer, f)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def read_train_result(cfg: RunConfig) -> dict[str, Any] | None:
    uri = join_uri(cfg.run_uri(), layout.RESULT)
    return json.loads(storage.read_text(uri, cfg.storage)) if storage.exists(uri, cfg.storage) else None


def read_pointer(checkpoint: Any) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        path = os.path.join(d, POINTER)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)


def existing_segments(rs: ResolvedSweep, trial: str) -> dict[str, str | None]:
    return sweep_folder.existing_segments(rs.trials_uri, rs.base_config.resolved().storage, trial)


def latest_checkpoint(run_uri: str, cfg: RunConfig) -> str | None:
    """The newest checkpoint Ray Train registered for a run (from the run's snapshot file)."""
    return layout.latest_registered(run_uri, cfg.storage).get("checkpoint_dir_name")


def start_from_copy(cfg: RunConfig, seg: Segment, pointer: dict[str, Any] | None) -> str:
    """Copy the exploited checkpoint into the new segment's folder and return the copy's URI.

    Copied immediately because the source trial keeps training and its checkpoint retention may
    delete this checkpoint soon; if it is already gone, the source run's newest checkpoint is
    taken instead. The copy forgets the source run's best-checkpoint bookkeeping (those
    checkpoints are not in this run), so this segment picks its best among its own epochs.
    """
    dest = join_uri(cfg.run_uri(), INIT_CHECKPOINT)
    marker = join_uri(cfg.run_uri(), SEGMENT_MARKER)
    if storage.exists(marker, cfg.storage) and storage.exists(join_uri(dest, STATE_FILE), cfg.storage):
        return dest
    source = seg.source or ""
    used = source
    if not storage.exists(join_uri(source, STATE_FILE), cfg.storage):
        run_uri = source.rsplit("/", 1)[0]
        newest = latest_checkpoint(run_uri, cfg)
        if newest is None:
            raise RuntimeError(f"PBT: checkpoint {source} of the exploited trial no longer exists")
        used = join_uri(run_uri, newest)
    with tempfile.TemporaryDirectory(prefix="ftdist-exploit-") as tmp:
        storage.download_dir(used, tmp, cfg.storage)
        reset_best_tracking(os.path.join(tmp, STATE_FILE))
        storage.upload_dir(tmp, dest, cfg.storage, last=STATE_FILE)
    storage.write_text(marker, json.dumps({"source": source, "copied": used, "from_trial": (pointer or {}).get("trial"),
                                           "time": time.time()}, indent=1), cfg.storage)
    return dest


def reset_best_tracking(state_path: str) -> None:
    """Keep position and history of a copied checkpoint, drop which checkpoint was best (another run's)."""
    with open(state_path) as f:
        state = json.load(f)
    state.update(best_metric=None, best_epoch=None, best_checkpoint=None, bad_epochs=0, stopped_early=False)
    with open(state_path, "w") as f:
        json.dump(state, f, indent=1)


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
    from ftdist.sweep_space import concurrency, describe, total_trials, trial_resources

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
    """Run (or resume) a checked sweep (:func:`ftdist.sweep_spec.resolve_sweep`) and write its
    outputs; returns the sweep summary."""
    from ftdist.preflight import preflight, prepare_data_if_needed
    from ftdist.ray_cluster import connect_ray
    from ftdist.sweep_report import collect_trials, write_outputs
    from ftdist.sweep_space import describe, total_trials

    started = time.time()
    spec = rs.spec
    cfg = rs.base_config.resolved()
    state = check_sweep_folder(rs, resume)
    prepare_data_if_needed(cfg)
    preflight(cfg)
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
    tuner.fit()
    records = collect_trials(rs)
    summary = write_outputs(rs, records, started_at=started, concurrency=limit, resumed=state == "resume")
    finish_sweep_parent(cfg, rs.sweep_uri, parent, summary)
    return summary


def make_tuner(rs: ResolvedSweep, limit: int, resume: bool) -> Any:
    from ftdist.sweep_space import build_scheduler, build_searcher, param_space

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
