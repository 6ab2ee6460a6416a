"""The worker loop: what every training process runs, top to bottom, in one place.

``train_worker(cfg, session)`` is the whole recipe: set up (device, process group, tokenizer, data
readers, model, DeepSpeed engine), restore the latest checkpoint, train epoch by epoch (validation,
best tracking, early stopping, a checkpoint per epoch and optionally every N batches), then reload
the best checkpoint, evaluate it on the test split, and export it in HF format. The ``session``
is Ray Train's (``launcher``) or a local one (``session.LocalSession``), so the same loop runs in a
cluster, in local mode and in the benchmark harness.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ftdist import checkpoint as ckpt
from ftdist import run_folder as layout
from ftdist import selection
from ftdist import storage
from ftdist.config import RunConfig
from ftdist.uri import join_uri
from ftdist.data.collate import collate
from ftdist.data.manifest import Manifest, check_compatible, load_manifest, tokenizer_fingerprint
from ftdist.data.masking import EVAL_KEYS, Masker
from ftdist.data.reader import Resize, ShardReader, num_batches
from ftdist.data.replay import ReplayMix, replay_manifests
from ftdist.engine import (Precision, build_engine, deepspeed_config, engine_autocasts, follow_schedule,
                           init_distributed, memory_levers, optimizer_state_bytes, reapply_hyperparameters, release_optimizer_state,
                           rescheduled, resolve_precision)
from ftdist.freezing import apply_freeze
from ftdist.host_memory import return_freed_memory_to_os, saves_host_memory
from ftdist.l2sp import L2SP
from ftdist.lora import parameter_counts
from ftdist.diagnoses import check_loss_finite, check_losses_finite, non_finite_code
from ftdist.errors import UserError
from ftdist.evaluation import all_reduce_sum, evaluate_batches
from ftdist.metrics import (class_weights, mfu, peak_tflops,
                            per_class_metrics)
from ftdist.progress import Progress
from ftdist.session import Session
from ftdist.tracking import Tracker, open_tracker

log = logging.getLogger("ftdist")


@dataclass
class Setup:
    cfg: RunConfig
    session: Session
    device: torch.device
    precision: Precision
    tokenizer: Any
    manifests: dict[str, Manifest]
    num_labels: int | None
    label_names: list[str] | None
    n_params: int
    engine: Any
    train_reader: ShardReader | ReplayMix
    steps_per_epoch: int
    optimizer_steps: int = 0  # the whole run's, as planned for the LR schedule
    class_weights: torch.Tensor | None = None  # train.class_weights resolved: weighted cross-entropy
    grad_norm: torch.Tensor | None = None  # ZeRO-0: the last measured gradient norm, still on the device
    n_trainable: int = 0  # parameters the optimizer updates (all of them unless model.lora)
    masker: Masker | None = None  # model.task masked-lm: masks each collated batch
    l2sp: L2SP | None = None  # train.l2sp: the pull toward the run's starting weights
    rss_mb: dict[str, float] = field(default_factory=dict)  # this process's peak RSS at points of the run


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class Window:
    """The gradient-accumulation window a micro batch belongs to.

    Windows are counted from the start of each epoch, and an epoch's last window may be shorter
    than ``gradient_accumulation_steps``: it is stepped at the epoch end rather than carried into
    the next epoch, so every epoch (and every epoch checkpoint) ends on an optimizer step.
    """

    size: int  # micro batches in this window
    last: bool  # this micro batch closes the window: gradients are reduced and the optimizer steps


def accumulation_window(batch_index: int, steps_per_epoch: int, gas: int) -> Window:
    """The window of the epoch's ``batch_index``-th micro batch (0-based)."""
    start = batch_index - batch_index % gas
    end = min(start + gas, steps_per_epoch)
    return Window(end - start, batch_index + 1 == end)


def optimizer_steps_per_epoch(steps_per_epoch: int, gas: int) -> int:
    """One optimizer step per window, the epoch's last partial window included."""
    return math.ceil(steps_per_epoch / gas)


