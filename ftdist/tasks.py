"""Which transformers model head each ``model.task`` trains: the one place that maps tasks to Auto classes
(model loading, LoRA's architecture check and any later consumer ask here, so a new task is one entry)."""

from __future__ import annotations

from typing import Any


def auto_model_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

    return {"sequence-classification": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM,
            "masked-lm": AutoModelForMaskedLM}[task]
