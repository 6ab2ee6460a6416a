"""Masked-LM inputs and labels (``model.task: masked-lm``), by transformers' language-modeling collator.

Why a wrapper around ``DataCollatorForLanguageModeling`` rather than the collator as the loop's
collate function: the reader already pads and batches (dynamic padding, length bucketing), so only
the masking step is needed, and it must be *reproducible*: each batch is masked with a generator
seeded from (run seed, epoch, rank, batch index), so a run resumed mid-epoch masks the remaining
batches exactly as the uninterrupted run would have, and every validation pass masks the same
tokens (epoch-to-epoch validation losses compare the model, not the draw). Special tokens and
padding are never masked; a batch that drew no masked token gets one (its first maskable token),
because a masked-LM loss over zero tokens is NaN.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ftdist.data.collate import IGNORE_INDEX
from ftdist.errors import UserError

#: the key's first element for evaluation passes (training uses the epoch, >= 0)
EVAL_KEYS = {"validation": -1, "test": -2}


class Masker:
    """Masks a collated batch: ``input_ids`` with [MASK]/random/kept tokens, ``labels`` the originals."""

    def __init__(self, tokenizer: Any, probability: float, seed: int, model_path: str) -> None:
        from transformers import DataCollatorForLanguageModeling

        if tokenizer.mask_token is None:
            raise UserError(f"model.task masked-lm needs a tokenizer with a mask token; the tokenizer of "
                            f"'{model_path}' has none (use a BERT-style encoder, or model.task causal-lm)")
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=probability)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.seed = seed

    def __call__(self, batch: dict[str, torch.Tensor], key: tuple[int, ...]) -> dict[str, torch.Tensor]:
        ids, attention = batch["input_ids"], batch["attention_mask"]
        fixed = torch.isin(ids, self.special_ids) | (attention == 0)
        digest = hashlib.sha256(repr((self.seed, *key)).encode()).digest()
        self.collator.generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        inputs, labels = self.collator.torch_mask_tokens(ids.clone(), special_tokens_mask=fixed)
        if not (labels != IGNORE_INDEX).any():
            maskable = (~fixed).nonzero()
            if len(maskable):
                r, c = maskable[0].tolist()
                labels[r, c] = ids[r, c]
                inputs[r, c] = self.collator.tokenizer.mask_token_id
        return {**batch, "input_ids": inputs, "labels": labels}


def masked_tokens(labels: torch.Tensor) -> int:
    """Tokens a masked-LM loss is averaged over (the weight of a batch's loss in a split's mean)."""
    return int((labels != IGNORE_INDEX).sum())
