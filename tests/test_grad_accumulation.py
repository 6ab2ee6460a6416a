"""Gradient accumulation with checkpoints and the LR schedule, through the real worker loop.

One process, world size 1 (``LocalSession``, no Ray), a real DeepSpeed engine on CPU: fast and
deterministic, so a resumed run can be compared with an uninterrupted one exactly.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import base_config
from ftdist.config import RunConfig, load_config
from ftdist.session import LocalSession

pytestmark = pytest.mark.slow

LR = 1e-2
STEPS, GAS = 7, 2  # batches per epoch (max_steps_per_epoch) and accumulation: the last window is partial


def _config(model: str, data: str, root: Path, name: str, stage: int = 0, **train: Any) -> RunConfig:
    t = {"epochs": 2, "max_steps_per_epoch": STEPS, "gradient_accumulation_steps": GAS, "learning_rate": LR,
         "lr_schedule": "linear", "warmup_ratio": 0.0, **train}
    return load_config(data=base_config(model, data, str(root), run={"name": name}, train=t,
                                        deepspeed={"zero_stage": stage}, scaling={"num_workers": 1}))


class CrashAfterMidEpochCheckpoint(LocalSession):
    """A session whose worker dies right after its first mid-epoch checkpoint is stored, as a
    SIGKILLed worker would after Ray registered that checkpoint."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str | None) -> None:
        super().report(metrics, checkpoint_dir, name)
        if metrics.get("mid_epoch"):
            raise RuntimeError("worker killed after a mid-epoch checkpoint")


def _positions(root: Path) -> list[tuple[int, int, int]]:
    """(epoch, batch, step) of every checkpoint folder a LocalSession stored under ``root``."""
    out = []
    for p in root.iterdir():
        m = re.fullmatch(r"epoch(\d+)-batch(\d+)-step(\d+)", p.name)
        if m:
            out.append(tuple(int(g) for g in m.groups()))
    return sorted(out)


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert, cls_data, tmp_path_factory, process_group) -> tuple[Path, dict[str, Any]]:
    """The reference: gradient accumulation 2 with a checkpoint every 3 batches, never interrupted."""
    from ftdist.loop import train_worker

    root = tmp_path_factory.mktemp("gas-clean")
    result = train_worker(_config(tiny_bert, cls_data, root / "runs", "clean", checkpoint_every_steps=3),
                          LocalSession(str(root / "ckpt")))
    return root / "ckpt", result


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_schedule_plans_exactly_the_optimizer_steps_taken(stage, tiny_bert, cls_data, tmp_path, process_group):
    """Every epoch ends on an optimizer step (its last partial window is stepped), so 3 epochs of 7
    batches with accumulation 2 take 3 x ceil(7/2) = 12 steps, and the linear schedule, planned for
    exactly those, ends at zero: at each epoch end the LR is the remaining share of the plan. ZeRO-2
    and -3 reduce gradients inside the window, so the forced boundary is checked there too."""
    from ftdist.loop import train_worker

    epochs = 3
    result = train_worker(_config(tiny_bert, cls_data, tmp_path / "runs", "sched", stage, epochs=epochs),
                          LocalSession(str(tmp_path / "ckpt")))
    assert result["epochs"][-1]["train_loss"] < 2 and all(math.isfinite(e["val_loss"]) for e in result["epochs"])
    per_epoch = math.ceil(STEPS / GAS)
    total = epochs * per_epoch
    assert [e["step"] for e in result["epochs"]] == [per_epoch * (i + 1) for i in range(epochs)]
    assert result["global_step"] == total
    for i, e in enumerate(result["epochs"]):
        assert e["lr"] == pytest.approx(LR * (1 - per_epoch * (i + 1) / total), rel=1e-9, abs=1e-15)
    assert result["epochs"][-1]["lr"] == 0.0


def test_mid_epoch_checkpoints_fall_on_accumulation_boundaries(uninterrupted):
    """checkpoint_every_steps 3 with accumulation 2: each checkpoint goes to the first boundary at or
    after 3 and 6 (batches 4 and 6), never inside a window whose gradient would be lost."""
    ckpt_root, _ = uninterrupted
    positions = _positions(ckpt_root)
    mid = [(e, b) for e, b, _ in positions if b]
    assert mid == [(0, 4), (0, 6), (1, 4), (1, 6)]
    per_epoch = math.ceil(STEPS / GAS)
    for epoch, batch, step in positions:  # one optimizer step per completed window
        assert step == epoch * per_epoch + batch // GAS


def test_resume_after_a_mid_epoch_checkpoint_matches_the_uninterrupted_run(
        uninterrupted, tiny_bert, cls_data, tmp_path, process_group, capsys):
    """Killed after the first mid-epoch checkpoint and restarted: the run resumes there (not from
    scratch) and ends with exactly the uninterrupted run's validation and test metrics."""
    from ftdist.loop import train_worker

    _, reference = uninterrupted
    cfg = _config(tiny_bert, cls_data, tmp_path / "runs", "killed", checkpoint_every_steps=3)
    with pytest.raises(RuntimeError, match="worker killed"):
        train_worker(cfg, CrashAfterMidEpochCheckpoint(str(tmp_path / "ckpt")))
    capsys.readouterr()
    result = train_worker(cfg, LocalSession(str(tmp_path / "ckpt")))
    out = capsys.readouterr().out
    m = re.search(r"resumed from checkpoint at epoch (\d+), batch (\d+) \(step (\d+)\)", out)
    assert m, out
    assert (int(m[1]), int(m[2])) == (1, 4)
    assert result["global_step"] == reference["global_step"]
    for got, want in zip(result["epochs"], reference["epochs"], strict=True):
        assert (got["step"], got["val_loss"], got["val_accuracy"], got["lr"]) == \
               (want["step"], want["val_loss"], want["val_accuracy"], want["lr"])
        # The resumed epoch's train loss and throughput cover its batches before the kill too (A14).
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-12)
        assert got["samples_per_s"] * got["train_time_s"] == pytest.approx(want["samples_per_s"] * want["train_time_s"])
    assert result["test"] == reference["test"]