def optimizer_steps_left(epoch_batches: int, done: int, later_epoch_batches: int, later_epochs: int, gas: int) -> int:
    """Optimizer steps from batch ``done`` (an accumulation boundary) of an epoch of ``epoch_batches``
    batches to the end of the run, with ``later_epochs`` more epochs of ``later_epoch_batches``."""
    return math.ceil((epoch_batches - done) / gas) + later_epochs * optimizer_steps_per_epoch(later_epoch_batches, gas)


def mid_epoch_checkpoint_due(done: int, steps_per_epoch: int, gas: int, every: int | None) -> bool:
    """Whether to checkpoint after ``done`` batches of the epoch.

    Only on accumulation boundaries: a checkpoint inside a window would not hold the gradient
    accumulated so far, and the resumed run would step without it. Each multiple of ``every``
    is served by the first boundary at or after it; the epoch's end has its own checkpoint.
    """
    if not every or done >= steps_per_epoch or done % gas:
        return False
    return done // every > (done - gas) // every


def split_uri(cfg: RunConfig, split: str) -> str:
    return join_uri(cfg.data.path, split)


def pick_device(cfg: RunConfig, local_rank: int) -> torch.device:
    want = cfg.scaling.use_gpu
    if (want is True or want == "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def configure_host_allocator(cfg: RunConfig) -> bool:
    """Give freed host memory back to the OS promptly where the run asked to save memory (ZeRO-3 or
    an offload; ``ftdist.host_memory`` says why). True when the setting took."""
    ds = cfg.deepspeed
    return saves_host_memory(ds.zero_stage, ds.offload_optimizer, ds.offload_params) and return_freed_memory_to_os()


def start_worker(cfg: RunConfig, session: Session) -> tuple[torch.device, Precision, Any]:
    """What every worker loop does first (single- and multi-task): its device, the process group,
    seeds, the precision it can run, and the tokenizer."""
    from ftdist.modeling import load_tokenizer

    configure_host_allocator(cfg)
    device = pick_device(cfg, session.local_rank)
    init_distributed(device.type)
    seed_everything(cfg.run.seed + session.rank)
    precision = resolve_precision(cfg, device.type)
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code, cfg.model.revision,
                         cfg.storage)
    return device, precision, tok


@dataclass
class DataSetup:
    """The data side of a run: the splits' manifests (checked against the model and tokenizer), the
    labels they name, and this rank's training reader with the batches per epoch it plans."""

    manifests: dict[str, Manifest]
    num_labels: int | None
    label_names: list[str] | None
    train_reader: ShardReader | ReplayMix
    steps_per_epoch: int


@dataclass
class ModelSetup:
    """The model side of a run: the DeepSpeed engine (model, optimizer, LR schedule) and its sizes."""

    engine: Any
    n_params: int
    n_trainable: int
    l2sp: L2SP | None = None  # train.l2sp: the pull toward the weights the run started from


def setup_data(cfg: RunConfig, session: Session, tokenizer: Any) -> DataSetup:
    """Manifests of every split (compatible with the task and tokenizer) and the training reader."""
    manifests = {s: load_manifest(split_uri(cfg, s), cfg.storage) for s in ("train", "validation", "test")}
    num_labels = cfg.model.num_labels or manifests["train"].num_labels
    label_names = cfg.model.label_names or manifests["train"].label_names
    fp = tokenizer_fingerprint(tokenizer)
    for s, m in manifests.items():
        check_compatible(m, split_uri(cfg, s), cfg.model.task, num_labels, fp)
    train_reader: ShardReader | ReplayMix = split_reader(cfg, session, "train", manifests["train"], shuffle=True,
                                                         tokenizer=tokenizer)
    if cfg.data.replay is not None:
        replays = replay_manifests(cfg.data.replay, manifests["train"], cfg.model.task, num_labels, fp, cfg.storage)
        train_reader = ReplayMix(train_reader, [split_reader(cfg, session, "train", m, shuffle=True, tokenizer=tokenizer,
                                                             data_path=p) for p, m in zip(cfg.data.replay.paths, replays)],
                                 cfg.data.replay.fraction, cfg.run.seed)
    steps = capped_batches(cfg, train_reader.num_batches())
    return DataSetup(manifests, num_labels, label_names, train_reader, steps)


