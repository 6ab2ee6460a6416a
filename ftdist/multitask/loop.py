"""The worker loop of a multi-task run: ``ftdist.loop``'s recipe with one head per task.

Same shape, checkpoints, reports and resume as the single-task loop (``ftdist.loop.train_worker``),
and the same building blocks (``train_step``, ``evaluate``, the accumulation windows): each task is
a *view* of the shared ``Setup`` (its config, manifests, labels and reader), and the model's
``active_task`` says which head a batch goes through. What differs:

- an epoch is the task schedule of ``ftdist.multitask.sampling``; every task reads its own stream
  of passes from its cursor, and the cursors are saved in every checkpoint (``TrainState.tasks``);
- validation runs per task; the combined metric (mean over tasks) is ``val_<metric>``, so best
  checkpoint, early stopping, Ray's checkpoint retention and sweeps use it unchanged (a regression
  task, which has no accuracy, enters the mean with the metric of its own that points the same way:
  ``combined``);
- the test split and the export run per task (``ftdist.multitask.export``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import sys
import tempfile
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ftdist import checkpoint as ckpt
from ftdist import run_folder as layout
from ftdist import selection, storage
from ftdist.config import TASK_METRICS, RunConfig, TaskSpec
from ftdist.uri import join_uri
from ftdist.data.collate import collate
from ftdist.data.manifest import check_compatible, load_manifest, tokenizer_fingerprint
from ftdist.data.reader import ShardReader
from ftdist.data.replay import ReplayMix
from ftdist.diagnoses import check_loss_finite
from ftdist.engine import build_engine, reapply_hyperparameters
from ftdist.lora import parameter_counts
from ftdist.loop import (Setup, accumulation_window, evaluate, forward_autocast, mid_epoch_checkpoint_due,
                         optimizer_steps_per_epoch, seed_everything, split_uri, start_worker,
                         stop_if_any_rank_diverged, train_step)
from ftdist.metrics import mfu, peak_tflops, per_class_metrics, regression_metrics
from ftdist.multitask import sampling
from ftdist.multitask.model import MultiTaskModel
from ftdist.multitask.spec import task_views
from ftdist.session import Session
from ftdist.tracking import Tracker, open_tracker

TASK = "sequence-classification"
REGRESSION_OUTPUT = "score"  # the id2label name of a regression head's one output


@dataclass
class Task:
    spec: TaskSpec
    view: Setup  # the shared Setup seen as a single-task run on this task (config, manifests, labels, reader)
    batches: int  # batches per pass over this task's training split (same on every rank)

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class MultiSetup:
    s: Setup  # the shared parts; s.steps_per_epoch is the multi-task epoch length
    tasks: list[Task]

    def schedule(self, epoch: int) -> list[int]:
        c = self.s.cfg.multitask
        full = sampling.epoch_schedule([t.batches for t in self.tasks], c.sampling, c.temperature,
                                       self.s.cfg.run.seed, epoch)
        return full[:self.s.steps_per_epoch]

    def cursors(self, epoch: int, done: int) -> dict[str, int]:
        c = self.s.cfg.multitask
        cur = sampling.cursors([t.batches for t in self.tasks], c.sampling, c.temperature, self.schedule(epoch),
                               epoch, done)
        return {t.name: n for t, n in zip(self.tasks, cur)}


def setup(cfg: RunConfig, session: Session) -> MultiSetup:
    from ftdist.modeling import load_model

    device, precision, tok = start_worker(cfg, session)
    fp = tokenizer_fingerprint(tok)
    views, models = [], {}
    torch.manual_seed(cfg.run.seed)  # identical heads on every rank
    for spec, vcfg in task_views(cfg):
        manifests = {sp: load_manifest(split_uri(vcfg, sp), cfg.storage) for sp in ("train", "validation", "test")}
        names = spec.label_names or manifests["train"].label_names or []
        if spec.type == "regression":
            # one output: HF's regression head (num_labels 1: HF sets problem_type regression, MSE loss)
            names = [REGRESSION_OUTPUT]
        for sp, m in manifests.items():
            check_compatible(m, split_uri(vcfg, sp), spec.type, len(names), fp)
        plain = vcfg.model.model_copy(update={"lora": None})  # the adapters go into the shared encoder below
        models[spec.name] = load_model(plain, len(names), names, tok.pad_token_id, cfg.storage)
        views.append((spec, vcfg, manifests, names))
    model = MultiTaskModel(models, {spec.name: spec.loss_weight for spec, *_ in views})
    if cfg.model.lora is not None:
        model.adapt_encoder(cfg.model.lora, cfg.model.path, cfg.model.gradient_checkpointing)
    n_params, n_trainable = parameter_counts(model)
    seed_everything(cfg.run.seed + session.rank)
    readers = [task_reader(vcfg, session, "train", manifests, tok) for _, vcfg, manifests, _ in views]
    per_pass = [r.num_batches() for r in readers]
    steps = sum(per_pass)
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    total = cfg.train.epochs * optimizer_steps_per_epoch(steps, cfg.train.gradient_accumulation_steps)
    model.to(device)
    engine, _ = build_engine(cfg, model, total, precision)
    engine.train()
    _, _, m0, names0 = views[0]
    s = Setup(cfg=cfg, session=session, device=device, precision=precision, tokenizer=tok, manifests=m0,
              num_labels=len(names0), label_names=names0, n_params=n_params, engine=engine, train_reader=readers[0],
              steps_per_epoch=steps, optimizer_steps=total, n_trainable=n_trainable)
    tasks = [Task(spec, dataclasses.replace(s, cfg=vcfg, manifests=manifests, num_labels=len(names),
                                            label_names=names, train_reader=reader), n)
             for (spec, vcfg, manifests, names), reader, n in zip(views, readers, per_pass)]
    return MultiSetup(s, tasks)


def task_reader(vcfg: RunConfig, session: Session, split: str, manifests: dict[str, Any], tok: Any) -> ShardReader:
    d = vcfg.data
    shuffle = split == "train"
    return ShardReader(split_uri(vcfg, split), vcfg.storage, session.rank, session.world_size, vcfg.train.batch_size,
                       vcfg.run.seed, shuffle=shuffle, shuffle_buffer=d.shuffle_buffer, prefetch=d.prefetch_shards,
                       length_bucketing=d.length_bucketing and shuffle, manifest=manifests[split], tokenizer=tok,
                       max_length=d.max_length)


def task_stream(reader: ShardReader | ReplayMix, cursor: int, per_pass: int) -> Generator[list[dict[str, Any]], None, None]:
    """A task's batches from stream position ``cursor`` on, pass after pass (reader epoch = pass)."""
    p, b = sampling.reader_position(cursor, per_pass)
    while True:
        yield from reader.batches(p, start_batch=b)
        p, b = p + 1, 0


