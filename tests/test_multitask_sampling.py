"""The multi-task schedule (ftdist.multitask.sampling): one task per batch, every task's samples
exactly once per pass, and positions that a resumed run recomputes exactly. Pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftdist.multitask import sampling

batches_st = st.lists(st.integers(1, 25), min_size=1, max_size=4)
mode_st = st.sampled_from(["proportional", "temperature", "equal"])
temp_st = st.floats(1.0, 8.0)


def visited(batches: list[int], mode: str, temp: float, seed: int, epochs: int) -> list[list[tuple[int, int]]]:
    """Each task's reader positions (pass, batch) in the order an uninterrupted run takes them."""
    out: list[list[tuple[int, int]]] = [[] for _ in batches]
    for e in range(epochs):
        sched = sampling.epoch_schedule(batches, mode, temp, seed, e)
        cur = sampling.cursors(batches, mode, temp, sched, e, 0)
        for t in sched:
            out[t].append(sampling.reader_position(cur[t], batches[t]))
            cur[t] += 1
    return out


@settings(max_examples=300, deadline=None)
@given(batches_st, st.integers(0, 2**31), st.integers(1, 4))
def test_proportional_epoch_is_exactly_one_pass_over_every_task(batches, seed, epochs):
    seen = visited(batches, "proportional", 1.0, seed, epochs)
    for t, s in enumerate(batches):
        assert seen[t] == [(e, b) for e in range(epochs) for b in range(s)]


@settings(max_examples=300, deadline=None)
@given(batches_st, mode_st, temp_st, st.integers(0, 2**31), st.integers(1, 4))
def test_every_pass_of_every_task_is_taken_in_order_without_repeats_or_gaps(batches, mode, temp, seed, epochs):
    q = sampling.batches_per_epoch(batches, mode, temp)
    assert sum(q) == sum(batches) and min(q) >= 1  # an epoch's length, every task trains every epoch
    seen = visited(batches, mode, temp, seed, epochs)
    for t, s in enumerate(batches):
        # the stream's positions 0 .. epochs*q_t - 1: whole passes are exactly-once, nothing skipped
        assert seen[t] == [divmod(c, s) for c in range(epochs * q[t])]


@settings(max_examples=300, deadline=None)
@given(batches_st, mode_st, temp_st, st.integers(0, 2**31), st.integers(0, 3), st.data())
def test_positions_after_any_batch_are_what_the_run_reached(batches, mode, temp, seed, epoch, data):
    """A resumed run recomputes every task's cursor from (epoch, batches done): it must equal the
    cursor the interrupted run had reached, so each task continues where it was."""
    sched = sampling.epoch_schedule(batches, mode, temp, seed, epoch)
    done = data.draw(st.integers(0, len(sched)))
    cur = sampling.cursors(batches, mode, temp, sched, epoch, 0)
    for t in sched[:done]:
        cur[t] += 1
    assert sampling.cursors(batches, mode, temp, sched, epoch, done) == cur
    if done == len(sched):  # an epoch's end is the next epoch's start
        nxt = sampling.epoch_schedule(batches, mode, temp, seed, epoch + 1)
        assert sampling.cursors(batches, mode, temp, nxt, epoch + 1, 0) == cur


def test_equal_and_temperature_shares():
    assert sampling.batches_per_epoch([90, 10], "equal", 1.0) == [50, 50]
    assert sampling.batches_per_epoch([90, 10], "temperature", 1.0) == [90, 10]  # T=1 is proportional
    q = sampling.batches_per_epoch([90, 10], "temperature", 2.0)  # sqrt: 9.49 : 3.16 -> 75 : 25
    assert q == [75, 25]
    assert sampling.task_probabilities([90, 10], "temperature", 1e9) == pytest.approx([0.5, 0.5], abs=1e-6)


def test_schedule_is_the_same_on_every_rank_and_differs_by_epoch():
    a = sampling.epoch_schedule([5, 7, 3], "proportional", 1.0, 42, 0)
    assert a == sampling.epoch_schedule([5, 7, 3], "proportional", 1.0, 42, 0)
    assert a != sampling.epoch_schedule([5, 7, 3], "proportional", 1.0, 42, 1)
    assert sorted(a) == [0] * 5 + [1] * 7 + [2] * 3
