"""``train.freeze``: named parts of a model (``embeddings``, ``layers:A-B``) resolved per architecture and frozen.

Why a name list rather than parameter regexes: the same config works for BERT, RoBERTa, DistilBERT,
GPT-2 and LLaMA-likes, whose modules are named differently; the names are resolved here from the
model itself. Frozen parameters get ``requires_grad = False`` before DeepSpeed builds the optimizer,
so they get no gradient, no Adam state and no weight decay, at every ZeRO stage.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ftdist.errors import UserError

#: what ``train.freeze`` accepts (validated in the schema; resolved against the model here)
FREEZE_PATTERN = re.compile(r"^(embeddings|layers:(\d+)(?:-(\d+))?)$")


def parse_freeze(name: str) -> tuple[str, range | None]:
    """``embeddings`` -> ("embeddings", None); ``layers:2`` / ``layers:0-3`` (inclusive) -> ("layers", range)."""
    m = FREEZE_PATTERN.match(name.strip())
    if m is None:
        raise ValueError(f"train.freeze: '{name}' is not a part name; use embeddings, layers:N or layers:A-B "
                         f"(blocks counted from 0, both ends included)")
    if m.group(1) == "embeddings":
        return "embeddings", None
    lo = int(m.group(2))
    hi = int(m.group(3)) if m.group(3) is not None else lo
    if hi < lo:
        raise ValueError(f"train.freeze: '{name}' ends before it starts; write layers:{hi}-{lo}")
    return "layers", range(lo, hi + 1)


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The architecture's body without the task head (``bert``, ``transformer``, ``distilbert``, ...)."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, torch.nn.Module) else model


def _model_type(model: torch.nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks: the first ``ModuleList`` in the body with one entry per
    layer (``encoder.layer`` of BERT/RoBERTa, ``transformer.layer`` of DistilBERT, ``h`` of GPT-2,
    ``layers`` of LLaMA)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, mod in _base(model).named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise UserError(f"train.freeze: cannot find the transformer blocks of a {_model_type(model)} model; "
                    f"freeze embeddings only, or remove train.freeze")


def embedding_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The input embeddings: the body's ``embeddings`` module (BERT-likes: tokens, positions, types and
    their LayerNorm), else its own ``Embedding`` children (GPT-2's ``wte``/``wpe``, LLaMA's
    ``embed_tokens``). A causal LM whose output layer is tied to the token embedding freezes it too."""
    base = _base(model)
    emb = getattr(base, "embeddings", None)
    if isinstance(emb, torch.nn.Module):
        return [emb]
    found: list[torch.nn.Module] = [m for m in base.children() if isinstance(m, torch.nn.Embedding)]
    if not found:
        raise UserError(f"train.freeze: cannot find the embeddings of a {_model_type(model)} model; "
                        f"freeze layers:A-B only, or remove train.freeze")
    return found


def frozen_parameters(model: torch.nn.Module, names: list[str]) -> list[torch.nn.Parameter]:
    """The parameters ``names`` stand for in ``model``; a block outside the model is one line."""
    mods: list[Any] = []
    for name in names:
        kind, layers = parse_freeze(name)
        if kind == "embeddings":
            mods += embedding_modules(model)
            continue
        blocks = transformer_blocks(model)
        assert layers is not None
        if layers.stop > len(blocks):
            raise UserError(f"train.freeze: '{name}' asks for block {layers.stop - 1} but the model has "
                            f"{len(blocks)} blocks (0-{len(blocks) - 1})")
        mods += [blocks[i] for i in layers]
    seen: dict[int, torch.nn.Parameter] = {}
    for mod in mods:
        for p in mod.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def apply_freeze(model: torch.nn.Module, names: list[str]) -> int:
    """Freeze the parts ``names`` name; returns how many weights were frozen."""
    params = frozen_parameters(model, names)
    for p in params:
        p.requires_grad_(False)
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)


def check_freeze(model_section: Any, names: list[str], local_path: str) -> None:
    """Driver-side check of ``train.freeze`` against the architecture, built on the meta device (no
    weights read), so a block the model does not have fails in one line before any worker starts."""
    if not names:
        return
    from transformers import AutoConfig

    from ftdist.tasks import auto_model_class

    m = model_section
    config = AutoConfig.from_pretrained(local_path, trust_remote_code=m.trust_remote_code, revision=m.revision)
    with torch.device("meta"):
        skeleton = auto_model_class(m.task).from_config(config, trust_remote_code=m.trust_remote_code)
    frozen_parameters(skeleton, names)
