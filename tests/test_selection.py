"""Best-checkpoint tracking and early stopping, decided epoch by epoch (pure)."""

from __future__ import annotations

from ftdist.checkpoint import TrainState
from ftdist.selection import end_of_epoch


def _run(values: list[float], mode: str = "max", min_delta: float = 0.0, patience: int | None = None,
         epochs: int | None = None) -> TrainState:
    state = TrainState()
    epochs = epochs or len(values)
    for v in values:
        state.epoch, state.global_step = state.epoch + 1, state.global_step + 10
        end_of_epoch(state, v, mode, min_delta, patience, epochs)
        if state.stopped_early:
            break
    return state


def test_best_is_the_best_score_ties_going_to_the_newer_checkpoint():
    s = _run([0.5, 0.7, 0.7, 0.6])
    assert (s.best_epoch, s.best_metric, s.best_checkpoint) == (3, 0.7, "epoch003-batch000000-step00000030")
    assert _run([2.0, 1.5, 1.7], mode="min").best_epoch == 2


def test_early_stopping_needs_an_improvement_larger_than_min_delta():
    s = _run([0.50, 0.505, 0.509, 0.508, 0.9], min_delta=0.01, patience=3, epochs=5)
    assert s.stopped_early and s.epoch == 4  # three epochs within 0.01 of 0.50: stopped before epoch 5
    assert s.best_epoch == 3  # but the best checkpoint still follows the raw score
    assert not _run([0.5, 0.52, 0.54, 0.56], min_delta=0.01, patience=2).stopped_early


def test_no_early_stop_after_the_last_epoch_and_patience_off():
    assert not _run([0.5, 0.4, 0.3], patience=2, epochs=3).stopped_early  # the run ends anyway
    assert not _run([0.5, 0.4, 0.3, 0.2]).stopped_early
    s = _run([0.5, 0.4, 0.3, 0.2], patience=2, epochs=4)
    assert s.stopped_early and s.epoch == 3 and s.bad_epochs == 2
