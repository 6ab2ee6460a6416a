"""LoRA adapters with the ``peft`` library: which modules to adapt, wrapping the model, merging for export.

Why LoRA: the base weights are frozen, so gradients and Adam state exist only for the low-rank
updates and the task head (a few percent of the parameters, or less); a model whose full training
state would not fit a worker trains with its weights alone in memory.

The task head of a classifier is new (random) and is trained in full (peft's ``modules_to_save``), with
the pooler it reads where there is one (``head_modules``);
a causal LM's head is the pre-trained output embedding and stays frozen like the rest of the base.
A multi-task model (``ftdist.multitask.model``) gets its adapters on the shared encoder alone
(``adapt_encoder``): its heads live outside the adapted module, so they train in full as they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ftdist.config import LoraSection
from ftdist.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: peft's own defaults cover BERT/RoBERTa (query, value), GPT-2 (c_attn), T5 (q, v), LLaMA-likes and
#: more; these fill gaps in its table. Architectures in neither fall back to every linear layer.
EXTRA_DEFAULT_TARGETS: dict[str, list[str]] = {"distilbert": ["q_lin", "v_lin"], "modernbert": ["Wqkv"]}
#: new task heads of classification models, trained in full (not adapted)
CLASSIFIER_HEADS = ("pre_classifier", "classifier", "score", "classification_head")


def default_target_modules(model_type: str) -> list[str] | str:
    """The modules LoRA adapts when ``model.lora.target_modules`` is unset: the attention query and value
    projections of the architecture (the LoRA paper's choice), or ``all-linear`` for unknown ones."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    targets = PEFT_DEFAULTS.get(model_type) or EXTRA_DEFAULT_TARGETS.get(model_type)
    return list(targets) if targets else "all-linear"


def target_modules(lora: LoraSection, model_type: str) -> list[str] | str:
    return lora.target_modules if lora.target_modules is not None else default_target_modules(model_type)


def head_modules(model: PreTrainedModel, task: str) -> list[str]:
    """Modules of a classifier's task head (trained in full); none for a causal LM.

    The head includes the pooler the classifier reads, where the model has one: BERT's
    ``bert.pooler`` (pre-trained for next-sentence prediction, if at all: sentence-embedding models
    such as all-MiniLM never train it) or DeBERTa's top-level ``pooler`` (new). Left frozen, the
    classifier learns on a fixed random-ish projection of [CLS]: on the demo, LoRA reached 0.70 test
    accuracy with a frozen pooler (bench/RESULTS.md)."""
    if task != "sequence-classification":
        return []
    names = [name for name, _ in model.named_children() if name in CLASSIFIER_HEADS or name == "pooler"]
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if base is not None and isinstance(getattr(base, "pooler", None), torch.nn.Module):
        names.append(f"{prefix}.pooler")
    return names


def check_targets(model: PreTrainedModel, targets: list[str] | str, path: str) -> None:
    """Every named target must be a module of the model (matched as peft does: by name suffix), before
    any worker starts. Why here: peft's own error comes from every worker, after Ray started."""
    if isinstance(targets, str):
        return  # all-linear: always resolvable
    names = [n for n, _ in model.named_modules() if n]
    from transformers.pytorch_utils import Conv1D  # GPT-2's projections

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    leaves = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if isinstance(mod, kinds)})
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise UserError(f"model.lora.target_modules: '{t}' is not a module of model '{path}'; its "
                            f"adaptable layers are named {', '.join(leaves[:12])}{', ...' if len(leaves) > 12 else ''}")


def check_lora_config(m: Any, local_path: str, shared_encoder: bool = False) -> None:
    """Driver-side check of ``model.lora`` against the model's architecture, built on the meta device
    (no weights read, no memory), so a bad target fails in one line before training. ``shared_encoder``
    (multi-task): the targets must be modules of the encoder, where the adapters go."""
    if m.lora is None:
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(local_path, trust_remote_code=m.trust_remote_code, revision=m.revision)
    with torch.device("meta"):
        skeleton = auto_class(m.task).from_config(config, trust_remote_code=m.trust_remote_code)
    if shared_encoder:
        skeleton = getattr(skeleton, skeleton.base_model_prefix)
    check_targets(skeleton, target_modules(m.lora, config.model_type), m.path)


