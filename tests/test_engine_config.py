"""DeepSpeed config and schedule are pure functions of the run config."""

import pytest
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


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("total,warmup,done,remaining", [(100, 10, 40, 120), (100, 10, 40, 15), (100, 20, 5, 300),
                                                         (60, 0, 59, 2)])
def test_a_resized_run_continues_its_lr_and_ends_the_schedule_on_its_new_last_step(kind, total, warmup, done,
                                                                                  remaining):
    """Resumed on another number of workers after ``done`` steps with ``remaining`` steps left:
    no jump in the LR, the schedule's end reached exactly at ``done + remaining``, still monotone
    after warmup, and a second resize chains on the first."""
    from ftdist.engine import rescheduled

    before = lr_lambda(total, warmup, kind)
    remap = rescheduled(None, total, done, remaining)
    after = lr_lambda(total, warmup, kind, remap)
    assert after(done) == pytest.approx(before(done), abs=1e-12)
    end = done + remaining
    assert after(end) == pytest.approx(before(total), abs=1e-12)  # 0 for decays, 1 for constant
    lrs = [after(s) for s in range(done, end + 1)]
    tail = lrs[lrs.index(max(lrs)):]  # warmup left (stretched with the rest), then never up again
    assert all(a >= b - 1e-12 for a, b in zip(tail, tail[1:]))
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:lrs.index(max(lrs))], lrs[1:]))
    again = rescheduled(remap, total, done + remaining // 2, remaining)
    chained = lr_lambda(total, warmup, kind, again)
    assert chained(done + remaining // 2) == pytest.approx(after(done + remaining // 2), abs=1e-12)
    assert chained(done + remaining // 2 + remaining) == pytest.approx(before(total), abs=1e-12)


def test_zero3_gathering_limits_follow_the_model_size_and_stay_overridable():
    """DeepSpeed's default reuse distance (1e9 parameters) kept every weight of a <500M model gathered
    after the first step, so ZeRO-3 saved no memory; the limits now scale with the hidden size."""
    fp32 = Precision("fp32", None)
    z3 = load_config(data=BASE, overrides=["deepspeed.zero_stage=3"])
    zero = deepspeed_config(z3, fp32, hidden_size=1024)["zero_optimization"]
    assert zero["stage3_max_reuse_distance"] == zero["stage3_max_live_parameters"] == 24 * 1024 * 1024
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 1024 * 1024)
    assert zero["stage3_param_persistence_threshold"] == 10 * 1024
    assert zero["reduce_bucket_size"] == 1024 * 1024
    assert deepspeed_config(z3, fp32)["zero_optimization"]["reduce_bucket_size"] == 50_000_000
    set_bucket = load_config(data=BASE, overrides=["deepspeed.zero_stage=3", "deepspeed.reduce_bucket_size=123"])
    assert deepspeed_config(set_bucket, fp32, hidden_size=1024)["zero_optimization"]["reduce_bucket_size"] == 123
    assert "stage3_max_reuse_distance" not in deepspeed_config(z3, fp32)["zero_optimization"]  # size unknown
    z2 = load_config(data=BASE, overrides=["deepspeed.zero_stage=2"])
    z2_zero = deepspeed_config(z2, fp32, hidden_size=1024)["zero_optimization"]
    assert not any(k.startswith("stage3_") for k in z2_zero) and z2_zero["reduce_bucket_size"] == 50_000_000
    mine = load_config(data=BASE, overrides=["deepspeed.zero_stage=3",
                                             "deepspeed.config={zero_optimization: {stage3_max_reuse_distance: 7}}"])
    zero = deepspeed_config(mine, fp32, hidden_size=1024)["zero_optimization"]
    assert zero["stage3_max_reuse_distance"] == 7 and zero["stage3_max_live_parameters"] == 24 * 1024 * 1024


def test_the_engine_reads_the_hidden_size_of_plain_and_lora_models(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    from ftdist.config import LoraSection
    from ftdist.engine import model_hidden_size
    from ftdist.lora import apply_lora

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    assert model_hidden_size(model) == 32
    assert model_hidden_size(apply_lora(model, LoraSection(), "sequence-classification", tiny_bert)) == 32
