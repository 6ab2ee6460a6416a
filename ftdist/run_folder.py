"""The run folder's layout: every name inside ``<storage.path>/<run.name>/`` in one place.

Why one module: the launcher writes the marker and the summary, the worker loop writes the result
and checkpoints, the sweep reads all of them back; when each typed the names itself, a rename in
one place silently broke another (and the sweep code had to import the launcher and the loop just
for a file name). This module also owns the checkpoint-name format and is the one reader of Ray
Train's checkpoint registry, whose format is Ray's internal business.

Names and parsing, plus the one read of Ray's registry; no Ray, no torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ftdist import storage
from ftdist.uri import join_uri

CONFIG = "config.yaml"  # the resolved config, secrets redacted, ${env:...} references kept
RUN_MARKER = "ftdist_run.json"  # fingerprint and world size: resume vs "another config"
SUMMARY = "summary.json"  # written last by the driver: the run is complete
LEASE = ".ftdist-lease.json"  # held by the one driver training into the folder (ftdist.run_lease)
RESULT = "train_result.json"  # the worker-side result (rank 0)
PREDICTIONS = "test_predictions.jsonl"  # test predictions by sample_id
MODEL = "model"  # the HF export of the best checkpoint
MULTITASK_HEADS = "multitask"  # multi-task runs: model/<task>/ per task, model/multitask/ the multi-head weights
TENSORBOARD = "tensorboard"  # TensorBoard event files (rank 0): `tensorboard --logdir <storage.path>`
LEARNING_CURVES_PNG = "plots/learning_curves.png"  # train loss per log step, validation metric per epoch
CONFUSION_MATRIX_PNG = "plots/confusion_matrix.png"  # classification: the best checkpoint on the test split
MLFLOW_RUN = "mlflow_run.json"  # the MLflow run id of this run (a resumed run continues the same MLflow run)
RAY_REGISTRY = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints

_CHECKPOINT = re.compile(r"^epoch(?P<epoch>\d+)-batch(?P<batch>\d+)-step(?P<step>\d+)$")


@dataclass(frozen=True)
class CheckpointName:
    """A checkpoint folder's name: epochs completed, batches done in the next epoch, optimizer steps.

    The zero-padded format sorts by training progress, which is how "newest" is decided."""

    epoch: int
    batch: int
    step: int

    def __str__(self) -> str:
        return f"epoch{self.epoch:03d}-batch{self.batch:06d}-step{self.step:08d}"

    @classmethod
    def parse(cls, name_or_uri: str) -> CheckpointName | None:
        """The name's parts, from a bare name or a URI ending in one; None if it is not a checkpoint."""
        m = _CHECKPOINT.match(name_or_uri.rstrip("/").rsplit("/", 1)[-1])
        return cls(int(m["epoch"]), int(m["batch"]), int(m["step"])) if m else None


def checkpoint_name(epoch: int, batch: int, step: int) -> str:
    return str(CheckpointName(epoch, batch, step))


def is_checkpoint(name: str) -> bool:
    return CheckpointName.parse(name) is not None


def epoch_end_prefix(epoch: int) -> str:
    """The start of the name of the checkpoint taken at the end of ``epoch`` (any step count)."""
    return f"epoch{epoch:03d}-batch000000-"


def latest_registered(run_uri: str, storage_cfg: Any) -> dict[str, Any]:
    """Ray Train's record of the newest registered checkpoint of a run (``checkpoint_dir_name``,
    ``metrics``), or ``{}`` if the run registered none. The only reader of Ray's registry file."""
    uri = join_uri(run_uri, RAY_REGISTRY)
    if not storage.exists(uri, storage_cfg):
        return {}
    return json.loads(storage.read_text(uri, storage_cfg)).get("latest_checkpoint_result") or {}
