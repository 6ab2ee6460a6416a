"""Progress a person can read: elapsed time and an ETA for the epoch and the run.

Why its own module: the loop says where it is (epoch, batch) and when an epoch's validation took
place; how long is left is arithmetic over what was measured in this process, kept pure so tests
pin it down without training. Where stdout is a terminal (a local run) a live bar is redrawn on
one line with ``\\r``; elsewhere (CI, Ray job logs, a pipe) only the loop's plain log lines are
written, each carrying the same elapsed/ETA text. Rank 0 only; no device syncs (the loop's own
log line is where it already reads the loss).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 24
#: the live bar is redrawn at most this often (seconds): writing every micro batch costs terminal time
REDRAW_S = 0.2


def format_duration(seconds: float | None) -> str:
    """``45s``, ``3m05s``, ``2h07m``; ``?`` while nothing has been measured yet."""
    if seconds is None:
        return "?"
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def remaining(batch: int, steps_per_epoch: int, epoch: int, epochs: int, s_per_batch: float | None,
              s_per_eval: float | None) -> tuple[float | None, float | None]:
    """Seconds left in this epoch (its batches and its validation) and in the run (every later epoch too).

    ``epoch`` is 0-based and ``batch`` the batches done in it. Validation costs what it cost so far
    (nothing until the first one has run, so early ETAs run a little short)."""
    if s_per_batch is None:
        return None, None
    val = s_per_eval or 0.0
    epoch_left = (steps_per_epoch - batch) * s_per_batch + val
    later = (epochs - epoch - 1) * (steps_per_epoch * s_per_batch + val)
    return epoch_left, epoch_left + later


class Progress:
    """Rank 0's progress state: measured seconds per batch and per validation, and the live bar."""

    def __init__(self, epochs: int, steps_per_epoch: int, out: TextIO | None = None, live: bool | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.epochs, self.steps = epochs, steps_per_epoch
        self.out = out or sys.stdout
        self.live = self.out.isatty() if live is None else live
        self.clock = clock
        self.t0 = clock()
        self.train_s, self.batches = 0.0, 0  # measured in this process (a resumed run starts afresh)
        self.eval_s, self.evals = 0.0, 0
        self._mark = self.t0
        self._drawn = 0.0

    def start(self) -> None:
        """Start timing a stretch of training batches (an epoch, or what is left of it)."""
        self._mark = self.clock()

    def batch_done(self, epoch: int, batch: int) -> None:
        """One micro batch finished (``batch``: done in this epoch); redraws the bar on a terminal."""
        now = self.clock()
        self.train_s += now - self._mark
        self.batches += 1
        self._mark = now
        if self.live and now - self._drawn >= REDRAW_S:
            self._drawn = now
            done = (batch * BAR_WIDTH) // max(self.steps, 1)
            bar = "#" * done + "." * (BAR_WIDTH - done)
            self.out.write(f"\r[{bar}] epoch {epoch + 1}/{self.epochs} batch {batch}/{self.steps} "
                           f"{self.text(epoch, batch)}\x1b[K")
            self.out.flush()

    def eval_done(self, seconds: float) -> None:
        self.eval_s += seconds
        self.evals += 1

    def elapsed(self) -> str:
        return format_duration(self.clock() - self.t0)

    def text(self, epoch: int, batch: int) -> str:
        """``elapsed 1m02s, epoch ETA 40s, run ETA 5m10s`` for the log line (and the bar)."""
        per_batch = self.train_s / self.batches if self.batches else None
        per_eval = self.eval_s / self.evals if self.evals else None
        epoch_left, run_left = remaining(batch, self.steps, epoch, self.epochs, per_batch, per_eval)
        return (f"elapsed {self.elapsed()}, epoch ETA {format_duration(epoch_left)}, "
                f"run ETA {format_duration(run_left)}")

    def line_prefix(self) -> str:
        """What a plain log line starts with: on a terminal, clear the bar's line first."""
        return "\r\x1b[K" if self.live else ""
