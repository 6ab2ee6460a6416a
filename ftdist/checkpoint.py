"""What a checkpoint holds and how a worker restores it.

A checkpoint folder (one per report; Ray Train merges every rank's files into it) contains:

- ``ds/``                DeepSpeed's checkpoint: model, optimizer (ZeRO shards per rank), scheduler
- ``ftdist_state.json``  (rank 0) training position and bookkeeping: epoch, batches done in that
                         epoch (the data reader's position), global step, best metric and which
                         checkpoint holds it, early-stopping counter, per-epoch history
- ``rng_rank{r}.pt``     each rank's RNG states (torch CPU/CUDA, Python); loaded with weights_only
- ``samples_rank{r}.json`` the sample ids each rank trained, per epoch (only with data.record_sample_ids)

Ray registers a checkpoint only once every rank has uploaded its part, so a crash during a save
leaves the previous checkpoint as the latest one (see README, Reliability).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ftdist import run_folder

DS_TAG = "ds"
STATE_FILE = "ftdist_state.json"


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (or the next one when batch == 0)
    batch: int = 0  # batches of `epoch` already trained: the reader's position
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    best_checkpoint: str | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    train_log: list[list[float]] = field(default_factory=list)  # [optimizer step, train loss] per log line (rank 0)
    val_confusions: dict[str, list[list[int]]] = field(default_factory=dict)  # validation confusion by epoch
    samples: dict[str, list[int]] = field(default_factory=dict)  # this rank's trained ids by epoch
    tasks: dict[str, Any] = field(default_factory=dict)  # multi-task: each task's stream position (ftdist.multitask)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("samples")
        return json.dumps(d, indent=1)


def checkpoint_name(state: TrainState) -> str:
    return run_folder.checkpoint_name(state.epoch, state.batch, state.global_step)


def save(engine: Any, state: TrainState, rank: int, directory: str, record_samples: bool) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (all ranks must call: collective)."""
    os.makedirs(directory, exist_ok=True)
    engine.save_checkpoint(os.path.join(directory, "ds"), tag=DS_TAG)
    rng = {"torch": torch.get_rng_state(), "python": _py_state_to_list(random.getstate())}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(directory, f"rng_rank{rank}.pt"))
    if record_samples:
        with open(os.path.join(directory, f"samples_rank{rank}.json"), "w") as f:
            json.dump(state.samples, f)
    if rank == 0:
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            f.write(state.to_json())


def load(engine: Any, rank: int, directory: str, module_only: bool = False) -> TrainState:
    """Restore engine (and, unless ``module_only``, optimizer/scheduler/RNG) from ``directory``."""
    engine.load_checkpoint(os.path.join(directory, "ds"), tag=DS_TAG, load_module_only=module_only,
                           load_optimizer_states=not module_only, load_lr_scheduler_states=not module_only)
    with open(os.path.join(directory, STATE_FILE)) as f:
        d = json.load(f)
    state = TrainState(**d)
    if module_only:
        return state
    rng_path = os.path.join(directory, f"rng_rank{rank}.pt")
    if os.path.exists(rng_path):
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(_py_state_from_list(rng["python"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    samples = os.path.join(directory, f"samples_rank{rank}.json")
    if os.path.exists(samples):
        with open(samples) as f:
            state.samples = json.load(f)
    return state


def _py_state_to_list(s: tuple[Any, ...]) -> list[Any]:
    return [s[0], list(s[1]), s[2]]


def _py_state_from_list(s: list[Any]) -> tuple[Any, ...]:
    return (s[0], tuple(s[1]), s[2])
