"""A model's loss and task metrics over batches of a split: the one evaluation the training loop's
validation/test passes and the pipeline's forgetting matrix both use.

Why shared: a pipeline's R[i][i] must be the number the stage's own validation reported, not a second
implementation's approximation; both call :func:`evaluate_batches` with their own forward (the
DeepSpeed engine in the loop, a plain HF model in the pipeline). Sums are all-reduced across ranks
when a process group of more than one rank exists (a single process needs none). No Ray here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from ftdist.data.collate import collate
from ftdist.data.masking import Masker, masked_tokens
from ftdist.inference import class_scores
from ftdist.metrics import causal_lm_metrics, classification_metrics

CLASSIFICATION = "sequence-classification"


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def evaluate_batches(forward: Callable[[dict[str, torch.Tensor]], Any], batches: Iterable[list[dict[str, Any]]],
                     pad_id: int, task: str, num_labels: int | None, device: torch.device,
                     masker: Masker | None = None, mask_key: tuple[int, ...] = (), predictions: bool = False,
                     autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                     ) -> tuple[dict[str, float], list[tuple[int, int, list[float]]], list[list[int]] | None]:
    """Loss and metrics over ``batches`` (rows as the reader yields them), the predictions if asked
    (classification: sample id, predicted id, class scores), and the confusion matrix (classification).

    ``masker`` (masked LM): batch ``i`` is masked with key ``(*mask_key, i)``, so every pass over the
    same batches masks the same tokens (models are compared, not draws)."""
    k = num_labels or 1
    confusion = torch.zeros(k, k, dtype=torch.long)
    loss_sum, count = 0.0, 0.0
    preds: list[tuple[int, int, list[float]]] = []
    with torch.no_grad():
        for i, rows in enumerate(batches):
            batch = collate(rows, pad_id, task, pin_memory=device.type == "cuda")
            if masker is not None:
                batch = masker(batch, (*mask_key, i))
            with autocast():
                out = forward({k_: v.to(device, non_blocking=True) for k_, v in batch.items() if k_ != "sample_id"})
            if task == CLASSIFICATION:
                pred = out.logits.argmax(-1).cpu()
                labels = batch["labels"]
                confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
                loss_sum += out.loss.item() * len(rows)
                if predictions:
                    preds.extend(zip(batch["sample_id"].tolist(), pred.tolist(), class_scores(out.logits)))
            else:
                n_tok = masked_tokens(batch["labels"] if task == "masked-lm" else batch["labels"][:, 1:])
                loss_sum += out.loss.item() * n_tok
                count += n_tok
    if task == CLASSIFICATION:
        totals = all_reduce_sum([loss_sum] + confusion.flatten().tolist(), device)
        summed = torch.tensor(totals[1:]).reshape(k, k)
        metrics = classification_metrics(totals[0], summed)
    else:
        loss_sum, count = all_reduce_sum([loss_sum, count], device)
        metrics = causal_lm_metrics(loss_sum, count)
    if predictions and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, preds)
        preds = [p for part in gathered for p in part]
    matrix = summed.round().long().tolist() if task == CLASSIFICATION else None
    return metrics, sorted(preds), matrix
