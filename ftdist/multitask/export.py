"""Export a multi-task model: one standard HF folder per task, plus the multi-head weights.

Layout under ``<run>/model/``:

- ``<task>/``      the shared encoder + that task's head, as ``AutoModelForSequenceClassification``
                   saves it (config with ``id2label``, safetensors, tokenizer, ``ftdist_export.json``);
                   ``AutoModelForSequenceClassification.from_pretrained(<run>/model/<task>)`` loads it;
                   with ``model.lora`` the encoder's adapters are merged into its weights (no peft needed)
- ``multitask/``   every weight of the multi-head model in one safetensors file (``encoder.*``,
                   ``heads.<task>.*``) and ``multitask.json`` (tasks, labels, encoder prefix): the
                   state a later stage continues from (``load_multitask_weights``); with ``model.lora``
                   the encoder's keys are peft's (``base_layer``, ``lora_A``/``lora_B``) and ``multitask.json``
                   holds the ``lora`` settings

Each folder's ``ftdist_export.json`` is written last (complete-export marker, as ``ftdist.export``).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from ftdist import run_folder as layout
from ftdist import storage
from ftdist.config import RunConfig
from ftdist.uri import join_uri
from ftdist.export import full_state_dict
from ftdist.export_files import EXPORT_MARKER, write_marker
from ftdist.lora import merged_task_model
from ftdist.multitask.model import task_state_dict
from ftdist.redaction import redact

MULTIHEAD_INFO = "multitask.json"
MULTIHEAD_WEIGHTS = "model.safetensors"


def export_multitask(engine: Any, cfg: RunConfig, tasks: list[Any], tokenizer: Any, uri: str, rank: int,
                     extra: dict[str, Any]) -> dict[str, str]:
    """Write every task's folder and the multi-head folder (collective under ZeRO-3: all ranks call)."""
    full = full_state_dict(engine, cfg.deepspeed.zero_stage)
    uris = {t.name: join_uri(uri, t.name) for t in tasks}
    if rank != 0 or full is None:
        return uris
    full = {k: v.cpu().contiguous() for k, v in full.items()}
    model = engine.module
    base = {"run": cfg.run.name, "base_model": redact(cfg.model.path), **extra}
    for t in tasks:
        with tempfile.TemporaryDirectory(prefix="ftdist-export-") as tmp, model.task_model(t.name) as hf:
            weights = task_state_dict(full, model.prefix, t.name)
            if model.lora_config is None:
                hf.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
            else:
                merged_task_model(hf.config, model.lora_config, model.prefix, weights).save_pretrained(
                    tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            _marker(tmp, {**base, "task": cfg.model.task, "multitask_task": t.name, "label_names": t.view.label_names})
            storage.upload_dir(tmp, uris[t.name], cfg.storage, last=EXPORT_MARKER)
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="ftdist-export-") as tmp:
        save_file(full, os.path.join(tmp, MULTIHEAD_WEIGHTS))
        info = {"prefix": model.prefix, "tasks": [{"name": t.name, "label_names": t.view.label_names,
                                                   "loss_weight": t.spec.loss_weight} for t in tasks],
                "lora": cfg.model.lora.model_dump() if cfg.model.lora else None}
        with open(os.path.join(tmp, MULTIHEAD_INFO), "w") as f:
            json.dump(info, f, indent=1)
        tokenizer.save_pretrained(tmp)
        _marker(tmp, {**base, "task": "multitask"})
        storage.upload_dir(tmp, join_uri(uri, layout.MULTITASK_HEADS), cfg.storage, last=EXPORT_MARKER)
    return uris


def _marker(folder: str, info: dict[str, Any]) -> None:
    write_marker(folder, EXPORT_MARKER, info)


def load_multitask_weights(model: Any, folder: str) -> None:
    """Load a multi-head export into a ``MultiTaskModel`` built for the same tasks (strict)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(os.path.join(folder, MULTIHEAD_WEIGHTS)), strict=True)
