"""Which task each batch of an epoch comes from, and where every task stands in its own data.

Every batch holds one task (its own reader's batch: no cross-task padding). A task's data is read
as a *stream* of passes: pass ``p`` is that task's reader epoch ``p`` (a full, shuffled,
exactly-once pass over its training split, split across ranks by ``ftdist.data.reader``), and the
task's *cursor* counts the batches taken from the stream so far, so ``divmod(cursor, S_t)`` is the
reader position ``(pass, batch)``.

An epoch of a multi-task run is ``L = sum_t S_t`` batches (``S_t``: task t's batches per pass).
Task t gets ``q_t`` of them, the same number every epoch:

- ``proportional``: ``q_t = S_t``. Every epoch is exactly one pass over every task: each sample of
  each task is seen exactly once per epoch.
- ``temperature`` (``p_t ~ S_t^(1/T)``) and ``equal`` (``p_t = 1/n``): ``q_t`` is ``L * p_t`` rounded
  (largest remainder, at least 1). A task with ``q_t < S_t`` continues its pass in the next epoch
  where it stopped (nothing is left out, a pass spans several epochs); a task with ``q_t > S_t``
  starts its next pass within the epoch (its samples repeat, once per pass). Within every pass
  each sample is seen exactly once.

The order of tasks inside an epoch is a seeded permutation of the multiset ``{t: q_t}``: a pure
function of (seed, epoch, S, sampling), identical on every rank, so ranks stay in lockstep (ZeRO-3
gathers the same head on every rank). The run's position ``(epoch, batches done)`` therefore fixes
every task's cursor; checkpoints also store the cursors, and a resumed run checks they agree.
"""

from __future__ import annotations

import numpy as np


def task_probabilities(batches: list[int], sampling: str, temperature: float) -> list[float]:
    """p(task) for each task from its batches per pass."""
    if sampling == "proportional":
        w = np.asarray(batches, dtype=float)
    elif sampling == "temperature":
        w = np.asarray(batches, dtype=float) ** (1.0 / temperature)
    elif sampling == "equal":
        w = np.ones(len(batches))
    else:
        raise ValueError(f"unknown sampling {sampling!r}")
    return (w / w.sum()).tolist()


def batches_per_epoch(batches: list[int], sampling: str, temperature: float) -> list[int]:
    """``q_t``: how many of an epoch's ``sum(batches)`` batches each task gets."""
    total = sum(batches)
    if sampling == "proportional":
        return list(batches)
    p = task_probabilities(batches, sampling, temperature)
    exact = [total * x for x in p]
    q = [int(x) for x in exact]
    for i in sorted(range(len(q)), key=lambda i: (q[i] - exact[i], i))[: total - sum(q)]:
        q[i] += 1  # largest remainder first
    for i in range(len(q)):  # every task trains every epoch: take a batch from the largest share
        if q[i] == 0:
            j = max(range(len(q)), key=lambda k: q[k])
            q[j] -= 1
            q[i] = 1
    return q


def epoch_schedule(batches: list[int], sampling: str, temperature: float, seed: int, epoch: int) -> list[int]:
    """The task index of each batch of ``epoch`` (length ``sum(batches)``)."""
    q = batches_per_epoch(batches, sampling, temperature)
    tasks = np.repeat(np.arange(len(q)), q)
    order = np.random.default_rng([seed, epoch, 7919]).permutation(len(tasks))
    return tasks[order].tolist()


def cursors(batches: list[int], sampling: str, temperature: float, schedule: list[int], epoch: int,
            done: int) -> list[int]:
    """Every task's stream position after ``done`` batches of ``epoch`` (``schedule`` is that epoch's)."""
    q = batches_per_epoch(batches, sampling, temperature)
    out = [epoch * qt for qt in q]
    for t in schedule[:done]:
        out[t] += 1
    return out


def reader_position(cursor: int, batches_per_pass: int) -> tuple[int, int]:
    """``(pass, batch)``: the reader epoch and the batch inside it where a task's stream stands."""
    return divmod(cursor, batches_per_pass)
