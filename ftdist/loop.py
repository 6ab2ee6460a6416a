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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ftdist import checkpoint as ckpt
from ftdist import run_folder as layout
from ftdist import selection
from ftdist import storage
from ftdist.config import RunConfig, join_uri
from ftdist.data.collate import collate
from ftdist.data.manifest import Manifest, check_compatible, load_manifest, tokenizer_fingerprint
from ftdist.data.masking import EVAL_KEYS, Masker, masked_tokens
from ftdist.data.reader import ShardReader
from ftdist.inference import class_scores
from ftdist.engine import (Precision, build_engine, deepspeed_config, engine_autocasts, init_distributed,
                           memory_levers, optimizer_state_bytes, reapply_hyperparameters, resolve_precision)
from ftdist.lora import parameter_counts
from ftdist.diagnoses import check_loss_finite
from ftdist.metrics import (causal_lm_metrics, class_weights, classification_metrics, mfu, peak_tflops,
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
    train_reader: ShardReader
    steps_per_epoch: int
    optimizer_steps: int = 0  # the whole run's, as planned for the LR schedule
    class_weights: torch.Tensor | None = None  # train.class_weights resolved: weighted cross-entropy
    grad_norm: torch.Tensor | None = None  # ZeRO-0: the last measured gradient norm, still on the device
    n_trainable: int = 0  # parameters the optimizer updates (all of them unless model.lora)
    masker: Masker | None = None  # model.task masked-lm: masks each collated batch


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


def start_worker(cfg: RunConfig, session: Session) -> tuple[torch.device, Precision, Any]:
    """What every worker loop does first (single- and multi-task): its device, the process group,
    seeds, the precision it can run, and the tokenizer."""
    from ftdist.modeling import load_tokenizer

    device = pick_device(cfg, session.local_rank)
    init_distributed(device.type)
    seed_everything(cfg.run.seed + session.rank)
    precision = resolve_precision(cfg, device.type)
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code, cfg.model.revision,
                         cfg.storage)
    return device, precision, tok


def setup(cfg: RunConfig, session: Session) -> Setup:
    from ftdist.modeling import load_model

    device, precision, tok = start_worker(cfg, session)
    manifests = {s: load_manifest(split_uri(cfg, s), cfg.storage) for s in ("train", "validation", "test")}
    num_labels = cfg.model.num_labels or manifests["train"].num_labels
    label_names = cfg.model.label_names or manifests["train"].label_names
    fp = tokenizer_fingerprint(tok)
    for s, m in manifests.items():
        check_compatible(m, split_uri(cfg, s), cfg.model.task, num_labels, fp)
    torch.manual_seed(cfg.run.seed)  # identical head initialisation on every rank
    partitioned = cfg.deepspeed.zero_stage == 3  # built straight into ZeRO-3 partitions (modeling.load_model)
    model = load_model(cfg.model, num_labels, label_names, tok.pad_token_id, cfg.storage,
                       zero3_config=deepspeed_config(cfg, precision) if partitioned else None)
    n_params, n_trainable = parameter_counts(model)
    seed_everything(cfg.run.seed + session.rank)
    train_reader = _reader(cfg, session, "train", manifests["train"], shuffle=True, tokenizer=tok)
    steps = train_reader.num_batches()
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    total = cfg.train.epochs * optimizer_steps_per_epoch(steps, cfg.train.gradient_accumulation_steps)
    if not partitioned:
        model.to(device)  # zero.Init already placed the partitions
    engine, _ = build_engine(cfg, model, total, precision)
    engine.train()  # from_pretrained hands the model over in eval mode: dropout would stay off
    if cfg.train.compile:
        engine.compile()
    weights = class_weights(cfg.train.class_weights, manifests["train"].label_counts, num_labels or 0)
    return Setup(cfg, session, device, precision, tok, manifests, num_labels, label_names, n_params, engine,
                 train_reader, steps, total,
                 class_weights=torch.tensor(weights, dtype=torch.float32, device=device) if weights else None,
                 n_trainable=n_trainable,
                 masker=Masker(tok, cfg.train.mlm_probability, cfg.run.seed, cfg.model.path)
                 if cfg.model.task == "masked-lm" else None)


