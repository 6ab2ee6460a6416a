"""Evaluation metrics and speed figures (pure functions over summed counts)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ftdist.config import class_weights_mismatch
from ftdist.errors import UserError

# Dense bf16 peak per device, for MFU when train.peak_tflops is not set (vendor figures).
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def classification_metrics(loss_sum: float, confusion: torch.Tensor) -> dict[str, float]:
    """loss, accuracy and macro-F1 from a K x K confusion matrix (rows: true, cols: predicted)."""
    conf = confusion.double()
    n = conf.sum().item()
    tp = conf.diag()
    precision = tp / conf.sum(0).clamp(min=1)
    recall = tp / conf.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    present = (conf.sum(1) + conf.sum(0)) > 0  # classes absent from both truth and predictions don't count
    return {"loss": loss_sum / max(n, 1), "accuracy": tp.sum().item() / max(n, 1),
            "macro_f1": f1[present].mean().item() if present.any() else 0.0}


def regression_metrics(sums: list[float]) -> dict[str, float]:
    """loss (MSE), rmse and Pearson's r of predictions p against labels y, from the sums
    ``[n, sum (p-y)^2, sum y, sum p, sum y^2, sum p^2, sum p*y]`` (summable across ranks).
    r is 0 when either side is constant (a constant predictor explains nothing)."""
    n, sse, sy, sp, syy, spp, spy = sums
    n = max(n, 1.0)
    cov = spy - sy * sp / n
    var_y, var_p = syy - sy * sy / n, spp - sp * sp / n
    r = cov / math.sqrt(var_y * var_p) if var_y > 1e-12 and var_p > 1e-12 else 0.0
    return {"loss": sse / n, "rmse": math.sqrt(sse / n), "pearson": r}


def mean_predictor_rmse(train: dict[str, float] | None, test: dict[str, float] | None) -> float | None:
    """RMSE on the test split of always predicting the train split's mean label (the regression
    counterpart of the majority-class baseline): sqrt(var_test + (mean_test - mean_train)^2)."""
    if not train or not test or not test.get("count"):
        return None
    return math.sqrt(test["std"] ** 2 + (test["mean"] - train["mean"]) ** 2)


def causal_lm_metrics(loss_sum: float, tokens: float) -> dict[str, float]:
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def majority_baseline(label_counts: list[int] | None) -> float | None:
    """Accuracy of always predicting the most frequent class of a split."""
    if not label_counts or sum(label_counts) == 0:
        return None
    return max(label_counts) / sum(label_counts)


def class_weights(spec: str | list[float] | None, label_counts: list[int] | None, num_labels: int) -> list[float] | None:
    """Weights of the cross-entropy per class, from ``train.class_weights`` and the train split's counts.

    ``balanced`` is scikit-learn's rule, n / (K * count): each class then weighs as much in the loss
    as any other, whatever its share of the data (a class absent from train gets weight n / K)."""
    if spec is None:
        return None
    if spec == "balanced":
        if not label_counts:
            raise UserError("train.class_weights: balanced needs the train split's label counts, which its manifest "
                            "lacks; re-run `ftdist data prepare` or give one weight per class")
        n = sum(label_counts)
        return [n / (num_labels * max(c, 1)) for c in label_counts] + [1.0] * (num_labels - len(label_counts))
    if len(spec) != num_labels:
        raise UserError(class_weights_mismatch(len(spec), num_labels))
    return [float(w) for w in spec]


def peak_tflops(configured: float | None, device_type: str) -> float | None:
    if configured:
        return configured
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in KNOWN_PEAK_TFLOPS.items() if k in name), None)


def mfu(n_params: int, tokens_per_s: float, world_size: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation, nanoGPT-style: 6 * params * tokens/s over the devices' peak."""
    if not peak:
        return None
    return 6.0 * n_params * tokens_per_s / (peak * 1e12 * world_size)


def per_class_metrics(confusion: Any, label_names: list[str] | None) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class from a K x K confusion matrix (rows: true,
    cols: predicted). Why per class: accuracy and even macro-F1 hide a class the model never
    predicts; a class with no predictions (or no examples) scores 0, as macro-F1 counts it."""
    conf = torch.as_tensor(confusion, dtype=torch.float64)
    tp, predicted, support = conf.diag(), conf.sum(0), conf.sum(1)
    out = []
    for k in range(conf.shape[0]):
        p = (tp[k] / predicted[k]).item() if predicted[k] > 0 else 0.0
        r = (tp[k] / support[k]).item() if support[k] > 0 else 0.0
        out.append({"label": label_names[k] if label_names and k < len(label_names) else str(k),
                    "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r > 0 else 0.0,
                    "support": int(support[k].item())})
    return out
