"""Run plots, drawn on the driver from the summary: PNGs a person can open without any tool.

``plots/learning_curves.png``: the train loss per log line (and per epoch) against optimizer
steps, and the validation metric per epoch with the best epoch marked. ``plots/confusion_matrix.png``
(classification): the best checkpoint on the test split. Matplotlib's Agg backend (no display);
fixed figure sizes and DPI, so the images' dimensions are known (``FIGSIZE`` x ``DPI``).
"""

from __future__ import annotations

import io
from typing import Any

from ftdist import run_folder as layout
from ftdist import storage
from ftdist.config import RunConfig
from ftdist.uri import join_uri

DPI = 100
LEARNING_CURVES_SIZE = (10.0, 4.0)  # inches: 1000 x 400 pixels
CONFUSION_SIZE = (6.0, 5.0)  # inches: 600 x 500 pixels


def write_run_plots(cfg: RunConfig, summary: dict[str, Any]) -> list[str]:
    """Write the run's plots into its folder; returns their URIs (none when ``tracking.plots`` is off)."""
    if not cfg.tracking.plots or not summary.get("epochs"):
        return []
    written = []
    for name, png in ((layout.LEARNING_CURVES_PNG, learning_curves_png(summary)),
                      (layout.CONFUSION_MATRIX_PNG, confusion_matrix_png(summary))):
        if png is not None:
            uri = join_uri(cfg.run_uri(), name)
            storage.write_bytes(uri, png, cfg.storage)
            written.append(uri)
    return written


def _figure(size: tuple[float, float], ncols: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=size, dpi=DPI)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": the size stays FIGSIZE x DPI
    plt.close(fig)
    return buf.getvalue()


def learning_curves_png(summary: dict[str, Any]) -> bytes:
    """Left: train loss per log line and per epoch vs optimizer step; right: val metric per epoch, best marked."""
    epochs, metric = summary["epochs"], summary["eval_metric"]
    fig, (left, right) = _figure(LEARNING_CURVES_SIZE, 2)
    log = summary.get("train_log") or []
    if log:
        left.plot([p[0] for p in log], [p[1] for p in log], lw=1, alpha=0.7, label="train loss (log lines)")
    left.plot([e["step"] for e in epochs], [e["train_loss"] for e in epochs], "o-", label="train loss (epoch)")
    left.set_xlabel("optimizer step")
    left.set_ylabel("loss")
    left.legend(fontsize=8)
    left.set_title("training")
    xs, ys = [e["epoch"] for e in epochs], [e.get(f"val_{metric}") for e in epochs]
    right.plot(xs, ys, "o-", color="tab:green", label=f"val_{metric}")
    best = summary.get("best_epoch")
    if best in xs:
        right.plot([best], [ys[xs.index(best)]], "*", ms=16, color="tab:red", label=f"best (epoch {best})")
    right.set_xlabel("epoch")
    right.set_ylabel(f"val_{metric}")
    right.set_xticks(xs)
    right.legend(fontsize=8)
    right.set_title("validation")
    fig.tight_layout()
    return _png(fig)


def confusion_matrix_png(summary: dict[str, Any]) -> bytes | None:
    """The test confusion matrix with counts (rows: true class, columns: predicted); None if not classification."""
    conf = summary.get("test_confusion")
    if not conf:
        return None
    k = len(conf)
    names = summary.get("label_names") or [str(i) for i in range(k)]
    fig, ax = _figure(CONFUSION_SIZE)
    ax.imshow(conf, cmap="Blues")
    peak = max(max(row) for row in conf) or 1
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(conf[i][j]), ha="center", va="center",
                    color="white" if conf[i][j] > peak / 2 else "black", fontsize=9)
    ax.set_xticks(range(k), names[:k], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names[:k], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion matrix (best checkpoint)")
    fig.tight_layout()
    return _png(fig)
