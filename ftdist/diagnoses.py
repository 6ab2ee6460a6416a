"""Diagnoses of a finished run: findings a user can act on, each naming what to try.

Why: a run that learned nothing (every prediction one class, a handful of optimizer steps, a
validation metric falling while the train loss falls) used to be reported as an ordinary success.
Each check is a pure function over the run's history and metrics returning ``{code, message}`` or
None; :func:`diagnose` collects them for the summary and the printed report. A non-finite loss is
not a diagnosis but a stop: :func:`check_loss_finite` raises :class:`~ftdist.errors.LossDiverged`.
"""

from __future__ import annotations

import math
from typing import Any

from ftdist.errors import LossDiverged

#: share of validation predictions in one class at and above which the model has collapsed
ONE_CLASS_SHARE = 0.95
#: fewer optimizer steps than this in a whole run rarely fine-tune a pre-trained model
MIN_OPTIMIZER_STEPS = 50
#: consecutive epochs of a worsening validation metric (with falling train loss) that mean overfitting
OVERFIT_EPOCHS = 2
#: share of training examples cut at max_length from which truncation is worth a word
TRUNCATED_SHARE = 0.10
#: the train loss must fall by at least this fraction from the first to the last quarter of the log lines
MIN_LOSS_DROP = 0.02
#: log lines needed before "the loss is not decreasing" means anything
MIN_LOG_POINTS = 4
#: a class found less often than this (validation recall) is "missed" ...
MISSED_RECALL = 0.5
#: ... while the best-found class is found at least this often: the model leans to the majority
LEANING_RECALL = 0.9

Diagnosis = dict[str, str]


def one_class_predictions(confusion: list[list[int]] | None, label_names: list[str] | None,
                          learning_rate: float) -> Diagnosis | None:
    """The model predicts one class for >= 95% of the validation examples (rows: true, cols: predicted)."""
    if not confusion or len(confusion) < 2:
        return None
    predicted = [sum(row[k] for row in confusion) for k in range(len(confusion))]
    total = sum(predicted)
    if total == 0:
        return None
    k = max(range(len(predicted)), key=predicted.__getitem__)
    share = predicted[k] / total
    if share < ONE_CLASS_SHARE:
        return None
    name = label_names[k] if label_names and k < len(label_names) else str(k)
    return {"code": "one_class",
            "message": f"the model predicts class '{name}' for {share:.0%} of validation examples (it learned the "
                       f"majority class, not the task): try another train.learning_rate (now {learning_rate:g}; "
                       f"2e-5..1e-4 suits most BERT-size models), more train.epochs, train.class_weights: balanced "
                       f"when the classes are imbalanced, and train.eval_metric: macro_f1 so the best checkpoint is "
                       f"not picked by accuracy alone"}


def few_optimizer_steps(global_step: int) -> Diagnosis | None:
    """The whole run took fewer optimizer steps than a fine-tune plausibly learns in."""
    if global_step >= MIN_OPTIMIZER_STEPS:
        return None
    return {"code": "few_optimizer_steps",
            "message": f"the run took only {global_step} optimizer steps (fewer than {MIN_OPTIMIZER_STEPS}): try more "
                       f"train.epochs, a smaller train.batch_size or train.gradient_accumulation_steps, or no "
                       f"train.max_steps_per_epoch"}


def overfitting(history: list[dict[str, Any]], metric: str, mode: str,
                early_stopping_patience: int | None) -> Diagnosis | None:
    """The validation metric got worse for the last OVERFIT_EPOCHS epochs while the train loss fell,
    and early stopping was off (with it on, the run stops itself)."""
    if early_stopping_patience is not None or len(history) < OVERFIT_EPOCHS + 1:
        return None
    tail = history[-(OVERFIT_EPOCHS + 1):]
    vals = [v for e in tail if (v := e.get(f"val_{metric}")) is not None]
    losses = [v for e in tail if (v := e.get("train_loss")) is not None]
    if len(vals) < len(tail) or len(losses) < len(tail):  # an epoch without the metric: nothing to compare
        return None
    worse = all((b < a) if mode == "max" else (b > a) for a, b in zip(vals, vals[1:]))
    learning = all(b < a for a, b in zip(losses, losses[1:]))
    if not (worse and learning):
        return None
    peak = tail[0]["epoch"]
    return {"code": "overfitting",
            "message": f"val_{metric} got worse every epoch after epoch {peak} while the train loss kept falling "
                       f"(overfitting): set train.early_stopping_patience (e.g. 2) to stop there, or train fewer "
                       f"train.epochs / with more train.weight_decay; the best checkpoint is still the one exported"}


def truncated_examples(lengths: dict[str, int] | None) -> Diagnosis | None:
    """A large share of training examples was cut at ``max_length`` (from ``data prepare``'s token counts:
    ``truncated_rows``, ``p95``, ``rows``, ``max_length``)."""
    if not lengths or not lengths.get("rows"):
        return None
    share = lengths["truncated_rows"] / lengths["rows"]
    if share < TRUNCATED_SHARE:
        return None
    return {"code": "truncated",
            "message": f"{share:.0%} of training examples are longer than max_length {lengths['max_length']} tokens "
                       f"and were truncated (the model never saw their ends): data.max_length: {lengths['p95']} "
                       f"would keep 95% of them whole (re-prepare the data set with it; cost grows with the length)"}