def setup_model(cfg: RunConfig, device: torch.device, precision: Precision, pad_token_id: int,
                num_labels: int | None, label_names: list[str] | None, optimizer_steps: int) -> ModelSetup:
    """The pre-trained model loaded (into ZeRO-3 partitions where configured) and wrapped by
    DeepSpeed with an LR schedule planned for ``optimizer_steps``. The benchmark harness builds its
    contender through this function too, so what it measures is what runs train."""
    from ftdist.modeling import load_model

    torch.manual_seed(cfg.run.seed)  # identical head initialisation on every rank
    partitioned = cfg.deepspeed.zero_stage == 3  # built straight into ZeRO-3 partitions (modeling.load_model)
    model = load_model(cfg.model, num_labels, label_names, pad_token_id, cfg.storage,
                       zero3_config=deepspeed_config(cfg, precision) if partitioned else None)
    if cfg.train.freeze:  # before DeepSpeed builds the optimizer: frozen weights get no gradient or Adam state
        apply_freeze(model, cfg.train.freeze)
    n_params, n_trainable = parameter_counts(model)
    if not partitioned:
        model.to(device)  # zero.Init already placed the partitions
    engine, _ = build_engine(cfg, model, optimizer_steps, precision)
    # w0 now: the weights of model.path, before _train restores any checkpoint (a resumed run keeps the stage's start).
    l2sp = L2SP(engine, cfg.train.l2sp, cfg.deepspeed.zero_stage) if cfg.train.l2sp else None
    engine.train()  # from_pretrained hands the model over in eval mode: dropout would stay off
    if cfg.train.compile:
        engine.compile()
    return ModelSetup(engine, n_params, n_trainable, l2sp)


def setup(cfg: RunConfig, session: Session) -> Setup:
    """A worker's whole run state: worker start, then data (it sizes the LR schedule), then model."""
    device, precision, tok = start_worker(cfg, session)
    rss_before_model = peak_rss_mb()  # libraries loaded, process group up: what the model adds comes next
    data = setup_data(cfg, session, tok)
    total = cfg.train.epochs * optimizer_steps_per_epoch(data.steps_per_epoch, cfg.train.gradient_accumulation_steps)
    model = setup_model(cfg, device, precision, tok.pad_token_id, data.num_labels, data.label_names, total)
    seed_everything(cfg.run.seed + session.rank)  # dropout and masking differ per rank from here on
    weights = class_weights(cfg.train.class_weights, data.manifests["train"].label_counts, data.num_labels or 0)
    return Setup(cfg, session, device, precision, tok, data.manifests, data.num_labels, data.label_names,
                 model.n_params, model.engine, data.train_reader, data.steps_per_epoch, total,
                 class_weights=torch.tensor(weights, dtype=torch.float32, device=device) if weights else None,
                 n_trainable=model.n_trainable, l2sp=model.l2sp,
                 masker=Masker(tok, cfg.train.mlm_probability, cfg.run.seed, cfg.model.path)
                 if cfg.model.task == "masked-lm" else None,
                 rss_mb={"before_model": rss_before_model})


def capped_batches(cfg: RunConfig, batches: int) -> int:
    """An epoch's batches under ``train.max_steps_per_epoch``."""
    return min(batches, cfg.train.max_steps_per_epoch) if cfg.train.max_steps_per_epoch else batches


