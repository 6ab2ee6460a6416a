"""The loop's step planning (pure): after a resize, the optimizer steps left are exactly the
accumulation windows the loop will close (``accumulation_window``), for any gradient accumulation."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ftdist.loop import accumulation_window, optimizer_steps_left


@given(gas=st.integers(1, 5), epoch_batches=st.integers(1, 40), done_windows=st.integers(0, 10),
       later=st.integers(1, 40), later_epochs=st.integers(0, 3))
def test_steps_left_are_the_windows_the_loop_closes(gas, epoch_batches, done_windows, later, later_epochs):
    done = min(done_windows * gas, epoch_batches - 1) // gas * gas  # checkpoints sit on accumulation boundaries
    closed = sum(accumulation_window(b, epoch_batches, gas).last for b in range(done, epoch_batches))
    closed += later_epochs * sum(accumulation_window(b, later, gas).last for b in range(later))
    assert optimizer_steps_left(epoch_batches, done, later, later_epochs, gas) == closed