def log(s: Setup, msg: str) -> None:
    if s.session.rank == 0:
        sys.stdout.write(f"[ftdist] {msg}\n")
        sys.stdout.flush()


def mean_loss(totals: list[float], n_tasks: int) -> float:
    """The mean training loss over every task's batches, from totals laid out as
    [each task's loss sum..., each task's batch count..., ...]."""
    return sum(totals[:n_tasks]) / max(sum(totals[n_tasks:2 * n_tasks]), 1)


def all_reduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def save_and_report(s: Setup, state: ckpt.TrainState, metrics: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="ftdist-ckpt-") as tmp:
        ckpt.save(s.engine, state, s.session.rank, tmp, s.cfg.data.record_sample_ids)
        s.session.report(metrics, tmp, ckpt.checkpoint_name(state))


def evaluate_tasks(ms: MultiSetup, split: str, predictions: bool = False) -> dict[str, Any]:
    """Per task: metrics, (predictions) and confusion matrix (classification) on ``split``."""
    out = {}
    for t in ms.tasks:
        ms.s.engine.module.active_task = t.name
        out[t.name] = evaluate_regression(t.view, split, predictions) if t.spec.type == "regression" \
            else evaluate(t.view, split, predictions)
    return out


def evaluate_regression(s: Setup, split: str, predictions: bool = False
                        ) -> tuple[dict[str, float], list[tuple[int, float, list[float]]], None]:
    """A regression task's loss (MSE), rmse and Pearson's r over a whole split, summed across ranks
    (every rank runs the same number of batches, as ``ftdist.loop.evaluate``), and its predictions."""
    reader = task_reader(s.cfg, s.session, split, s.manifests, s.tokenizer)
    sums = torch.zeros(7, dtype=torch.float64)
    preds: list[tuple[int, float, list[float]]] = []
    s.engine.eval()
    with torch.no_grad():
        for rows in reader.batches(0):
            batch = collate(rows, s.tokenizer.pad_token_id, "regression", pin_memory=s.device.type == "cuda")
            with forward_autocast(s):
                out = s.engine(**{k: v.to(s.device) for k, v in batch.items() if k != "sample_id"})
            p = out.logits.detach().float().reshape(-1).cpu().double()
            y = batch["labels"].double()
            sums += torch.stack([torch.tensor(float(len(rows)), dtype=torch.float64), ((p - y) ** 2).sum(), y.sum(),
                                 p.sum(), (y * y).sum(), (p * p).sum(), (p * y).sum()])
            if predictions:
                preds.extend((i, v, [v]) for i, v in zip(batch["sample_id"].tolist(), p.tolist()))
    s.engine.train()
    metrics = regression_metrics(all_reduce(sums.tolist(), s.device))
    if predictions and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, preds)
        preds = [p for part in gathered for p in part]
    return metrics, sorted(preds), None