def resume_on_another_size(s: Setup, state: ckpt.TrainState) -> str:
    """Re-plan a run restored on another number of workers than wrote its checkpoint.

    Data: the interrupted epoch's untrained samples are spread over the new ranks (``Resize``, see
    ``ftdist.data.reader``); the next epoch is planned on the new size. Optimizer steps: micro batch
    size and gradient accumulation stay as configured, so the global batch scales with the workers
    and the steps left change; the LR schedule continues from the LR it had and is fitted to the
    steps left (``engine.rescheduled``). Returns a line for the log."""
    cfg, old, new = s.cfg, state.world_size or 1, s.session.world_size
    gas = cfg.train.gradient_accumulation_steps
    # config (elastic min_workers) and preflight (a rerun on another size) refuse resizing a data.replay run:
    # its sources' positions are not re-planned. Not an assert: under python -O it would re-plan wrongly.
    if not isinstance(s.train_reader, ShardReader):
        raise UserError(f"data.replay: this run started on {old} worker(s) and resumes only on that many; "
                        f"set scaling.num_workers={old}")
    if state.schedule_total is None:  # a checkpoint from before resizing existed: the old size's plan
        old_steps = capped_batches(cfg, num_batches(s.train_reader.shard_rows, old, cfg.train.batch_size))
        state.schedule_total = cfg.train.epochs * optimizer_steps_per_epoch(old_steps, gas)
    if state.batch:
        state.resizes.append([old, state.batch])
    epoch_steps = capped_batches(cfg, s.train_reader.num_batches(_resizes(state)))
    remaining = optimizer_steps_left(epoch_steps, state.batch, s.steps_per_epoch, cfg.train.epochs - state.epoch - 1,
                                     gas)
    state.schedule_remap = rescheduled(state.schedule_remap, state.schedule_total, state.global_step, remaining)
    where = f"the rest of epoch {state.epoch + 1} re-planned" if state.batch else f"from epoch {state.epoch + 1}"
    return (f"checkpoint written by {old} worker(s), resumed on {new}: model and optimizer state re-partitioned, "
            f"{where}; {remaining} optimizer steps left, the LR schedule continues from its current value")


def _resizes(state: ckpt.TrainState) -> list[Resize]:
    return [Resize(w, b) for w, b in state.resizes]


def split_reader(cfg: RunConfig, session: Session, split: str, manifest: Manifest, shuffle: bool,
                 tokenizer: Any, data_path: str | None = None) -> ShardReader:
    """This rank's reader for ``split`` (of ``data_path``, default ``data.path``); the tokenizer is used
    only by raw-text data sets."""
    d = cfg.data
    return ShardReader(join_uri(data_path or d.path, split), cfg.storage, session.rank, session.world_size, cfg.train.batch_size,
                       cfg.run.seed, shuffle=shuffle, shuffle_buffer=d.shuffle_buffer, prefetch=d.prefetch_shards,
                       length_bucketing=d.length_bucketing and shuffle, manifest=manifest,
                       tokenizer=tokenizer, max_length=d.max_length)


def forward_autocast(s: Setup) -> contextlib.AbstractContextManager[Any]:
    """ftdist's autocast around a forward, unless precision is fp32, DeepSpeed's own bf16/fp16
    engine runs the model, or DeepSpeed autocasts the forward itself (fp16, see engine_autocasts)."""
    dtype = s.precision.autocast_dtype
    if dtype is None or s.cfg.deepspeed.mixed_precision != "torch_autocast" or engine_autocasts(s.cfg, s.precision):
        return contextlib.nullcontext()
    return torch.autocast(s.device.type, dtype=dtype)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "sample_id"}


def grad_norm_due(done: int, gas: int, log_every: int) -> bool:
    """Whether the optimizer step closing at ``done`` batches is the last one before a log line
    (log lines fall at multiples of ``log_every`` batches; this step's is the norm they report)."""
    return (done + gas - 1) // log_every > (done - 1) // log_every


def train_step(s: Setup, batch: dict[str, torch.Tensor], window: Window | None = None,
               measure_grad_norm: bool = False) -> torch.Tensor:
    """One micro batch: forward under autocast, backward, and DeepSpeed's step (which applies the
    optimizer at gradient-accumulation boundaries). Returns the loss detached and still on the
    device, so a step never waits for the device (the loop reads losses only when it logs). The
    benchmark harness (bench/throughput.py) times this same function.

    With ``window`` the loop, not DeepSpeed's micro-step counter, says where windows end (the
    counter neither restarts per epoch nor survives a checkpoint), and the loss is averaged over
    the window's own size, so a short last window weighs its micro batches fully.

    ``measure_grad_norm`` (ZeRO-0, where DeepSpeed's plain-optimizer path does not keep the norm):
    the gradients' total norm before clipping, left on the device in ``s.grad_norm``."""
    inputs = _to_device(batch, s.device)
    if window is not None:
        s.engine.set_gradient_accumulation_boundary(window.last)
    with forward_autocast(s):
        if s.class_weights is None:
            loss = s.engine(**inputs).loss
        else:  # the model's own loss is unweighted: compute the weighted one from its logits
            labels = inputs.pop("labels")
            loss = torch.nn.functional.cross_entropy(s.engine(**inputs).logits.float(), labels, weight=s.class_weights)
    if window is None:
        s.engine.backward(loss)
    else:
        s.engine.backward(loss / window.size, scale_wrt_gas=False)
    if measure_grad_norm and s.cfg.deepspeed.zero_stage == 0 and (window is None or window.last):
        s.grad_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in s.engine.module.parameters() if p.grad is not None])
    if s.l2sp is not None and (window is None or window.last):
        s.l2sp.pull()  # toward the run's starting weights, once per optimizer step, just before it
    s.engine.step()
    return loss.detach()


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    return all_reduce_sum(values, device)


