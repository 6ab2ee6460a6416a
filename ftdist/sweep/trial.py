"""One sweep trial: the Tune function trainable (:func:`run_trial`) that runs a trial as one or
more Ray Train runs ("segments"), forwards their epoch reports to Tune with pointer checkpoints
(:class:`ForwardReports`, :class:`Reporter`), and starts a PBT segment from a copy of the
exploited checkpoint (:func:`start_from_copy`). Why not Ray's stock ``TuneReportCallback`` and how
PBT exploits work: see :mod:`ftdist.sweep.driver`.
"""

from __future__ import annotations

import contextlib
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
from ftdist import storage
from ftdist.checkpoint import STATE_FILE
from ftdist.config import RunConfig
from ftdist.uri import join_uri
from ftdist.sweep import layout as sweep_layout
from ftdist.sweep.layout import INIT_CHECKPOINT, POINTER, SEGMENT, SEGMENT_MARKER
from ftdist.sweep.spec import ResolvedSweep, trial_config

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
    return sweep_layout.existing_segments(rs.trials_uri, rs.base_config.resolved().storage, trial)


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
