"""TensorBoard event files for a run, written by rank 0 through a narrow interface.

Why a module of its own: the loop only says "here are this log line's numbers" and "here are this
epoch's"; where they go (local folder, or a local folder uploaded to ``s3://`` at epoch ends and at
the finish) and whether tracking is on at all is decided here. The loop passes numbers it has
already read from the device for its log line, so tracking adds no host sync to any step.

Steps on the x-axis are optimizer steps (the loop's ``global_step``), for train and validation
scalars alike, so curves of one run line up. A resumed run adds a new event file next to the old
ones (TensorBoard reads them as one run).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

from ftdist import run_folder as layout
from ftdist import storage
from ftdist.config import RunConfig, config_record, dump_config
from ftdist.uri import join_uri
from ftdist.mlflow_tracking import MlflowTracker


class Tracker:
    """What the loop calls. This base class records nothing (tracking off, or a rank other than 0)."""

    def log_step(self, step: int, values: dict[str, float]) -> None:
        """Scalars of one log line (``train/loss``, ``train/lr``, ...) at optimizer step ``step``."""

    def log_epoch(self, step: int, values: dict[str, float]) -> None:
        """Scalars of one finished epoch (``val/<metric>``, ...); publishes the files to remote storage."""

    def close(self, final: dict[str, float], failed: bool = False) -> None:
        """End of the run: ``final`` metrics (best validation, test) go beside the hyperparameters;
        ``failed``: the run stopped on an error (what was recorded so far stays readable)."""


class Trackers(Tracker):
    """Several trackers at once (TensorBoard and MLflow): each call goes to every one."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts

    def log_step(self, step: int, values: dict[str, float]) -> None:
        for p in self.parts:
            p.log_step(step, values)

    def log_epoch(self, step: int, values: dict[str, float]) -> None:
        for p in self.parts:
            p.log_epoch(step, values)

    def close(self, final: dict[str, float], failed: bool = False) -> None:
        for p in self.parts:
            p.close(final, failed)


class TensorBoardTracker(Tracker):
    """tensorboardX's SummaryWriter into ``<run>/tensorboard/`` (a local folder uploaded for remote runs)."""

    def __init__(self, cfg: RunConfig) -> None:
        from tensorboardX import SummaryWriter

        self.cfg = cfg
        self.uri = join_uri(cfg.run_uri(), layout.TENSORBOARD)
        self.remote = storage.is_remote(self.uri)
        if self.remote:
            self.local = tempfile.mkdtemp(prefix="ftdist-tb-")
        else:
            self.local = storage.local_path(self.uri)
            os.makedirs(self.local, exist_ok=True)
        self.writer = SummaryWriter(self.local, flush_secs=30)
        self.closed = False
        self.writer.add_text("config", "```\n" + dump_config(cfg) + "\n```", 0)

    def log_step(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)

    def log_epoch(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        self._publish()

    def close(self, final: dict[str, float], failed: bool = False) -> None:
        from tensorboardX.summary import hparams

        if self.closed:
            return
        self.closed = True
        exp, ssi, sei = hparams(hyperparameters(self.cfg), final)
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)
        for tag, v in final.items():
            self.writer.add_scalar(tag, v, 0)
        self.writer.close()
        self._publish()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)

    def _publish(self) -> None:
        self._drain()
        self.writer.flush()
        if self.remote:
            storage.upload_dir(self.local, self.uri, self.cfg.storage)


    def _drain(self, timeout_s: float = 5.0) -> None:
        """Wait until tensorboardX's writer thread has taken every queued event. Why: its ``flush()`` only
        flushes what that thread already wrote, so a trial stopped right after its epoch report (ASHA kills
        the actor) lost that epoch's scalars (tests/test_sweep.py saw a 2-epoch trial with one epoch)."""
        q = getattr(getattr(self.writer.file_writer, "event_writer", None), "_event_queue", None)
        deadline = time.monotonic() + timeout_s
        while q is not None and not q.empty() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.02)  # the event the thread took last: written before the flush below


def hyperparameters(cfg: RunConfig) -> dict[str, Any]:
    """The config's scalar values by dotted key (TensorBoard's HPARAMS tab takes scalars only)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, d: Any) -> None:
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                walk(key, v)
            elif isinstance(v, bool | int | float | str):
                out[key] = v
            elif isinstance(v, list | tuple):
                out[key] = str(v)

    walk("", config_record(cfg))
    return out


def open_tracker(cfg: RunConfig, rank: int) -> Tracker:
    """Rank 0's trackers: TensorBoard (``tracking.tensorboard``) and MLflow (``tracking.mlflow``);
    a silent one on other ranks or with both off."""
    if rank != 0:
        return Tracker()
    parts: list[Any] = []
    if cfg.tracking.tensorboard:
        parts.append(TensorBoardTracker(cfg))
    if cfg.tracking.mlflow is not None:
        parts.append(MlflowTracker(cfg, hyperparameters(cfg)))
    return Trackers(parts) if parts else Tracker()