def stop_if_any_rank_diverged(s: Setup, loss: float, step: int) -> None:
    """Raise LossDiverged on every rank together when any rank's loss so far is NaN/inf (one all-reduce
    of a code per rank, at each log line and before each mid-epoch checkpoint). A rank raising alone would leave
    the others blocked in their next collective, and one that carried on could checkpoint diverged
    weights (its own loss is still finite at the step where another rank's turned NaN)."""
    codes = [0.0] * s.session.world_size
    codes[s.session.rank] = non_finite_code(loss)
    check_losses_finite(_all_reduce(codes, s.device), step)


def _log(s: Setup, msg: str, clear: str = "") -> None:
    if s.session.rank == 0:
        # Not print(): Ray Train patches print() into its logger, which echoes each line twice.
        sys.stdout.write(f"{clear}[ftdist] {msg}\n")
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------


def evaluate(s: Setup, split: str, predictions: bool = False
             ) -> tuple[dict[str, float], list[tuple[int, int, list[float]]], list[list[int]] | None]:
    """Loss and task metrics over a whole split, summed across ranks (every rank runs the same
    number of batches, which ZeRO-3's parameter gathering needs), the predictions if asked, and
    the summed confusion matrix (classification; per-class figures, plots and diagnoses use it).
    The pass itself is :func:`ftdist.evaluation.evaluate_batches` (the pipeline's evaluation too)."""
    reader = split_reader(s.cfg, s.session, split, s.manifests[split], shuffle=False, tokenizer=s.tokenizer)
    s.engine.eval()
    try:
        # masked LM: the same tokens every pass (validation losses compare models, not draws)
        return evaluate_batches(lambda batch: s.engine(**batch), reader.batches(0), s.tokenizer.pad_token_id,
                                s.cfg.model.task, s.num_labels, s.device, masker=s.masker,
                                mask_key=(EVAL_KEYS[split], s.session.rank), predictions=predictions,
                                autocast=lambda: forward_autocast(s))
    finally:
        s.engine.train()


def _save_and_report(s: Setup, state: ckpt.TrainState, metrics: dict[str, Any]) -> None:
    name = ckpt.checkpoint_name(state)
    with tempfile.TemporaryDirectory(prefix="ftdist-ckpt-") as tmp:
        ckpt.save(s.engine, state, s.session.rank, tmp, s.cfg.data.record_sample_ids)
        s.session.report(metrics, tmp, name)


def train_worker(cfg: RunConfig, session: Session) -> dict[str, Any] | None:
    """Run (or resume) a training run in this worker process; rank 0 returns the result record."""
    s = setup(cfg, session)
    tracker = open_tracker(cfg, session.rank)
    try:
        return _train(s, tracker)
    except BaseException:
        tracker.close({}, failed=True)  # what was recorded up to a failure (a diverged loss) stays readable
        raise
    finally:
        teardown(s)