def auto_class(task: str) -> Any:
    from ftdist.tasks import auto_model_class

    return auto_model_class(task)


def peft_config(lora: LoraSection, model: PreTrainedModel, task: str) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft's stub says int; any number scales
                      lora_dropout=lora.dropout,
                      target_modules=target_modules(lora, model.config.model_type),
                      modules_to_save=head_modules(model, task) or None,
                      task_type={"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}.get(task))


def apply_lora(model: PreTrainedModel, lora: LoraSection, task: str, path: str, checkpointing: bool = False) -> Any:
    """The model wrapped as a peft model: base frozen, adapters and the classifier head trainable."""
    from peft import get_peft_model

    check_targets(model, target_modules(lora, model.config.model_type), path)
    wrapped = get_peft_model(model, peft_config(lora, model, task))
    if checkpointing:
        # Checkpointed blocks recompute from their inputs; with frozen embeddings those inputs need
        # grad, or the adapters inside the blocks get none (peft's documented recipe).
        wrapped.enable_input_require_grads()
    return wrapped


def encoder_lora_config(lora: LoraSection, encoder: PreTrainedModel) -> Any:
    """peft's config for adapters on a bare encoder (no task type, no head to save)."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft's stub says int; any number scales
                      lora_dropout=lora.dropout,
                      target_modules=target_modules(lora, encoder.config.model_type))


def adapt_encoder(encoder: PreTrainedModel, lora: LoraSection, path: str, checkpointing: bool = False) -> Any:
    """In place: adapters injected into ``encoder``'s target layers, its base weights frozen; returns the
    peft config (what ``merged_task_model`` needs to rebuild the same layers). Why peft's ``LoraModel``
    on the encoder rather than ``get_peft_model`` on a whole model: a multi-task model's encoder is
    shared by several heads; the adapters belong to the encoder, and each head (outside it) keeps
    every weight trainable, as ``modules_to_save`` does for a single-task head."""
    from peft import LoraModel

    check_targets(encoder, target_modules(lora, encoder.config.model_type), path)
    config = encoder_lora_config(lora, encoder)
    LoraModel(encoder, config, "default")  # injects the adapters into encoder's modules and freezes the rest
    if checkpointing:
        encoder.enable_input_require_grads()  # see apply_lora
    return config


def merged_task_model(task_config: Any, lora_config: Any, prefix: str, state_dict: dict[str, torch.Tensor]) -> Any:
    """A plain ``AutoModelForSequenceClassification`` from a multi-task model's task state dict (encoder
    with adapters under ``<prefix>.``, the head's weights): the same adapters rebuilt on a fresh CPU
    model, the weights loaded strictly, the adapters folded into the encoder's weights."""
    from peft import LoraModel

    fresh = auto_class("sequence-classification").from_config(task_config)
    tuner = LoraModel(getattr(fresh, prefix), lora_config, "default")
    fresh.load_state_dict(state_dict, strict=True)
    setattr(fresh, prefix, tuner.merge_and_unload())
    return fresh


def is_lora(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged_model(trained: Any, state_dict: dict[str, torch.Tensor], task: str) -> Any:
    """A plain HF model with the adapters folded into the base weights, from the trained peft model's
    full state dict (gathered: under ZeRO-3 ``trained`` holds only partitions).

    Built afresh on CPU from the architecture's config, so it works the same at every ZeRO stage."""
    from peft import get_peft_model

    base_config = trained.get_base_model().config
    fresh = auto_class(task).from_config(base_config)
    cfg = trained.peft_config["default"]
    wrapped = get_peft_model(fresh, cfg)
    missing, unexpected = wrapped.load_state_dict(state_dict, strict=False)
    # Tied weights (a causal LM's output embedding) may be left out of the gathered dict.
    missing = [k for k in missing if not _is_tied(k, fresh)]
    if missing or unexpected:
        raise RuntimeError(f"LoRA state dict does not match the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return wrapped.merge_and_unload()


def _is_tied(key: str, model: PreTrainedModel) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    names = tied.keys() if isinstance(tied, dict) else tied
    return any(key.endswith(n) for n in names)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(all, trainable) parameters; under ZeRO-3 a parameter's full size is ``ds_numel`` (its local
    tensor is a partition or empty)."""
    total = trainable = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable
