"""Rows -> tensors, padded to the longest sequence in the batch (never to max_length)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100


def collate(rows: list[dict[str, Any]], pad_id: int, task: str, pad_to_multiple_of: int = 1,
            pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """Dynamic padding. Causal LM labels are the inputs with padding masked out (the model shifts)."""
    longest = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of > 1:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids_np = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask_np = np.zeros((len(rows), longest), dtype=np.int64)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids_np[i, :n] = r["input_ids"]  # numpy views from the reader, or lists
        mask_np[i, :n] = 1
    ids, mask = torch.from_numpy(ids_np), torch.from_numpy(mask_np)
    batch = {"input_ids": ids, "attention_mask": mask}
    if task in ("causal-lm", "masked-lm"):  # masked-lm: data.masking replaces these with the masked tokens
        batch["labels"] = ids.masked_fill(mask == 0, IGNORE_INDEX)
    elif task == "regression":  # one float per text (HF's regression head: num_labels 1, MSE)
        batch["labels"] = torch.as_tensor([r["label"] for r in rows], dtype=torch.float32)
    else:
        batch["labels"] = torch.as_tensor([r["label"] for r in rows], dtype=torch.long)
    batch["sample_id"] = torch.as_tensor([r["sample_id"] for r in rows], dtype=torch.long)
    if pin_memory:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


def pad_to_length(batch: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad an already collated batch to a fixed length (the max_length baseline in bench/)."""
    n, cur = batch["input_ids"].shape
    if cur >= length:
        return batch
    extra = length - cur
    out = dict(batch)
    out["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad_id)
    out["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0)
    if batch["labels"].dim() == 2:
        out["labels"] = torch.nn.functional.pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
    return out
