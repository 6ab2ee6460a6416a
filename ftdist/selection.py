"""Which checkpoint is the best, and when to stop early: the loop's per-epoch decisions, pure.

Kept out of the loop so they are pinned down by unit tests rather than by multi-epoch runs.
"""

from __future__ import annotations

from ftdist.checkpoint import TrainState, checkpoint_name


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """``value`` beats ``best`` by more than ``min_delta`` in direction ``mode`` ('max' or 'min')."""
    return best is None or (value > best + min_delta if mode == "max" else value < best - min_delta)


def end_of_epoch(state: TrainState, value: float, mode: str, min_delta: float, patience: int | None,
                 epochs: int) -> bool:
    """Update best tracking and early stopping in ``state`` after an epoch ended with validation
    metric ``value`` (``state.epoch`` already counts that epoch). Returns whether it improved.

    Best = the best score with ties going to the newer checkpoint: the same order Ray's retention
    (``checkpoint_score_attribute``) uses, so the best checkpoint is never the one Ray deletes.
    Early stopping separately needs a real improvement, by more than ``min_delta``; it never
    triggers after the last epoch (there is nothing left to stop)."""
    better = improved(value, state.best_metric, mode, min_delta)
    if state.best_metric is None or value == state.best_metric or improved(value, state.best_metric, mode):
        state.best_metric, state.best_epoch, state.best_checkpoint = value, state.epoch, checkpoint_name(state)
    state.bad_epochs = 0 if better else state.bad_epochs + 1
    state.stopped_early = bool(patience and state.bad_epochs >= patience and state.epoch < epochs)
    return better
