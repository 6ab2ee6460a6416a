"""Export the trained model in HF format: safetensors + config + tokenizer, ZeRO shards consolidated.

``AutoModelFor<Task>.from_pretrained(<run>/model)`` loads it. The file ``ftdist_export.json`` is
written last; its presence marks a complete export (object stores have no atomic folder rename).
"""

from __future__ import annotations

import tempfile
from typing import Any

from ftdist import storage
from ftdist.config import RunConfig
from ftdist.redaction import redact

from ftdist.export_files import EXPORT_MARKER, write_marker


def full_state_dict(engine: Any, zero_stage: int) -> dict[str, Any] | None:
    """The unpartitioned weights on rank 0 (collective under ZeRO-3: every rank must call)."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()  # gathers; returns None off rank 0
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def save_weights(module: Any, cfg: RunConfig, state_dict: dict[str, Any], folder: str) -> None:
    """The model's files into ``folder``. LoRA: merged into a plain HF model (``model.lora.export:
    merged``, loads with ``AutoModelFor...`` alone), or peft's adapter folder (``adapter``: adapters and
    the trained head, loaded on top of the base model with ``PeftModel.from_pretrained``)."""
    from ftdist.lora import is_lora, merged_model

    lora = cfg.model.lora
    if lora is None or not is_lora(module):
        module.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    elif lora.export == "merged":
        merged_model(module, state_dict, cfg.model.task).save_pretrained(folder, safe_serialization=True)
    else:
        module.peft_config["default"].base_model_name_or_path = redact(cfg.model.path)
        module.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)


def carry_base_pooler(folder: str, base: str) -> list[str]:
    """Add the base model's pooler weights to a masked-LM export in ``folder``; returns their names.

    Why: a masked-LM model class has no pooler (BERT's is trained by next-sentence prediction), so a
    domain-adapted export would lose the pre-trained pooler and the task stage after it would start
    a random one where fine-tuning the base model directly starts the trained one. Masked-LM training
    never touches the pooler, so the base model's weights are exactly the right ones. Only a
    single-file safetensors export and base are handled (what a pooler-sized model writes); else
    nothing is added."""
    import os

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    target, source = os.path.join(folder, "model.safetensors"), os.path.join(base, "model.safetensors")
    if not (os.path.isfile(target) and os.path.isfile(source)):
        return []
    with safe_open(source, framework="pt") as f:
        pooler = {k: f.get_tensor(k) for k in f.keys() if ".pooler." in f".{k}"}
    weights = load_file(target)
    # the encoder's prefix in the export ("bert.", "roberta."): where its embeddings are
    prefix = next((k.split("embeddings.", 1)[0] for k in sorted(weights) if "embeddings." in k), "")
    # the base may be a bare encoder ("pooler.dense.weight") or a task model ("bert.pooler.dense.weight")
    add = {(k if k.startswith(prefix) else prefix + k): v for k, v in pooler.items()}
    add = {k: v for k, v in add.items() if k not in weights}
    if add:
        save_file({**weights, **add}, target, metadata={"format": "pt"})
    return sorted(add)


def export_model(engine: Any, cfg: RunConfig, tokenizer: Any, uri: str, rank: int, extra: dict[str, Any]) -> None:
    state_dict = full_state_dict(engine, cfg.deepspeed.zero_stage)
    if rank != 0 or state_dict is None:
        return
    state_dict = {k: v.cpu().contiguous() for k, v in state_dict.items()}
    with tempfile.TemporaryDirectory(prefix="ftdist-export-") as tmp:
        save_weights(engine.module, cfg, state_dict, tmp)
        if cfg.model.task == "masked-lm" and not (cfg.model.lora and cfg.model.lora.export == "adapter"):
            from ftdist.modeling import resolve_model_path

            carry_base_pooler(tmp, resolve_model_path(cfg.model.path, cfg.storage))
        tokenizer.save_pretrained(tmp)
        info = {"task": cfg.model.task, "run": cfg.run.name, "base_model": redact(cfg.model.path),
                "format": "lora-adapter" if cfg.model.lora and cfg.model.lora.export == "adapter" else "hf-model",
                **extra}
        write_marker(tmp, EXPORT_MARKER, info)
        storage.upload_dir(tmp, uri, cfg.storage, last=EXPORT_MARKER)