def combined(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """The combined metrics: the mean over tasks of each classification metric (``loss``, ``accuracy``,
    ``macro_f1``). A regression task has no accuracy: it enters each mean with its own metric that
    points the same way, its loss (MSE) for ``loss`` (lower is better) and its Pearson r for the
    higher-is-better ones (r <= 1 like accuracy, 0 for a constant predictor)."""
    return {k: sum(task_score(m, k) for m in per_task.values()) / len(per_task) for k in TASK_METRICS[TASK]}


def task_score(metrics: dict[str, float], key: str) -> float:
    """A task's value of combined metric ``key`` (see ``combined``)."""
    if key in metrics:
        return metrics[key]
    return metrics["loss" if TASK_METRICS[TASK][key] == "min" else "pearson"]


def board_key(key: str) -> str:
    """An epoch record's key as a TensorBoard tag: val_accuracy -> val/accuracy (the mean over tasks),
    sentiment/val_accuracy -> val/sentiment/accuracy, sentiment/train_loss -> epoch/sentiment/train_loss."""
    task, _, name = key.rpartition("/")
    if name.startswith("val_"):
        return "/".join(["val", *([task] if task else []), name[4:]])
    return f"epoch/{key}"


def train_worker(cfg: RunConfig, session: Session) -> dict[str, Any] | None:
    ms = setup(cfg, session)
    tracker = open_tracker(cfg, session.rank)
    try:
        return _train(ms, tracker)
    except BaseException:
        tracker.close({}, failed=True)  # as the single-task loop: the tracked run ends marked failed
        raise
    finally:
        with contextlib.suppress(Exception):
            ms.s.engine.destroy()
        ms.s.engine = None
        for t in ms.tasks:
            t.view.engine = None
        gc.collect()


def _train(ms: MultiSetup, tracker: Tracker) -> dict[str, Any] | None:
    s = ms.s
    cfg, session, engine = s.cfg, s.session, s.engine
    state = ckpt.TrainState()
    with session.restore_dir() as restore:
        if restore:
            state = ckpt.load(engine, session.rank, restore)
            reapply_hyperparameters(engine, cfg)
            expected = ms.cursors(state.epoch, state.batch)
            if state.tasks.get("cursors") != expected:
                raise RuntimeError(f"checkpoint task positions {state.tasks.get('cursors')} differ from the schedule's "
                                   f"{expected}: the checkpoint was made by another task schedule")
            log(s, f"resumed from checkpoint at epoch {state.epoch + 1}, batch {state.batch} (step {state.global_step}); "
                   f"task positions {expected}")
    metric, mode = cfg.eval_metric, cfg.eval_mode
    S, gas = s.steps_per_epoch, cfg.train.gradient_accumulation_steps
    names = [t.name for t in ms.tasks]
    q = sampling.batches_per_epoch([t.batches for t in ms.tasks], cfg.multitask.sampling, cfg.multitask.temperature)
    log(s, f"{session.world_size} worker(s) on {s.device.type}, {s.precision.name}, ZeRO-{cfg.deepspeed.zero_stage}; "
           f"{len(names)} tasks, {S} batches/epoch ({cfg.multitask.sampling}): "
           + ", ".join(f"{t.name} {qt} of {t.batches}/pass" for t, qt in zip(ms.tasks, q)))
    peak = peak_tflops(cfg.train.peak_tflops, s.device.type)
    first_step_at: float | None = None
    throughput: dict[str, Any] = {}
    while state.epoch < cfg.train.epochs and not state.stopped_early:
        epoch = state.epoch
        schedule = ms.schedule(epoch)
        cursors = ms.cursors(epoch, state.batch)
        streams = {t.name: task_stream(t.view.train_reader, cursors[t.name], t.batches) for t in ms.tasks}
        t0, samples, tokens = time.perf_counter(), 0.0, 0.0
        loss_acc = torch.zeros(len(names), dtype=torch.float64, device=s.device)
        n_loss = [0] * len(names)
        # Totals of the epoch's batches before a resume (each task's loss sum and count, tokens,
        # samples, seconds): the epoch's record covers all its batches, as a single-task run's does.
        width = 2 * len(names) + 3
        carried = state.epoch_totals if state.batch and len(state.epoch_totals) == width else [0.0] * width
        try:
            for k in range(state.batch, S):
                i = schedule[k]
                task = ms.tasks[i]
                rows = next(streams[task.name])
                engine.module.active_task = task.name
                batch = collate(rows, s.tokenizer.pad_token_id, task.spec.type, pin_memory=s.device.type == "cuda")
                loss = train_step(task.view, batch, accumulation_window(k, S, gas))
                if first_step_at is None:
                    first_step_at = time.time()
                if cfg.data.record_sample_ids:
                    pass_no = cursors[task.name] // task.batches
                    state.samples.setdefault(f"{task.name}/{pass_no}", []).extend(batch["sample_id"].tolist())
                cursors[task.name] += 1
                state.batch += 1
                state.global_step = engine.global_steps
                state.tasks = {"cursors": dict(cursors)}
                samples += len(rows)
                tokens += float(batch["attention_mask"].sum())
                loss_acc[i] += loss
                n_loss[i] += 1
                if state.batch % cfg.train.log_every_steps == 0:
                    mean = loss_acc.sum().item() / max(sum(n_loss), 1)
                    stop_if_any_rank_diverged(s, mean, state.global_step)
                    log(s, f"epoch {epoch + 1}/{cfg.train.epochs} batch {state.batch}/{S} loss {mean:.4f} "
                           f"lr {engine.get_lr()[0]:.2e}")
                    state.train_log.append([state.global_step, mean])
                    tracker.log_step(state.global_step, {"train/loss": mean, "train/lr": engine.get_lr()[0]})
                if mid_epoch_checkpoint_due(state.batch, S, gas, cfg.train.checkpoint_every_steps):
                    worst = -1e30 if mode == "max" else 1e30
                    stop_if_any_rank_diverged(s, loss_acc.sum().item() / max(sum(n_loss), 1), state.global_step)
                    so_far = all_reduce(loss_acc.tolist() + n_loss + [tokens, samples], s.device)
                    state.epoch_totals = [c + v for c, v in zip(carried, so_far + [time.perf_counter() - t0],
                                                                strict=True)]
                    save_and_report(s, state, {"epoch": epoch + state.batch / S, "step": state.global_step,
                                               "train_loss": mean_loss(state.epoch_totals, len(names)),
                                               f"val_{metric}": worst, "mid_epoch": True})
        finally:
            for g in streams.values():
                g.close()
        train_time = time.perf_counter() - t0 + carried[-1]
        sums = [c + v for c, v in zip(carried, all_reduce(loss_acc.tolist() + n_loss + [tokens, samples], s.device))]
        task_loss = {n: sums[j] / max(sums[len(names) + j], 1) for j, n in enumerate(names)}
        train_loss = mean_loss(sums, len(names))
        check_loss_finite(train_loss, engine.global_steps)
        throughput = {"samples_per_s": sums[-1] / train_time, "tokens_per_s": sums[-2] / train_time,
                      "mfu": mfu(s.n_params, sums[-2] / train_time, session.world_size, peak),
                      "step_time_s": train_time / max(S, 1)}
        per_task = evaluate_tasks(ms, "validation")
        val = combined({n: r[0] for n, r in per_task.items()})
        state.epoch, state.batch, state.epoch_totals = epoch + 1, 0, []
        state.tasks = {"cursors": ms.cursors(epoch + 1, 0)}
        improved = selection.end_of_epoch(state, val[metric], mode, cfg.train.early_stopping_min_delta,
                                          cfg.train.early_stopping_patience, cfg.train.epochs)
        record: dict[str, Any] = {"epoch": epoch + 1, "step": state.global_step, "train_loss": train_loss,
                                  **{f"val_{k}": v for k, v in val.items()}, **throughput,
                                  "train_time_s": train_time, "lr": engine.get_lr()[0]}
        for n, (m, _, _) in per_task.items():
            record[f"{n}/train_loss"] = task_loss[n]
            record.update({f"{n}/val_{k}": v for k, v in m.items()})
        state.history.append(record)
        tracker.log_epoch(state.global_step, {board_key(k): v for k, v in record.items() if isinstance(v, float)})
        log(s, f"epoch {epoch + 1} done: train_loss {train_loss:.4f}, val_{metric} (mean) {val[metric]:.4g}; "
               + ", ".join(f"{n} val_{metric} {task_score(per_task[n][0], metric):.4g}" for n in names)
               + (" (best)" if improved else ""))
        if state.stopped_early:
            log(s, f"early stopping: val_{metric} (mean over tasks) did not improve for "
                   f"{cfg.train.early_stopping_patience} epoch(s)")
        save_and_report(s, state, {**record, "first_step_time": first_step_at or 0.0,
                                   "best_" + metric: state.best_metric, "should_checkpoint": True,
                                   "stopped_early": state.stopped_early})
    return _finish(ms, state, throughput, first_step_at, tracker)


def _finish(ms: MultiSetup, state: ckpt.TrainState, throughput: dict[str, Any],
            first_step_at: float | None, tracker: Tracker) -> dict[str, Any] | None:
    """Reload the best checkpoint, test every task, export every task and the multi-head model."""
    s = ms.s
    cfg, session = s.cfg, s.session
    if state.best_checkpoint and state.best_checkpoint != ckpt.checkpoint_name(state):
        with tempfile.TemporaryDirectory(prefix="ftdist-best-") as tmp:
            session.fetch_checkpoint(state.best_checkpoint, tmp)
            ckpt.load(s.engine, session.rank, tmp, module_only=True)
        log(s, f"reloaded best checkpoint {state.best_checkpoint} (epoch {state.best_epoch})")
    per_task = evaluate_tasks(ms, "test", predictions=True)
    test = combined({n: r[0] for n, r in per_task.items()})
    for n, (m, _, _) in per_task.items():
        log(s, f"test {n}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()))
    from ftdist.multitask.export import export_multitask

    model_uri = join_uri(cfg.run_uri(), layout.MODEL)
    uris = export_multitask(s.engine, cfg, ms.tasks, s.tokenizer, model_uri, session.rank,
                            extra={"best_epoch": state.best_epoch, "test": test})
    tracker.close({f"best/val_{cfg.eval_metric}": state.best_metric or 0.0, **{f"test/{k}": v for k, v in test.items()},
                   **{f"test/{n}/{k}": v for n, r in per_task.items() for k, v in r[0].items()}})
    if session.rank != 0:
        return None
    tasks = {}
    for t in ms.tasks:
        m, _, confusion = per_task[t.name]
        tasks[t.name] = {"test": m, "type": t.spec.type, "model_uri": uris[t.name],
                         "loss_weight": t.spec.loss_weight, "batches_per_pass": t.batches}
        if confusion is not None:
            tasks[t.name].update({"label_names": t.view.label_names, "test_confusion": confusion,
                                  "test_per_class": per_class_metrics(confusion, t.view.label_names)})
    result = {
        "epochs": state.history, "best_epoch": state.best_epoch, "best_metric": state.best_metric,
        "eval_metric": cfg.eval_metric, "eval_mode": cfg.eval_mode, "stopped_early": state.stopped_early,
        "test": test, "throughput": throughput or (state.history[-1] if state.history else {}),
        "first_step_time": first_step_at, "global_step": state.global_step, "world_size": session.world_size,
        "node_ids": [session.node_id()], "device": s.device.type, "precision": s.precision.name,
        "n_params": s.n_params, "trainable_params": s.n_trainable, "model_uri": model_uri, "best_checkpoint": state.best_checkpoint,
        "label_names": None, "train_log": state.train_log, "tasks": tasks,
    }
    storage.write_text(join_uri(cfg.run_uri(), layout.RESULT), json.dumps(result, indent=1), cfg.storage)
    preds = "".join(json.dumps({"task": n, "sample_id": i, "prediction": p, "scores": sc}) + "\n"
                    for n, (_, ps, _) in per_task.items() for i, p, sc in ps)
    storage.write_text(join_uri(cfg.run_uri(), layout.PREDICTIONS), preds, cfg.storage)
    return result
