import torch

from ftdist.metrics import causal_lm_metrics, classification_metrics, majority_baseline, mfu


def test_classification_metrics():
    conf = torch.tensor([[3, 1], [0, 4]])
    m = classification_metrics(4.0, conf)
    assert abs(m["accuracy"] - 7 / 8) < 1e-9 and abs(m["loss"] - 0.5) < 1e-9
    f1_0, f1_1 = 2 * 1 * 0.75 / 1.75, 2 * 0.8 * 1 / 1.8
    assert abs(m["macro_f1"] - (f1_0 + f1_1) / 2) < 1e-9


def test_clm_baseline_mfu():
    assert abs(causal_lm_metrics(20.0, 10)["perplexity"] - 7.38905609893065) < 1e-9
    assert majority_baseline([1, 5, 4]) == 0.5 and majority_baseline(None) is None
    assert mfu(100, 1e12, 2, 600.0) == 6 * 100 * 1e12 / (600e12 * 2)
    assert mfu(100, 1.0, 1, None) is None
