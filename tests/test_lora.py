"""LoRA (ftdist/lora.py): defaults per architecture, the merged export, sweeps over r and alpha (no
DeepSpeed), and through the real worker loop (one process, DeepSpeed on CPU): training at every ZeRO
stage, both export formats predicting what the engine predicted, resume, the summary's counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import _seeded_from_config, base_config
from ftdist.config import LoraSection, load_config
from ftdist.errors import UserError
from ftdist.lora import apply_lora, check_targets, merged_model, parameter_counts
from ftdist.session import LocalSession


def _tiny(model_type: str, task: str = "sequence-classification") -> torch.nn.Module:
    from transformers import AutoConfig

    from ftdist.lora import auto_class

    sizes = {"bert": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32),
             "distilbert": dict(dim=16, n_layers=2, n_heads=2, hidden_dim=32),
             "gpt2": dict(n_embd=16, n_layer=2, n_head=2),
             "t5": dict(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)}[model_type]
    cfg = AutoConfig.for_model(model_type, vocab_size=100, num_labels=3, pad_token_id=0, **sizes)
    return _seeded_from_config(auto_class(task), cfg)


@pytest.mark.parametrize("model_type, task, targets, head", [
    ("bert", "sequence-classification", {"query", "value"}, {"classifier", "pooler"}),
    ("distilbert", "sequence-classification", {"q_lin", "v_lin"}, {"pre_classifier", "classifier"}),
    ("t5", "sequence-classification", {"q", "v"}, {"classification_head"}),
    ("gpt2", "causal-lm", {"c_attn"}, set()),
])
def test_defaults_per_architecture_adapt_attention_and_train_the_head_in_full(model_type, task, targets, head):
    model = apply_lora(_tiny(model_type, task), LoraSection(), task, "m")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_A." in n}
    assert adapted == targets
    full = {n for n in trainable if "lora_" not in n}
    # the head's trainable copy (peft's modules_to_save), every weight of it; nothing else outside the adapters
    assert {n.split(".modules_to_save")[0].rsplit(".", 1)[-1] for n in full} == head
    assert all(".modules_to_save." in n for n in full)
    total, n_trainable = parameter_counts(model)
    assert n_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) < total


def test_an_unknown_target_module_names_the_layers_there_are():
    with pytest.raises(UserError, match="'qkv' is not a module of model 'm'; its adaptable layers are named "
                                        "classifier, dense, key, .*query.*value"):
        check_targets(_tiny("bert"), ["query", "qkv"], "m")
    check_targets(_tiny("bert"), ["attention.self.query"], "m")  # suffixes, as peft matches them


def test_merged_model_is_a_plain_model_predicting_like_the_adapters(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = apply_lora(_tiny("bert"), LoraSection(r=4, alpha=8, dropout=0.0), "sequence-classification", "m")
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for n, p in model.named_parameters():
            if p.requires_grad:  # lora_B starts at zero (a no-op); make the adapters and the head matter
                p.add_(torch.randn_like(p) * 0.5)
    model.eval()
    ids = torch.randint(1, 100, (4, 12))
    expected = model(input_ids=ids).logits
    merged = merged_model(model, {k: v.clone() for k, v in model.state_dict().items()}, "sequence-classification")
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
    base_only = AutoModelForSequenceClassification.from_config(loaded.config).eval()
    base_only.load_state_dict(_tiny("bert").state_dict())
    assert not torch.allclose(base_only(input_ids=ids).logits, expected, atol=1e-3)  # the adapters changed it


def test_rank_and_alpha_are_sweepable():
    from ftdist.sweep.spec import load_sweep_spec, resolve_sweep, trial_config

    rs = resolve_sweep(load_sweep_spec(data={"name": "s", "base": {"config": {"model": {"path": "m"},
                                                                              "data": {"path": "d"}}},
                                             "space": {"model.lora.r": {"choice": [4, 16]},
                                                       "model.lora.alpha": {"uniform": [8, 32]}}}))
    cfg = trial_config(rs, {"model.lora.r": 16, "model.lora.alpha": 12.5}, "t1")
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.export) == (16, 12.5, "merged")
    with pytest.raises(UserError, match="model.lora.r"):
        trial_config(rs, {"model.lora.r": 0}, "t2")


# ---------------------------------------------------------------------------------------------
# Through the worker loop (DeepSpeed)


def _config(model: str, data: str, root: Path, name: str, stage: int, lora: dict | None = None, **train: Any):
    t = {"epochs": 2, "learning_rate": 2e-2, **train}
    return load_config(data=base_config(model, data, str(root / "runs"), run={"name": name},
                                        model={"lora": {"r": 4, "alpha": 8, **(lora or {})}}, train=t,
                                        deepspeed={"zero_stage": stage}, scaling={"num_workers": 1}))


def _worker_predictions(run: Path) -> dict[int, int]:
    return {json.loads(l)["sample_id"]: json.loads(l)["prediction"]
            for l in (run / "test_predictions.jsonl").read_text().splitlines()}


def _predict(model: torch.nn.Module, data: str) -> dict[int, int]:
    import pyarrow.parquet as pq

    out = {}
    for f in sorted(Path(data, "test").glob("*.parquet")):
        for row in pq.read_table(f).to_pylist():
            with torch.no_grad():
                out[row["sample_id"]] = int(model(input_ids=torch.tensor([row["input_ids"]])).logits.argmax(-1))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_lora_trains_at_every_zero_stage_and_the_merged_export_predicts_identically(
        stage, tiny_bert, cls_data, tmp_path, process_group):
    from transformers import AutoModelForSequenceClassification

    from ftdist.loop import train_worker

    result = train_worker(_config(tiny_bert, cls_data, tmp_path, "l", stage), LocalSession(str(tmp_path / "ck")))
    losses = [e["train_loss"] for e in result["epochs"]]
    assert losses[1] < losses[0], losses
    # Adapters on query/value (2 layers x 2 x r*(32+32)), the 3-way head (32*3+3) and its pooler, nothing else.
    assert result["trainable_params"] == 2 * 2 * 4 * 64 + 99 + 32 * 32 + 32  # ... and BERT's pooler
    assert result["trainable_params"] < 0.02 * result["n_params"]
    # Adam's two fp32 moments per trainable weight (plus step counters): the whole optimizer state.
    assert 8 * result["trainable_params"] <= result["optimizer_state_bytes"] <= 8 * result["trainable_params"] + 512
    run = tmp_path / "runs" / "l"
    model = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()  # no peft needed
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert _predict(model, cls_data) == _worker_predictions(run)
    # The trained updates are folded into the adapted weights; the others are the base's, untouched.
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3).state_dict()
    merged = model.state_dict()
    for layer in (0, 1):
        w = f"bert.encoder.layer.{layer}.attention.self."
        assert not torch.equal(merged[w + "query.weight"], base[w + "query.weight"])
        assert not torch.equal(merged[w + "value.weight"], base[w + "value.weight"])
        assert torch.equal(merged[w + "key.weight"], base[w + "key.weight"])


@pytest.mark.slow
def test_adapter_export_loads_on_the_base_model_and_predicts_identically(tiny_bert, cls_data, tmp_path,
                                                                          process_group):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from ftdist.loop import train_worker

    train_worker(_config(tiny_bert, cls_data, tmp_path, "a", 2, lora={"export": "adapter"}, epochs=1),
                 LocalSession(str(tmp_path / "ck")))
    out = tmp_path / "runs" / "a" / "model"
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_bert
    assert json.loads((out / "ftdist_export.json").read_text())["format"] == "lora-adapter"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    model = PeftModel.from_pretrained(base, out).eval()
    assert _predict(model, cls_data) == _worker_predictions(tmp_path / "runs" / "a")


class CrashAfterMidEpochCheckpoint(LocalSession):
    """Dies right after its first mid-epoch checkpoint is stored, as a killed worker would."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str | None) -> None:
        super().report(metrics, checkpoint_dir, name)
        if metrics.get("mid_epoch"):
            raise RuntimeError("worker killed after a mid-epoch checkpoint")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_lora_resumes_mid_epoch_to_the_same_result(stage, tiny_bert, cls_data, tmp_path, process_group):
    """Adapters, head and their optimizer state come back from the checkpoint: the resumed run ends
    exactly where the uninterrupted one does. The checkpoint holds the trainable weights and their
    optimizer state only, not the frozen base model (audit 2026-12-07: DeepSpeed stored it every time)."""
    from transformers import AutoModel

    from ftdist.loop import train_worker

    kw = {"max_steps_per_epoch": 6, "checkpoint_every_steps": 4}
    clean = train_worker(_config(tiny_bert, cls_data, tmp_path / "a", "r", stage, **kw), LocalSession(str(tmp_path / "ca")))
    cfg = _config(tiny_bert, cls_data, tmp_path / "b", "r", stage, **kw)
    with pytest.raises(RuntimeError, match="worker killed"):
        train_worker(cfg, CrashAfterMidEpochCheckpoint(str(tmp_path / "cb")))
    ckpt = next(p for p in (tmp_path / "cb").rglob("*") if p.is_dir() and p.name.startswith("epoch"))
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    model_bytes = 4 * sum(p.numel() for p in AutoModel.from_pretrained(tiny_bert).parameters())
    assert ckpt_bytes < 0.5 * model_bytes, f"checkpoint {ckpt_bytes:,} B vs the fp32 base model {model_bytes:,} B"
    resumed = train_worker(cfg, LocalSession(str(tmp_path / "cb")))
    assert [e["val_loss"] for e in resumed["epochs"]] == [e["val_loss"] for e in clean["epochs"]]
    assert resumed["test"] == clean["test"]


