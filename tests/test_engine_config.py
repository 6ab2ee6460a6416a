"""DeepSpeed config and schedule are pure functions of the run config."""

import torch

from ftdist.config import load_config
from ftdist.engine import Precision, deepspeed_config, lr_lambda

BASE = {"model": {"path": "m"}, "data": {"path": "d"}}


def test_zero_stages_and_offload():
    fp32 = Precision("fp32", None)
    c0 = deepspeed_config(load_config(data=BASE), fp32)
    assert c0["zero_optimization"] == {"stage": 0} and "optimizer" not in c0
    c3 = deepspeed_config(load_config(data=BASE, overrides=["deepspeed.zero_stage=3", "deepspeed.offload_params=true",
                                                            "deepspeed.offload_optimizer=true"]), fp32)
    assert c3["zero_optimization"]["stage"] == 3
    assert c3["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert c3["optimizer"]["type"] == "AdamW"  # offload needs DeepSpeed's CPU Adam


def test_precision_modes_and_raw_overrides():
    cfg = load_config(data=BASE, overrides=["train.gradient_accumulation_steps=4", "train.max_grad_norm=0.5",
                                            "deepspeed.config={zero_optimization: {stage: 2, round_robin_gradients: true}}"])
    bf16 = Precision("bf16", torch.bfloat16)
    c = deepspeed_config(cfg, bf16)
    assert "bf16" not in c  # autocast mode: DeepSpeed keeps fp32 master weights without its bf16 wrapper
    assert c["gradient_accumulation_steps"] == 4 and c["gradient_clipping"] == 0.5
    assert c["zero_optimization"]["round_robin_gradients"] is True and c["zero_optimization"]["stage"] == 2
    native = load_config(data=BASE, overrides=["deepspeed.mixed_precision=deepspeed"])
    assert deepspeed_config(native, bf16)["bf16"] == {"enabled": True}


def test_warmup_then_decay():
    f = lr_lambda(100, 10, "linear")
    assert f(0) == 0.1 and f(9) == 1.0
    assert f(10) == 1.0 and abs(f(55) - 0.5) < 1e-9 and f(100) == 0.0
    assert lr_lambda(100, 0, "constant")(50) == 1.0
    assert abs(lr_lambda(100, 0, "cosine")(50) - 0.5) < 1e-9


def test_fp16_under_torch_autocast_gets_deepspeeds_loss_scaled_autocast():
    """fp16 needs a dynamic loss scale: under torch_autocast DeepSpeed's own torch_autocast mode
    provides it (GradScaler); bf16 needs none and keeps ftdist's autocast with no DeepSpeed section."""
    cfg = load_config(data=BASE, overrides=["train.precision=fp16"])
    c = deepspeed_config(cfg, Precision("fp16", torch.float16))
    assert c["torch_autocast"] == {"enabled": True, "dtype": "float16"} and "fp16" not in c
    assert "torch_autocast" not in deepspeed_config(cfg, Precision("bf16", torch.bfloat16))
    native = load_config(data=BASE, overrides=["train.precision=fp16", "deepspeed.mixed_precision=deepspeed"])
    c = deepspeed_config(native, Precision("fp16", torch.float16))
    assert c["fp16"] == {"enabled": True} and "torch_autocast" not in c