def _reader(cfg: RunConfig, session: Session, split: str, manifest: Manifest, shuffle: bool,
            tokenizer: Any) -> ShardReader:
    """This rank's reader for ``split``; the tokenizer is used only by raw-text data sets."""
    d = cfg.data
    return ShardReader(split_uri(cfg, split), cfg.storage, session.rank, session.world_size, cfg.train.batch_size,
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
    s.engine.step()
    return loss.detach()


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


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
    the summed confusion matrix (classification; per-class figures, plots and diagnoses use it)."""
    reader = _reader(s.cfg, s.session, split, s.manifests[split], shuffle=False, tokenizer=s.tokenizer)
    engine, task = s.engine, s.cfg.model.task
    k = s.num_labels or 1
    confusion = torch.zeros(k, k, dtype=torch.long)
    loss_sum, count = 0.0, 0.0
    preds: list[tuple[int, int, list[float]]] = []
    engine.eval()
    with torch.no_grad():
        for i, rows in enumerate(reader.batches(0)):
            batch = collate(rows, s.tokenizer.pad_token_id, task, pin_memory=s.device.type == "cuda")
            if s.masker is not None:  # the same tokens every pass: validation losses compare models, not draws
                batch = s.masker(batch, (EVAL_KEYS[split], s.session.rank, i))
            with forward_autocast(s):
                out = engine(**_to_device(batch, s.device))
            if task == "sequence-classification":
                pred = out.logits.argmax(-1).cpu()
                labels = batch["labels"]
                confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
                loss_sum += out.loss.item() * len(rows)
                if predictions:
                    preds.extend(zip(batch["sample_id"].tolist(), pred.tolist(), class_scores(out.logits)))
            else:
                n_tok = masked_tokens(batch["labels"] if task == "masked-lm" else batch["labels"][:, 1:])
                loss_sum += out.loss.item() * n_tok
                count += n_tok
    engine.train()
    if task == "sequence-classification":
        totals = _all_reduce([loss_sum] + confusion.flatten().tolist(), s.device)
        summed = torch.tensor(totals[1:]).reshape(k, k)
        metrics = classification_metrics(totals[0], summed)
    else:
        loss_sum, count = _all_reduce([loss_sum, count], s.device)
        metrics = causal_lm_metrics(loss_sum, count)
    if predictions and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, preds)
        preds = [p for part in gathered for p in part]
    matrix = summed.round().long().tolist() if task == "sequence-classification" else None
    return metrics, sorted(preds), matrix


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
        _teardown(s)


def _train(s: Setup, tracker: Tracker) -> dict[str, Any] | None:
    cfg, session, engine = s.cfg, s.session, s.engine
    state = ckpt.TrainState()
    with session.restore_dir() as restore:
        if restore:
            state = ckpt.load(engine, session.rank, restore)
            reapply_hyperparameters(engine, cfg)  # a PBT trial continues another trial's state with its own LR
            _log(s, f"resumed from checkpoint at epoch {state.epoch + 1}, batch {state.batch} (step {state.global_step})")
    mode, metric = cfg.eval_mode, cfg.eval_metric
    peak = peak_tflops(cfg.train.peak_tflops, s.device.type)
    first_step_at: float | None = None
    throughput: dict[str, Any] = {}
    S, gas = s.steps_per_epoch, cfg.train.gradient_accumulation_steps
    _log(s, f"{session.world_size} worker(s) on {s.device.type}, {s.precision.name}, ZeRO-{cfg.deepspeed.zero_stage}; "
            f"{s.manifests['train'].num_rows} training rows, {S} batches/epoch of <= {cfg.train.batch_size} per worker")
    progress = Progress(cfg.train.epochs, S, live=None if session.rank == 0 else False)
    log_every = cfg.train.log_every_steps
    tracked = cfg.tracking.tensorboard or cfg.tracking.mlflow is not None  # the gradient norm is for trackers
    while state.epoch < cfg.train.epochs and not state.stopped_early:
        epoch = state.epoch
        t0, samples, tokens, n_loss = time.perf_counter(), 0.0, 0.0, 0
        progress.start()
        loss_acc = torch.zeros((), dtype=torch.float64, device=s.device)  # summed on the device: no sync per step
        for rows in s.train_reader.batches(epoch, start_batch=state.batch, max_batches=S):
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
                check_loss_finite(mean_loss, state.global_step)
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
                _save_and_report(s, state, {"epoch": epoch + state.batch / S, "step": state.global_step,
                                            "train_loss": loss_acc.item() / max(n_loss, 1), f"val_{metric}": worst,
                                            "mid_epoch": True})
        loss_sum = loss_acc.item()  # waits for the device, so train_time covers every step
        train_time = time.perf_counter() - t0
        g_samples, g_tokens, g_loss, g_n = _all_reduce([samples, tokens, loss_sum, n_loss], s.device)
        check_loss_finite(g_loss / max(g_n, 1), engine.global_steps)
        throughput = {"samples_per_s": g_samples / train_time, "tokens_per_s": g_tokens / train_time,
                      "mfu": mfu(s.n_params, g_tokens / train_time, session.world_size, peak)}
        t_val = time.perf_counter()
        val, _, val_confusion = evaluate(s, "validation")
        progress.eval_done(time.perf_counter() - t_val)
        value = val[metric]
        state.epoch, state.batch = epoch + 1, 0
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

    model_uri = join_uri(cfg.run_uri(), layout.MODEL)
    export_model(s.engine, cfg, s.tokenizer, model_uri, session.rank,
                 extra={"best_epoch": state.best_epoch, "test": test, "label_names": s.label_names,
                        "max_length": s.manifests["train"].max_length or cfg.data.max_length})
    opt_bytes = _all_reduce([float(optimizer_state_bytes(s.engine))], s.device)[0]  # ZeRO: each rank holds a part
    node_ids: list[Any] = [session.node_id()]
    if dist.is_initialized() and dist.get_world_size() > 1:
        node_ids = [None] * dist.get_world_size()
        dist.all_gather_object(node_ids, session.node_id())
    if session.rank != 0:
        return None
    result = {
        "epochs": state.history, "best_epoch": state.best_epoch, "best_metric": state.best_metric,
        "eval_metric": cfg.eval_metric, "eval_mode": cfg.eval_mode, "stopped_early": state.stopped_early,
        "test": test, "throughput": throughput or (state.history[-1] if state.history else {}),
        "first_step_time": first_step_at, "global_step": state.global_step, "world_size": session.world_size,
        "node_ids": node_ids, "device": s.device.type, "precision": s.precision.name, "n_params": s.n_params,
        "trainable_params": s.n_trainable, "optimizer_state_bytes": int(opt_bytes), "memory": memory_levers(s.engine),
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


def _teardown(s: Setup) -> None:
    """Free the engine before the process exits: without this ZeRO-3 aborted at exit in ~1/3 of runs."""
    with contextlib.suppress(Exception):
        s.engine.destroy()
    s.engine = None
    gc.collect()
