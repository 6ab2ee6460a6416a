"""bf16 and fp16 training through the real worker loop, and fp16's loss scaling.

One process, world size 1 (``LocalSession``, no Ray), a real DeepSpeed engine on CPU. CPU autocast
computes in bf16 and fp16; DeepSpeed's own fp16 engine (``mixed_precision: deepspeed``) needs a
device with fp16 support, which this CPU lacks, so fp16 runs here under ``torch_autocast``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from conftest import base_config
from ftdist.config import RunConfig, load_config
from ftdist.engine import resolve_precision
from ftdist.errors import UserError
from ftdist.session import LocalSession


def _config(model: str, data: str, root: str, precision: str, **train: Any) -> RunConfig:
    t = {"epochs": 3, "learning_rate": 1e-2, "precision": precision, **train}
    return load_config(data=base_config(model, data, root, run={"name": precision}, train=t,
                                        scaling={"num_workers": 1}))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp16_under_torch_autocast_with_zero_is_refused_in_one_line(stage):
    """DeepSpeed 0.19's ZeRO optimizers skip every fp16 step under torch autocast (its grad scaler
    never lowers the scale), so ftdist refuses that combination instead of training nothing."""
    with pytest.raises(UserError, match=r"deepspeed\.mixed_precision: deepspeed") as e:  # at load: before Ray
        load_config(data={"model": {"path": "m"}, "data": {"path": "d"}},
                    overrides=["train.precision=fp16", f"deepspeed.zero_stage={stage}"])
    assert "\n" not in str(e.value)
    # The workers refuse it too (a config built without validation, e.g. by a library caller).
    cfg = load_config(data={"model": {"path": "m"}, "data": {"path": "d"}}, overrides=["train.precision=fp16"])
    cfg.deepspeed.zero_stage = stage
    with pytest.raises(UserError, match=f"zero_stage {stage}"):
        resolve_precision(cfg, "cpu")
    for ok in (["train.precision=bf16", f"deepspeed.zero_stage={stage}"],
               ["train.precision=fp16", "deepspeed.mixed_precision=deepspeed", f"deepspeed.zero_stage={stage}"],
               ["train.precision=fp16"]):
        resolve_precision(load_config(data={"model": {"path": "m"}, "data": {"path": "d"}}, overrides=ok), "cpu")


@pytest.mark.slow
def test_fp16_loss_scaling_keeps_small_gradients_from_underflowing(tiny_bert, cls_data, tmp_path, process_group):
    """A loss of ~1e-6 has gradients below fp16's smallest subnormal (6e-8): computed in fp16 without
    loss scaling they flush to zero. With ftdist's fp16 (DeepSpeed's dynamic loss scale) they survive."""
    from ftdist.data.collate import collate
    from ftdist.loop import _to_device, forward_autocast, setup, teardown

    cfg = _config(tiny_bert, cls_data, str(tmp_path / "runs"), "fp16", gradient_accumulation_steps=2)
    s = setup(cfg, LocalSession(str(tmp_path / "ckpt")))
    try:
        rows = next(iter(s.train_reader.batches(0, max_batches=1)))
        inputs = _to_device(collate(rows, s.tokenizer.pad_token_id, cfg.model.task), s.device)
        with forward_autocast(s):
            loss = s.engine(**inputs).loss * 1e-6
        s.engine.backward(loss)
        grads = {n: p.grad for n, p in s.engine.module.named_parameters() if p.requires_grad}
        nonzero = [n for n, g in grads.items() if g is not None and bool(g.abs().sum() > 0)]
        # An untrained model's attention query/key gradients are too small even for the scaled
        # range (8 of 41 tensors); every other tensor, the classifier first, must get one.
        assert len(nonzero) / len(grads) > 0.75, f"{len(nonzero)}/{len(grads)} tensors got a nonzero gradient"
        assert "classifier.weight" in nonzero
    finally:
        teardown(s)


def test_fp16_loss_scale_is_checkpointed_and_restored(tiny_bert, cls_data, tmp_path, process_group):
    """A step whose scaled gradients overflow is skipped and halves DeepSpeed's ZeRO-0 grad scaler
    (65536 -> 32768); a checkpoint taken then and loaded into a fresh engine resumes at 32768, not at
    the initial scale (DeepSpeed itself does not save that scaler)."""
    from ftdist import checkpoint as ckpt
    from ftdist.data.collate import collate
    from ftdist.loop import _to_device, forward_autocast, setup, teardown

    cfg = _config(tiny_bert, cls_data, str(tmp_path / "runs"), "fp16")
    s = setup(cfg, LocalSession(str(tmp_path / "ckpt")))
    try:
        scaler = s.engine.torch_autocast_z0_gradscaler
        initial = scaler.get_scale()
        rows = next(iter(s.train_reader.batches(0, max_batches=1)))
        inputs = _to_device(collate(rows, s.tokenizer.pad_token_id, cfg.model.task), s.device)
        with forward_autocast(s):
            loss = s.engine(**inputs).loss * 1e30  # overflows once scaled: the step is skipped
        s.engine.backward(loss)
        s.engine.step()
        changed = scaler.get_scale()
        assert changed == initial / 2, (initial, changed)
        ckpt.save(s.engine, ckpt.TrainState(), 0, str(tmp_path / "c"), False)
    finally:
        teardown(s)
    s = setup(cfg, LocalSession(str(tmp_path / "ckpt2")))
    try:
        assert s.engine.torch_autocast_z0_gradscaler.get_scale() == initial
        ckpt.load(s.engine, 0, str(tmp_path / "c"), world_size=1)
        assert s.engine.torch_autocast_z0_gradscaler.get_scale() == changed
    finally:
        teardown(s)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_end_to_end(precision, tiny_bert, cls_data, tmp_path, process_group):
    """Train, validate, checkpoint, reload the best, test and export in bf16 and in fp16 (autocast):
    the losses stay finite and fall, and the result names the precision that ran."""
    from ftdist.loop import train_worker

    result = train_worker(_config(tiny_bert, cls_data, str(tmp_path / "runs"), precision),
                          LocalSession(str(tmp_path / "ckpt")))
    assert result["precision"] == precision
    epochs = result["epochs"]
    losses = [e["train_loss"] for e in epochs] + [e["val_loss"] for e in epochs] + [result["test"]["loss"]]
    assert all(math.isfinite(v) for v in losses), losses
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"] and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert (tmp_path / "runs" / precision / "model" / "model.safetensors").exists()