def _train(s: Setup, tracker: Tracker) -> dict[str, Any] | None:
    cfg, session, engine = s.cfg, s.session, s.engine
    state = ckpt.TrainState()
    with session.restore_dir() as restore:
        if restore:
            state = ckpt.load(engine, session.rank, restore, world_size=session.world_size)
            if state.world_size != session.world_size:
                _log(s, resume_on_another_size(s, state))
            if state.schedule_remap:  # resized at some point: the recorded plan, else this size's
                follow_schedule(engine, state.schedule_total or s.optimizer_steps, cfg, state.schedule_remap)
            reapply_hyperparameters(engine, cfg)  # a PBT trial continues another trial's state with its own LR
            _log(s, f"resumed from checkpoint at epoch {state.epoch + 1}, batch {state.batch} (step {state.global_step}) "
                    f"at lr {engine.get_lr()[0]:.9e}")
    state.world_size = session.world_size
    if state.schedule_total is None:
        state.schedule_total = s.optimizer_steps
    mode, metric = cfg.eval_mode, cfg.eval_metric
    peak = peak_tflops(cfg.train.peak_tflops, s.device.type)
    first_step_at: float | None = None
    throughput: dict[str, Any] = {}
    S, gas = s.steps_per_epoch, cfg.train.gradient_accumulation_steps
    _log(s, f"{session.world_size} worker(s) on {s.device.type}, {s.precision.name}, ZeRO-{cfg.deepspeed.zero_stage}; "
            f"{s.manifests['train'].num_rows} training rows, {S} batches/epoch of <= {cfg.train.batch_size} per worker")
    if isinstance(s.train_reader, ReplayMix) and cfg.data.replay is not None:
        mix, rp = s.train_reader, cfg.data.replay
        _log(s, f"replay: {sum(mix.counts)} of the {mix.num_batches()} batches/epoch from {', '.join(rp.paths)} "
                f"({', '.join(map(str, mix.counts))}; data.replay.fraction {rp.fraction})")
    progress = Progress(cfg.train.epochs, S, live=None if session.rank == 0 else False)
    log_every = cfg.train.log_every_steps
    tracked = cfg.tracking.tensorboard or cfg.tracking.mlflow is not None  # the gradient norm is for trackers
    while state.epoch < cfg.train.epochs and not state.stopped_early:
        epoch = state.epoch
        t0, samples, tokens, n_loss = time.perf_counter(), 0.0, 0.0, 0
        progress.start()
        loss_acc = torch.zeros((), dtype=torch.float64, device=s.device)  # summed on the device: no sync per step
        carried = state.epoch_totals if state.batch and state.epoch_totals else [0.0] * 5  # before a resume
        resizes = _resizes(state)  # an epoch begun on another number of workers (resume_on_another_size)
        reader = s.train_reader
        if resizes and isinstance(reader, ShardReader):  # (never a replay mix: preflight refuses that resize)
            S = capped_batches(cfg, reader.num_batches(resizes))
            epoch_batches = reader.batches(epoch, start_batch=state.batch, max_batches=S, resizes=resizes)
        else:
            S = s.steps_per_epoch
            epoch_batches = reader.batches(epoch, start_batch=state.batch, max_batches=S)
        for rows in epoch_batches:
            # Pinned host memory lets the non_blocking copy in _to_device overlap with compute on a GPU.
            batch = collate(rows, s.tokenizer.pad_token_id, cfg.model.task, pin_memory=s.device.type == "cuda")
            if s.masker is not None:  # seeded by position: a resumed epoch masks as the uninterrupted one would
                batch = s.masker(batch, (epoch, session.rank, state.batch))
            window = accumulation_window(state.batch, S, gas)
            loss = train_step(s, batch, window, tracked and window.last and grad_norm_due(state.batch + 1, gas, log_every))
            if first_step_at is None:
                first_step_at = time.time()
            state.batch += 1
            progress.batch_done(epoch, state.batch)
            state.global_step = engine.global_steps
            samples += len(rows)
            tokens += float(batch["attention_mask"].sum())
            loss_acc += loss
            n_loss += 1
            if cfg.data.record_sample_ids:
                state.samples.setdefault(str(epoch), []).extend(batch["sample_id"].tolist())
            if state.batch % log_every == 0:
                lr = engine.get_lr()[0]
                mean_loss, elapsed = loss_acc.item() / n_loss, time.perf_counter() - t0  # the log line's one sync
                stop_if_any_rank_diverged(s, mean_loss, state.global_step)
                rate = session.world_size / elapsed  # rank 0's share times the ranks: an estimate between epochs
                _log(s, f"epoch {epoch + 1}/{cfg.train.epochs} batch {state.batch}/{S} loss {mean_loss:.4f} "
                        f"lr {lr:.2e} {samples * rate:.1f} samples/s | {progress.text(epoch, state.batch)}",
                     progress.line_prefix())
                state.train_log.append([state.global_step, mean_loss])
                tracker.log_step(state.global_step, step_scalars(s, mean_loss, lr, samples * rate, tokens * rate, peak))
            if mid_epoch_checkpoint_due(state.batch, S, gas, cfg.train.checkpoint_every_steps):
                # Mid-epoch checkpoints carry the worst possible score so that retention by validation
                # metric never evicts an epoch checkpoint for them (Ray always keeps the latest anyway).
                worst = -1e30 if mode == "max" else 1e30
                mean_loss = loss_acc.item() / max(n_loss, 1)
                stop_if_any_rank_diverged(s, mean_loss, state.global_step)  # never a checkpoint of diverged weights
                so_far = _all_reduce([loss_acc.item(), n_loss, samples, tokens], s.device)
                state.epoch_totals = [c + v for c, v in zip(carried, so_far + [time.perf_counter() - t0], strict=True)]
                _save_and_report(s, state, {"epoch": epoch + state.batch / S, "step": state.global_step,
                                            "train_loss": state.epoch_totals[0] / max(state.epoch_totals[1], 1),
                                            f"val_{metric}": worst, "mid_epoch": True})
        loss_sum = loss_acc.item()  # waits for the device, so train_time covers every step
        train_time = time.perf_counter() - t0
        g_samples, g_tokens, g_loss, g_n = _all_reduce([samples, tokens, loss_sum, n_loss], s.device)
        g_loss, g_n, g_samples, g_tokens = (g_loss + carried[0], g_n + carried[1], g_samples + carried[2],
                                            g_tokens + carried[3])
        train_time += carried[4]
        check_loss_finite(g_loss / max(g_n, 1), engine.global_steps)
        throughput = {"samples_per_s": g_samples / train_time, "tokens_per_s": g_tokens / train_time,
                      "mfu": mfu(s.n_params, g_tokens / train_time, session.world_size, peak)}
        t_val = time.perf_counter()
        val, _, val_confusion = evaluate(s, "validation")
        progress.eval_done(time.perf_counter() - t_val)
        value = val[metric]
        state.epoch, state.batch, state.resizes, state.epoch_totals = epoch + 1, 0, [], []
        patience = cfg.train.early_stopping_patience
        improved = selection.end_of_epoch(state, value, mode, cfg.train.early_stopping_min_delta, patience,
                                          cfg.train.epochs)
        record = {"epoch": epoch + 1, "step": state.global_step, "train_loss": g_loss / max(g_n, 1),
                  **{f"val_{k}": v for k, v in val.items()}, **throughput, "train_time_s": train_time,
                  "lr": engine.get_lr()[0]}
        state.history.append(record)
        if val_confusion is not None:
            state.val_confusions[str(epoch + 1)] = val_confusion
        tracker.log_epoch(state.global_step, {"epoch/train_loss": record["train_loss"],
                                              **{f"val/{k}": v for k, v in val.items()},
                                              **{f"epoch/{k}": v for k, v in throughput.items() if v is not None}})
        timing = progress.text(epoch + 1, 0) if epoch + 1 < cfg.train.epochs else f"elapsed {progress.elapsed()}"
        _log(s, "epoch {} done: ".format(epoch + 1) + ", ".join(
            f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)) + (" (best)" if improved else "")
            + f" | {timing}", progress.line_prefix())
        if state.stopped_early:
            _log(s, f"early stopping: val_{metric} did not improve for {patience} epoch(s)")
        _save_and_report(s, state, {**record, "first_step_time": first_step_at or 0.0,
                                    "best_" + metric: state.best_metric, "should_checkpoint": True,
                                    "stopped_early": state.stopped_early})
    s.rss_mb["after_training"] = peak_rss_mb()  # before the test pass and the export (which gathers weights)
    return _finish(s, state, throughput, first_step_at, tracker)


