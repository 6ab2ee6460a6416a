"""The memory and speed levers train end to end through the real worker loop (one process, DeepSpeed on
CPU): optimizer offload (DeepSpeed's CPU Adam, JIT-built once into TORCH_EXTENSIONS_DIR), parameter
offload (ZeRO-3), gradient checkpointing (full and with LoRA) and ``torch.compile``. Each run checks
that the lever is really on in the engine, not only in the config; bench/memory.py measures effects."""

from __future__ import annotations

import math
from typing import Any

import pytest

from conftest import base_config
from ftdist.config import load_config
from ftdist.session import LocalSession

pytestmark = pytest.mark.slow

STEPS = 6

LEVERS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    # name: (deepspeed, model, train) sections
    "offload_optimizer": ({"zero_stage": 2, "offload_optimizer": True}, {}, {}),
    "offload_params": ({"zero_stage": 3, "offload_optimizer": True, "offload_params": True}, {}, {}),
    "gradient_checkpointing": ({"zero_stage": 3}, {"gradient_checkpointing": True}, {}),
    "gradient_checkpointing_lora": ({"zero_stage": 0}, {"gradient_checkpointing": True, "lora": {"r": 4}}, {}),
    "compile": ({"zero_stage": 0}, {}, {"compile": True}),
}


@pytest.mark.parametrize("lever", list(LEVERS))
def test_lever_trains_end_to_end(lever, tiny_bert, cls_data, tmp_path, process_group, monkeypatch):
    from transformers.models.bert import modeling_bert

    from ftdist.loop import train_worker

    ds, model, train = LEVERS[lever]
    # Count the layers' feed-forward calls in training mode: checkpointing runs each layer again in backward.
    # (Inside the layer: transformers wraps BertLayer.forward itself to checkpoint it.)
    calls = {"n": 0}
    forward = modeling_bert.BertIntermediate.forward

    def counting(self, *a, **kw):
        calls["n"] += self.training
        return forward(self, *a, **kw)

    monkeypatch.setattr(modeling_bert.BertIntermediate, "forward", counting)
    cfg = load_config(data=base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": lever},
                                       deepspeed=ds, model=model, scaling={"num_workers": 1},
                                       train={"epochs": 1, "max_steps_per_epoch": STEPS, "learning_rate": 5e-3,
                                              **train}))
    result = train_worker(cfg, LocalSession(str(tmp_path / "ck")))
    assert result["global_step"] == STEPS and math.isfinite(result["epochs"][0]["train_loss"])
    assert (tmp_path / "runs" / lever / "model" / "model.safetensors").exists()
    used = result["memory"]
    assert used["offload_optimizer"] == bool(ds.get("offload_optimizer"))
    assert used["optimizer"] == ("DeepSpeedCPUAdam" if ds.get("offload_optimizer") else "AdamW")
    assert used["offload_params"] == bool(ds.get("offload_params"))
    assert used["gradient_checkpointing"] == bool(model.get("gradient_checkpointing"))
    assert used["compiled"] == bool(train.get("compile"))
    if not train.get("compile"):  # compiled graphs do not call the Python forward per step
        layers = 2
        assert calls["n"] == STEPS * layers * (2 if model.get("gradient_checkpointing") else 1)
