"""The shared encoder with one classification head per task.

Each head is the task's own ``AutoModelForSequenceClassification`` (so its shape is what HF builds
for that architecture: BERT's pooler + classifier, RoBERTa's two-layer head, DistilBERT's
pre_classifier + classifier) with its encoder taken out: the module tree holds the encoder once
(one set of weights for DeepSpeed and ZeRO partitioning), and a forward lends it to the active
task's model for the call. Why not hand-written heads: HF's own forward (pooling, dropout, loss)
runs unchanged, and exporting a task is that model's ``save_pretrained`` with the shared encoder
put back: a standard folder that ``AutoModelForSequenceClassification`` loads alone.

With ``model.lora`` the adapters go into the shared encoder (``adapt_encoder``: its base weights
frozen); the heads sit outside it and train in full.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

ENCODER = "encoder"
HEADS = "heads"


class MultiTaskModel(torch.nn.Module):
    """``forward(**batch)`` runs the task named by ``active_task`` (set by the loop before each
    batch: every batch holds one task). In training the loss is scaled by the task's loss weight."""

    def __init__(self, models: dict[str, Any], loss_weights: dict[str, float]) -> None:
        super().__init__()
        first = next(iter(models.values()))
        self.prefix: str = first.base_model_prefix  # "bert", "roberta", "distilbert", ...
        self.encoder = getattr(first, self.prefix)
        for m in models.values():
            del m._modules[self.prefix]  # the other tasks' freshly loaded encoders are dropped here
        self.heads = torch.nn.ModuleDict(models)
        self.loss_weights = dict(loss_weights)
        self.active_task: str = next(iter(models))
        self.config = first.config  # what DeepSpeed and HF utilities read (hidden size for ZeRO-3 buckets)
        self.lora_config: Any = None  # peft's LoraConfig of the encoder's adapters (model.lora), for the export

    def adapt_encoder(self, lora: Any, path: str, checkpointing: bool = False) -> None:
        """LoRA adapters into the shared encoder (``ftdist.lora.adapt_encoder``); the heads stay trainable."""
        from ftdist.lora import adapt_encoder

        self.lora_config = adapt_encoder(self.encoder, lora, path, checkpointing)

    @contextlib.contextmanager
    def task_model(self, name: str) -> Iterator[Any]:
        """Task ``name``'s full HF model (the shared encoder lent to it) for the duration of the block."""
        head = self.heads[name]
        head._modules[self.prefix] = self.encoder
        try:
            yield head
        finally:
            del head._modules[self.prefix]

    def forward(self, **inputs: Any) -> Any:
        with self.task_model(self.active_task) as model:
            out = model(**inputs)
        if self.training and out.loss is not None:
            out.loss = out.loss * self.loss_weights[self.active_task]
        return out


def task_state_dict(full: dict[str, Any], prefix: str, task: str) -> dict[str, Any]:
    """Task ``task``'s HF state dict (``<prefix>.*`` encoder keys + its head's keys) from the
    multi-task model's state dict (``encoder.*``, ``heads.<task>.*``)."""
    enc, head = f"{ENCODER}.", f"{HEADS}.{task}."
    out = {f"{prefix}.{k[len(enc):]}": v for k, v in full.items() if k.startswith(enc)}
    out.update({k[len(head):]: v for k, v in full.items() if k.startswith(head)})
    return out