def step_scalars(s: Setup, loss: float, lr: float, samples_per_s: float, tokens_per_s: float,
                 peak: float | None) -> dict[str, float]:
    """A log line's TensorBoard/MLflow scalars; the gradient norm and MFU where they are known."""
    out = {"train/loss": loss, "train/lr": lr, "train/samples_per_s": samples_per_s, "train/tokens_per_s": tokens_per_s}
    norm = s.engine.get_global_grad_norm() if s.cfg.deepspeed.zero_stage else s.grad_norm
    if norm is not None:
        out["train/grad_norm"] = float(norm)
    u = mfu(s.n_params, tokens_per_s, s.session.world_size, peak)
    if u is not None:
        out["train/mfu"] = u
    return out


def _finish(s: Setup, state: ckpt.TrainState, throughput: dict[str, Any], first_step_at: float | None,
            tracker: Tracker) -> dict[str, Any] | None:
    """Reload the best checkpoint if it is not the current weights, test it, export it."""
    cfg, session = s.cfg, s.session
    current = ckpt.checkpoint_name(state)
    if state.best_checkpoint and state.best_checkpoint != current:
        with tempfile.TemporaryDirectory(prefix="ftdist-best-") as tmp:
            session.fetch_checkpoint(state.best_checkpoint, tmp)
            ckpt.load(s.engine, session.rank, tmp, module_only=True)
        _log(s, f"reloaded best checkpoint {state.best_checkpoint} (epoch {state.best_epoch})")
    test, preds, test_confusion = evaluate(s, "test", predictions=True)
    _log(s, "test: " + ", ".join(f"{k} {v:.4g}" for k, v in test.items()))
    from ftdist.export import export_model

    opt_bytes = _all_reduce([float(optimizer_state_bytes(s.engine))], s.device)[0]  # ZeRO: each rank holds a part
    release_optimizer_state(s.engine)  # the last checkpoint holds it: room for the export's gathered weights
    model_uri = join_uri(cfg.run_uri(), layout.MODEL)
    export_model(s.engine, cfg, s.tokenizer, model_uri, session.rank,
                 extra={"best_epoch": state.best_epoch, "test": test, "label_names": s.label_names,
                        "max_length": s.manifests["train"].max_length or cfg.data.max_length})
    node_ids: list[Any] = [session.node_id()]
    rss: list[Any] = [s.rss_mb]
    if dist.is_initialized() and dist.get_world_size() > 1:
        node_ids = [None] * dist.get_world_size()
        dist.all_gather_object(node_ids, session.node_id())
        rss = [None] * dist.get_world_size()
        dist.all_gather_object(rss, s.rss_mb)
    if session.rank != 0:
        return None
    result = {
        "epochs": state.history, "best_epoch": state.best_epoch, "best_metric": state.best_metric,
        "eval_metric": cfg.eval_metric, "eval_mode": cfg.eval_mode, "stopped_early": state.stopped_early,
        "test": test, "throughput": throughput or (state.history[-1] if state.history else {}),
        "first_step_time": first_step_at, "global_step": state.global_step, "world_size": session.world_size,
        "node_ids": node_ids, "device": s.device.type, "precision": s.precision.name, "n_params": s.n_params,
        "trainable_params": s.n_trainable, "optimizer_state_bytes": int(opt_bytes), "memory": {**memory_levers(s.engine), "rss_mb": rss},
        "model_uri": model_uri, "best_checkpoint": state.best_checkpoint,
        "label_names": s.label_names, "train_log": state.train_log,
    }
    if test_confusion is not None:
        val_confusion = state.val_confusions.get(str(state.best_epoch))
        result.update(test_confusion=test_confusion, test_per_class=per_class_metrics(test_confusion, s.label_names),
                      val_confusion=val_confusion,
                      val_per_class=per_class_metrics(val_confusion, s.label_names) if val_confusion else None)
    tracker.close({f"best/val_{cfg.eval_metric}": state.best_metric or 0.0, **{f"test/{k}": v for k, v in test.items()}})
    storage.write_text(join_uri(cfg.run_uri(), layout.RESULT), json.dumps(result, indent=1), cfg.storage)
    if preds:
        storage.write_text(join_uri(cfg.run_uri(), layout.PREDICTIONS),
                           "".join(json.dumps({"sample_id": i, "prediction": p, "scores": sc}) + "\n"
                                   for i, p, sc in preds), cfg.storage)
    return result


def teardown(s: Setup) -> None:
    """Free the engine before the process exits: without this ZeRO-3 aborted at exit in ~1/3 of runs."""
    with contextlib.suppress(Exception):
        s.engine.destroy()
    s.engine = None
    gc.collect()
