"""What a run records about itself, through the real worker loop (LocalSession, world size 1, no
Ray): TensorBoard event files read back record by record, the run plots, the collapse diagnosis on
a run that learned one class, and a diverged loss stopping the run at once."""

from __future__ import annotations

import shutil
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from conftest import base_config
from ftdist.config import RunConfig, load_config
from ftdist.session import LocalSession

pytestmark = pytest.mark.slow

STEPS, LOG_EVERY = 6, 2
PEAK = 0.5  # TFLOP/s: a CPU has no known peak, so MFU is logged only with train.peak_tflops set


def _config(model: str, data: str, root: Path, name: str, **train: Any) -> RunConfig:
    t = {"epochs": 2, "max_steps_per_epoch": STEPS, "log_every_steps": LOG_EVERY, "learning_rate": 1e-3,
         "peak_tflops": PEAK, **train}
    return load_config(data=base_config(model, data, str(root), run={"name": name}, train=t,
                                        scaling={"num_workers": 1}))


def read_events(folder: Path) -> list[Any]:
    """Every event record in the TFRecord event files under ``folder``."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4  # length, its crc, the record, its crc
    return events


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TFRecord event files under ``folder``, by tag: [(step, value)]."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for event in read_events(folder):
        for v in event.summary.value:
            if v.HasField("simple_value"):
                out[v.tag].append((event.step, v.simple_value))
    return dict(out)


@pytest.fixture(scope="module")
def tracked_run(tiny_bert, cls_data, tmp_path_factory, process_group) -> tuple[RunConfig, dict[str, Any]]:
    from ftdist.loop import train_worker

    root = tmp_path_factory.mktemp("tracked")
    cfg = _config(tiny_bert, cls_data, root / "runs", "tb")
    return cfg, train_worker(cfg, LocalSession(str(root / "ckpt")))


def test_tensorboard_events_hold_every_log_line_and_every_validation_metric(tracked_run):
    cfg, result = tracked_run
    scalars = read_scalars(Path(cfg.run_uri()) / "tensorboard")
    per_epoch = STEPS  # no accumulation: one optimizer step per batch
    log_steps = [e * per_epoch + b for e in range(2) for b in range(LOG_EVERY, STEPS + 1, LOG_EVERY)]
    for tag in ("train/loss", "train/lr", "train/samples_per_s", "train/tokens_per_s", "train/grad_norm",
                "train/mfu"):
        assert [s for s, _ in scalars[tag]] == log_steps, tag
        assert all(v > 0 for _, v in scalars[tag]) or tag == "train/lr", tag
    grad_norms = [v for _, v in scalars["train/grad_norm"]]
    assert len(set(grad_norms)) == len(grad_norms)  # measured at each log line, not one stale value
    for (_, u), (_, tps) in zip(scalars["train/mfu"], scalars["train/tokens_per_s"]):
        assert u == pytest.approx(6 * result["n_params"] * tps / (PEAK * 1e12), rel=1e-4)
    hparams = [v for e in read_events(Path(cfg.run_uri()) / "tensorboard") for v in e.summary.value
               if v.metadata.plugin_data.plugin_name == "hparams"]
    assert hparams and any(b"train.learning_rate" in v.metadata.plugin_data.content for v in hparams)
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([p[1] for p in result["train_log"]], rel=1e-6)
    for metric in ("loss", "accuracy", "macro_f1"):
        assert scalars[f"val/{metric}"] == [(e["step"], pytest.approx(e[f"val_{metric}"], rel=1e-6))
                                           for e in result["epochs"]], metric
    assert scalars["test/accuracy"][0][1] == pytest.approx(result["test"]["accuracy"], rel=1e-6)


def test_run_plots_are_pngs_of_the_stated_size_and_off_when_disabled(tracked_run, tmp_path):
    from PIL import Image

    from ftdist.plots import write_run_plots

    cfg, result = tracked_run
    written = write_run_plots(cfg, result)
    run = Path(cfg.run_uri())
    assert written == [str(run / "plots" / "learning_curves.png"), str(run / "plots" / "confusion_matrix.png")]
    for name, size in (("learning_curves.png", (1000, 400)), ("confusion_matrix.png", (600, 500))):
        path = run / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.size == size, name
    off = cfg.model_copy(deep=True)
    off.tracking.plots = False
    off.storage.path = str(tmp_path)
    assert write_run_plots(off, result) == [] and not (tmp_path / off.run.name).exists()


def test_per_class_figures_of_validation_and_test_are_in_the_result(tracked_run):
    _, result = tracked_run
    for key, conf in (("test_per_class", result["test_confusion"]), ("val_per_class", result["val_confusion"])):
        rows = result[key]
        assert [r["label"] for r in rows] == ["negative", "neutral", "positive"]
        assert [r["support"] for r in rows] == [sum(row) for row in conf]
    f1 = [r["f1"] for r in result["test_per_class"]]
    assert sum(f1) / len(f1) == pytest.approx(result["test"]["macro_f1"], rel=1e-9)


def test_a_run_that_learns_one_class_is_diagnosed(tiny_bert, cls_data, tmp_path, process_group):
    """A learning rate far too high for the model: every validation prediction is one class."""
    from ftdist.diagnoses import diagnose
    from ftdist.loop import train_worker

    cfg = _config(tiny_bert, cls_data, tmp_path / "runs", "collapse", learning_rate=0.5, max_grad_norm=None,
                  epochs=1)
    result = train_worker(cfg, LocalSession(str(tmp_path / "ckpt")))
    codes = [d["code"] for d in diagnose({**result, "config": cfg.model_dump(mode="json")})]
    assert "one_class" in codes and "few_optimizer_steps" in codes, (codes, result["val_confusion"])


def test_a_nan_loss_stops_the_run_before_any_checkpoint_of_it(tiny_bert, cls_data, tmp_path, process_group):
    """Weights holding a NaN (a corrupt checkpoint, or what divergence leaves) make every loss NaN. With
    checkpoints due more often than log lines, the loss is checked before the first checkpoint too:
    no checkpoint folder of the diverged weights, and no NaN metric reported."""
    import torch
    from safetensors.torch import load_file, save_file

    from ftdist.errors import LossDiverged
    from ftdist.loop import train_worker

    model = tmp_path / "nan-model"
    shutil.copytree(tiny_bert, model)
    weights = load_file(str(model / "model.safetensors"))
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    session = LocalSession(str(tmp_path / "ckpt"))
    every = LOG_EVERY - 1
    with pytest.raises(LossDiverged, match=f"became nan by optimizer step {every}:"):
        train_worker(_config(str(model), cls_data, tmp_path / "runs", "nan", checkpoint_every_steps=every), session)
    assert session.reports == []  # no checkpoint of diverged weights, no NaN train_loss reported
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == []


_KILLED_AFTER_PUBLISH = """
import os, signal, sys
from tensorboardX import SummaryWriter
from ftdist.tracking import TensorBoardTracker
t = object.__new__(TensorBoardTracker)
t.writer, t.remote = SummaryWriter(sys.argv[1], flush_secs=30), False
for i in range(200):
    t.writer.add_scalar("x", float(i), i)
t._publish()
os.kill(os.getpid(), signal.SIGKILL)  # as ASHA stops a trial right after its epoch report
"""


def test_scalars_published_at_an_epoch_end_survive_a_kill_right_after(tmp_path):
    """tensorboardX's flush() only flushes what its writer thread already took from the queue: a trial
    killed right after its epoch report lost that epoch (tests/test_sweep.py: a 2-epoch ASHA trial with
    one epoch in TensorBoard). Publishing waits for the queue to drain first."""
    import subprocess
    import sys

    for attempt in range(3):
        out = tmp_path / f"tb{attempt}"
        subprocess.run([sys.executable, "-c", _KILLED_AFTER_PUBLISH, str(out)], check=False, timeout=120)
        assert len(read_scalars(out).get("x", [])) == 200
