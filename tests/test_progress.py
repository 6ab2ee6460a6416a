"""Progress lines: elapsed time and ETAs for the epoch and the run (pure arithmetic over measured
seconds), the live bar only where the output is a terminal, and which optimizer step's gradient
norm a log line reports. A real clock would make the figures untestable, so the clock is passed in."""

from __future__ import annotations

import io
import os
import pty
import select

import pytest

from ftdist.loop import grad_norm_due
from ftdist.progress import Progress, format_duration, remaining


def read_all(fd: int) -> str:
    """Everything written to a pty so far: one read may return only part of it."""
    out = b""
    while select.select([fd], [], [], 0.2)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
    return out.decode()


class Clock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_durations_read_as_a_person_writes_them():
    assert [format_duration(x) for x in (None, 0, 44.6, 65, 3599, 3600, 7620)] == \
        ["?", "0s", "45s", "1m05s", "59m59s", "1h00m", "2h07m"]


def test_remaining_time_of_the_epoch_and_the_run():
    # epoch 2 of 3 (0-based 1), 40 of 100 batches done, 0.5 s a batch, validation 10 s
    epoch_left, run_left = remaining(40, 100, 1, 3, 0.5, 10.0)
    assert epoch_left == pytest.approx(60 * 0.5 + 10)
    assert run_left == pytest.approx(40 + 100 * 0.5 + 10)
    assert remaining(100, 100, 2, 3, 0.5, 10.0) == (pytest.approx(10.0), pytest.approx(10.0))
    assert remaining(3, 100, 0, 3, None, None) == (None, None)  # nothing measured yet


def test_a_progress_line_has_elapsed_time_and_both_etas():
    clock = Clock()
    out = io.StringIO()
    p = Progress(epochs=2, steps_per_epoch=10, out=out, live=False, clock=clock)
    p.start()
    for b in range(1, 5):
        clock.now += 2.0
        p.batch_done(0, b)
    assert p.text(0, 4) == "elapsed 8s, epoch ETA 12s, run ETA 32s"
    clock.now += 5.0
    p.eval_done(5.0)  # the first validation: later ETAs include it
    assert p.text(1, 0) == "elapsed 13s, epoch ETA 25s, run ETA 25s"
    assert out.getvalue() == "" and p.line_prefix() == ""  # not a terminal: only the loop's plain lines


def test_the_live_bar_is_redrawn_on_one_line_of_a_terminal():
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            clock = Clock()
            p = Progress(epochs=1, steps_per_epoch=8, out=tty, clock=clock)
            assert p.live  # decided from the stream itself
            p.start()
            for b in range(1, 9):
                clock.now += 1.0
                p.batch_done(0, b)
            tty.flush()
            written = read_all(master)
    finally:
        os.close(master)
        os.close(slave)
    frames = [f for f in written.split("\r") if f]
    assert len(frames) == 8 and "\n" not in written.replace("\r\n", "")
    assert frames[3].startswith("[" + "#" * 12 + "." * 12 + "] epoch 1/1 batch 4/8 elapsed 4s, epoch ETA 4s")
    assert p.line_prefix() == "\r\x1b[K"


def test_each_log_line_reports_the_norm_of_the_last_optimizer_step_before_it():
    # no accumulation: the step of every log_every-th batch
    assert [d for d in range(1, 13) if grad_norm_due(d, 1, 4)] == [4, 8, 12]
    # accumulation 3, a log line every 4 batches: the windows closing at 3 (line at 4), 6 (8) and 12 (12)
    assert [d for d in (3, 6, 9, 12) if grad_norm_due(d, 3, 4)] == [3, 6, 12]