def test_the_printed_report_gives_trainable_parameters_and_optimizer_state():
    from ftdist.launcher import format_summary

    summary = {"run": "r", "world_size": 2, "device": "cpu", "precision": "fp32", "eval_metric": "accuracy",
               "epochs": [], "best_epoch": 1, "test": {"accuracy": 0.9}, "throughput": {}, "wall_time_s": 3.0,
               "model_uri": "/m", "run_dir": "/r", "n_params": 1_000_000, "trainable_params": 12_500,
               "optimizer_state_bytes": 100_000}
    line = next(l for l in format_summary(summary).splitlines() if "trainable" in l)
    assert line.strip() == "parameters: 12,500 trainable of 1,000,000 (1.25%); optimizer state 0.1 MB"


@pytest.mark.slow
def test_a_pbt_exploit_continues_lora_with_its_own_learning_rate(tiny_bert, cls_data, tmp_path, process_group):
    """What PBT does to a LoRA trial, without Ray: trial B continues trial A's checkpoint (adapters, head,
    optimizer state) with a perturbed learning rate, and trains with B's."""
    import shutil

    from ftdist.loop import train_worker
    from ftdist.sweep.trial import reset_best_tracking

    kw = {"epochs": 1, "max_steps_per_epoch": 3, "lr_schedule": "constant"}
    sa = LocalSession(str(tmp_path / "a"))
    train_worker(_config(tiny_bert, cls_data, tmp_path, "a", 2, **kw), sa)
    name = json.loads((tmp_path / "a" / "latest.json").read_text())["name"]
    shutil.copytree(tmp_path / "a" / name, tmp_path / "b" / name)
    reset_best_tracking(str(tmp_path / "b" / name / "ftdist_state.json"))
    (tmp_path / "b" / "latest.json").write_text(json.dumps({"name": name}))
    sb = LocalSession(str(tmp_path / "b"))
    result = train_worker(_config(tiny_bert, cls_data, tmp_path, "b", 2, **{**kw, "epochs": 2,
                                                                             "learning_rate": 2e-3}), sb)
    assert [r["lr"] for r in sa.reports] == [2e-2]
    assert [(r["epoch"], r["lr"]) for r in sb.reports] == [(2, 2e-3)]
    assert result["trainable_params"] == 2 * 2 * 4 * 64 + 99 + 32 * 32 + 32 and len(result["epochs"]) == 2