def loss_not_decreasing(train_log: list[list[float]]) -> Diagnosis | None:
    """The mean train loss of the last quarter of the log lines is not clearly below the first quarter's."""
    losses = [p[1] for p in train_log]
    if len(losses) < MIN_LOG_POINTS:
        return None
    q = len(losses) // 4
    first, last = sum(losses[:q]) / q, sum(losses[-q:]) / q
    if last < first * (1 - MIN_LOSS_DROP):
        return None
    return {"code": "loss_not_decreasing",
            "message": f"the training loss did not decrease (mean {first:.4f} over the first log lines, {last:.4f} "
                       f"over the last): try a lower train.learning_rate if it jumps around, a higher one if it is "
                       f"flat, more train.warmup_ratio, and check that the labels match the texts"}


def minority_classes_missed(per_class: list[dict[str, Any]] | None, class_weights: Any) -> Diagnosis | None:
    """Without class weights, some classes' validation recall is low while another's is near 1: the
    model leans to the frequent class(es) (one_class is the extreme of this)."""
    if not per_class or class_weights is not None:
        return None
    present = [r for r in per_class if r["support"] > 0]
    missed = [r for r in present if r["recall"] < MISSED_RECALL]
    if not missed or max(r["recall"] for r in present) < LEANING_RECALL:
        return None
    top = max(present, key=lambda r: r["recall"])
    listed = ", ".join(f"'{r['label']}' {r['recall']:.2f} ({r['support']} examples)" for r in missed)
    return {"code": "minority_classes_missed",
            "message": f"the model misses classes on validation: recall {listed}, while '{top['label']}' has "
                       f"{top['recall']:.2f}: try train.class_weights: balanced (weighted loss) and "
                       f"train.eval_metric: macro_f1 (best checkpoint by macro-F1, not accuracy)"}


def baseline_wins(test: dict[str, float], baseline: dict[str, Any] | None) -> Diagnosis | None:
    """Fine-tuning's test macro-F1 is not above the TF-IDF + logistic regression baseline's."""
    if not baseline or "macro_f1" not in test:
        return None
    ours, theirs = test["macro_f1"], baseline["test"]["macro_f1"]
    if ours > theirs:
        return None
    return {"code": "baseline_wins",
            "message": f"fine-tuning does not beat the TF-IDF + logistic regression baseline on the test split "
                       f"(macro-F1 {ours:.3f} vs {theirs:.3f}): the bag-of-words model is as good and far cheaper; "
                       f"to make fine-tuning pay, try more train.epochs, another train.learning_rate or a larger "
                       f"model"}


def diagnose(summary: dict[str, Any]) -> list[Diagnosis]:
    """Every finding for a run's summary (or the worker's result plus ``config``), in a fixed order."""
    train = (summary.get("config") or {}).get("train") or {}
    found = [
        one_class_predictions(summary.get("val_confusion"), summary.get("label_names"),
                              train.get("learning_rate", float("nan"))),
        few_optimizer_steps(int(summary.get("global_step") or 0)),
        loss_not_decreasing(summary.get("train_log") or []),
        truncated_examples(summary.get("train_token_lengths")),
        overfitting(summary.get("epochs") or [], summary["eval_metric"], summary["eval_mode"],
                    train.get("early_stopping_patience")),
        minority_classes_missed(summary.get("val_per_class"), train.get("class_weights")),
        baseline_wins(summary.get("test") or {}, (summary.get("baseline") or {}).get("tfidf_logreg")),
    ]
    return [d for d in found if d is not None]


def check_loss_finite(loss: float, step: int) -> None:
    """Stop the run at once on a NaN or infinite loss (called where the loop already reads the loss)."""
    if math.isfinite(loss):
        return
    raise LossDiverged(_diverged(str(loss), step))


NON_FINITE = {1: "nan", 2: "inf", 3: "-inf"}


def non_finite_code(loss: float) -> float:
    """0 for a finite loss, else a NON_FINITE code: one float per rank that a sum all-reduce gathers."""
    if math.isfinite(loss):
        return 0.0
    return 1.0 if math.isnan(loss) else 2.0 if loss > 0 else 3.0


def check_losses_finite(codes: list[float], step: int) -> None:
    """Stop every rank with the same line when any rank's loss was non-finite (``codes``: one
    ``non_finite_code`` per rank, all-reduced), naming the rank(s): a rank whose own loss is still
    finite must stop too rather than wait in the next collective for ranks that already stopped."""
    bad = [(rank, round(c)) for rank, c in enumerate(codes) if c]
    if not bad:
        return
    where = "" if len(codes) == 1 else " on rank " + ", ".join(str(r) for r, _ in bad)
    raise LossDiverged(_diverged(NON_FINITE.get(bad[0][1], "non-finite") + where, step))


def _diverged(became: str, step: int) -> str:
    return (f"the training loss became {became} by optimizer step {step}: stopped at once, no checkpoint of the "
            f"diverged weights was taken and completed checkpoints are kept; try a lower train.learning_rate, "
            f"train.max_grad_norm: 1.0, or train.precision: bf16/fp32 instead of fp16")
