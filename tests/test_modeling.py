"""Model loading: a new task head is expected; pre-trained weights missing from the checkpoint are not."""

from __future__ import annotations

import logging
import shutil

from ftdist.config import ModelSection
from ftdist.modeling import load_model


def _load(path: str):
    return load_model(ModelSection(path=path, task="sequence-classification"), 3, None, 0)


def test_missing_pretrained_weights_warn_but_a_new_task_head_does_not(tiny_bert, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    with caplog.at_level(logging.INFO, logger="ftdist.modeling"):
        _load(tiny_bert)
    assert "new task head initialised: classifier.bias, classifier.weight" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_bert, damaged)
    weights = load_file(damaged / "model.safetensors")
    dropped = next(k for k in weights if "layer.1.output.dense.weight" in k)
    del weights[dropped]
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ftdist.modeling"):
        _load(str(damaged))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "layer.1.output.dense.weight" in warnings[0] and "is model.path" in warnings[0]
