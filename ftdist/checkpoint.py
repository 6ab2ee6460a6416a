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

A checkpoint restored on another number of workers than wrote it (``TrainState.world_size``):
ZeRO >= 1 keeps optimizer state (and at stage 3 the weights) in per-rank partitions of the old
size, so the DeepSpeed part is converted to DeepSpeed's *universal* format (one folder per
parameter: fp32 weights and Adam moments, whole) in a local temporary folder and loaded from there
with ``load_universal``, which re-partitions it for the new size; ZeRO-0 state is replicated and
loads as it is. Each new rank reads the sample-id records of the old ranks ``q`` with
``q % new_world == rank``, so the records stay complete.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import random
import tempfile
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
    world_size: int | None = None  # ranks that wrote this checkpoint (None: older checkpoints; see saved_world_size)
    resizes: list[list[int]] = field(default_factory=list)  # [world, batch] per earlier segment of this epoch
    schedule_total: int | None = None  # optimizer steps the LR schedule was planned for (engine.lr_lambda)
    schedule_remap: list[float] = field(default_factory=list)  # after a resize: engine.rescheduled
    # [loss sum, losses, samples, tokens, train seconds] of `epoch`'s first `batch` batches, all ranks: a
    # resumed epoch's train loss and throughput then cover the batches trained before the resume too
    epoch_totals: list[float] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("samples")
        return json.dumps(d, indent=1)


def checkpoint_name(state: TrainState) -> str:
    return run_folder.checkpoint_name(state.epoch, state.batch, state.global_step)


def save(engine: Any, state: TrainState, rank: int, directory: str, record_samples: bool) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (all ranks must call: collective)."""
    os.makedirs(directory, exist_ok=True)
    # Frozen weights (LoRA's base model, train.freeze) never change: they come back from model.path when
    # the model is built, so a checkpoint holds the trainable weights and their optimizer state only
    # (a LoRA checkpoint of a 7B model: megabytes, not ~14 GB).
    engine.save_checkpoint(os.path.join(directory, "ds"), tag=DS_TAG, client_state=_client_state(engine),
                           exclude_frozen_parameters=has_frozen(engine))
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


def load(engine: Any, rank: int, directory: str, module_only: bool = False, world_size: int | None = None) -> TrainState:
    """Restore engine (and, unless ``module_only``, optimizer/scheduler/RNG) from ``directory``.

    ``world_size``: this run's; a checkpoint written by another number of ranks is re-partitioned."""
    with open(os.path.join(directory, STATE_FILE)) as f:
        state = TrainState(**json.load(f))
    state.world_size = saved = state.world_size or saved_world_size(directory)
    resized = world_size is not None and saved != world_size
    ds_dir = os.path.join(directory, "ds")
    kw = dict(tag=DS_TAG, load_module_only=module_only, load_optimizer_states=not module_only,
              load_lr_scheduler_states=not module_only, load_module_strict=not has_frozen(engine))
    if resized and not module_only and engine.zero_optimization_stage() >= 1:
        with tempfile.TemporaryDirectory(prefix="ftdist-universal-") as tmp:
            _load_universal(engine, _to_universal(ds_dir, tmp), kw)
    else:
        # Module only needs no conversion at any size: ZeRO-3 consolidates the weights from the shards
        # (DeepSpeed's get_fp32_state_dict_from_zero_checkpoint), ZeRO-1/2 keep them whole.
        _, client = engine.load_checkpoint(ds_dir, **kw)
        if not module_only:
            _restore_client_state(engine, client or {})
    if module_only:
        return state
    rng_path = os.path.join(directory, f"rng_rank{rank}.pt")
    if os.path.exists(rng_path):
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(_py_state_from_list(rng["python"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    new_world = world_size or saved
    for old_rank in range(rank, saved, new_world):
        samples = os.path.join(directory, f"samples_rank{old_rank}.json")
        if os.path.exists(samples):
            with open(samples) as f:
                for epoch, ids in json.load(f).items():
                    state.samples.setdefault(epoch, []).extend(ids)
    return state


def has_frozen(engine: Any) -> bool:
    """Whether the model has frozen parameters (left out of its checkpoints, see :func:`save`)."""
    return any(not p.requires_grad for p in engine.module.parameters())


GRAD_SCALER = "ftdist_grad_scaler"


def _client_state(engine: Any) -> dict[str, Any]:
    """What DeepSpeed's checkpoint leaves out: the fp16 grad scaler of its ZeRO-0 torch_autocast mode
    (the only fp16 ftdist runs there). Without it a resumed run restarts at scale 65536 and skips steps
    finding its scale again."""
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    return {GRAD_SCALER: scaler.state_dict()} if scaler is not None else {}


def _restore_client_state(engine: Any, client: dict[str, Any]) -> None:
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    if scaler is not None and client.get(GRAD_SCALER):
        scaler.load_state_dict(client[GRAD_SCALER])


def saved_world_size(directory: str) -> int:
    """Ranks that wrote a checkpoint, from their RNG files (every rank writes one)."""
    return max(1, len(glob.glob(os.path.join(directory, "rng_rank*.pt"))))


def _to_universal(ds_dir: str, out_root: str) -> str:
    """DeepSpeed's ``ds_to_universal`` conversion of ``ds_dir``'s checkpoint into ``out_root``; in this
    process (no process pool inside a Ray worker), its progress output kept out of the run's log."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=os.path.join(ds_dir, DS_TAG), output_folder=os.path.join(out_root, DS_TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
    return out_root


def _load_universal(engine: Any, directory: str, kw: dict[str, Any]) -> None:
    """Load a universal checkpoint. DeepSpeed reads ``checkpoint.load_universal`` only inside
    ``load_checkpoint``, so it is switched on for this one load rather than for the engine's life."""
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        engine.load_checkpoint(directory, **kw)
    finally:
        config.load_universal_checkpoint = False


def _py_state_to_list(s: tuple[Any, ...]) -> list[Any]:
    return [s[0], list(s[1]), s[2]]


def _py_state_from_list(s: list[Any]) -> tuple[Any, ...]:
    return (s[0], tuple(s[1]), s[2])
