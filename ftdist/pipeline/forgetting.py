"""The forgetting matrix's summaries and its heatmap (pure: numbers in, numbers and PNG bytes out).

``R[i][j]``: the model after stage ``i`` on evaluation set ``j``; ``b[j]``: the starting model (before
stage 1) on set ``j``; ``s(j)``: the stage that declared set ``j`` (its diagonal entry is
``R[s(j)][j]``). The summaries are those of Lopez-Paz & Ranzato (2017, "Gradient Episodic Memory"),
with one set per task generalised to any number of sets per stage, T stages:

- ACC (average final performance) = mean over j of R[T][j]
- BWT (backward transfer) = mean over j with s(j) < T of R[T][j] - R[s(j)][j]
- FWT (forward transfer) = mean over j with s(j) > 1 of R[s(j)-1][j] - b[j]

Sets are grouped by metric (accuracy, perplexity), because averaging an accuracy with a perplexity
means nothing; each group records whether higher or lower is better. With a lower-is-better metric
(perplexity) a *positive* BWT is forgetting. Entries that cannot be measured (a classification set
before any stage trained its head) are ``None`` and are left out of the means, which say how many
terms they averaged. The starting model's entries on the first stage's sets enter no summary (FWT starts
at the second stage: :func:`fwt_uses`); the pipeline does not score them, and the matrix and heatmap
show entries that were not scored as such (``scored``), distinct from unmeasurable ones.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

DPI = 100


@dataclass(frozen=True)
class Column:
    name: str
    stage: int  # s(j), 0-based
    metric: str
    mode: str  # "max" or "min"
    split: str = ""  # the data set's split it is measured on (shown beside the metric)


Matrix = list[list[float | None]]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


NOT_SCORED = "not scored"  # an entry no summary uses, left unmeasured (an unmeasurable one shows "-" / "n/a")


def fwt_uses(stage: int) -> bool:
    """Whether FWT takes a term from the sets declared by ``stage`` (0-based): ``R[stage-1][j] - b[j]``
    exists only after a first stage, so the first stage's sets need neither."""
    return stage > 0


def summaries(R: Matrix, baseline: list[float | None], columns: list[Column]) -> dict[str, dict[str, Any]]:
    """ACC, BWT and FWT per metric (see the module docstring), with the number of terms of each."""
    T = len(R)
    out: dict[str, dict[str, Any]] = {}
    for metric in dict.fromkeys(c.metric for c in columns):
        idx = [j for j, c in enumerate(columns) if c.metric == metric]
        last = [R[T - 1][j] for j in idx]
        acc = [v for v in last if v is not None]
        bwt = [R[T - 1][j] - R[columns[j].stage][j] for j in idx  # type: ignore[operator]
               if columns[j].stage < T - 1 and R[T - 1][j] is not None and R[columns[j].stage][j] is not None]
        fwt = [R[columns[j].stage - 1][j] - baseline[j] for j in idx  # type: ignore[operator]
               if fwt_uses(columns[j].stage) and columns[j].stage < T and R[columns[j].stage - 1][j] is not None and baseline[j] is not None]
        out[metric] = {"direction": "higher is better" if columns[idx[0]].mode == "max" else "lower is better",
                       "mode": columns[idx[0]].mode, "sets": [columns[j].name for j in idx],
                       "acc": _mean(acc), "bwt": _mean(bwt), "fwt": _mean(fwt),
                       "terms": {"acc": len(acc), "bwt": len(bwt), "fwt": len(fwt)}}
    return out


def format_matrix(R: Matrix, baseline: list[float | None], rows: list[str], columns: list[Column],
                  scored: list[list[bool]] | None = None) -> list[str]:
    """The matrix as text lines: a row for the starting model, then one per stage. ``scored`` (rows:
    start, then each stage; default: all) marks entries that were not scored."""
    names = [f"{c.name} ({c.metric}{', ' + c.split if c.split else ''})" for c in columns]
    width = max(len(r) for r in ["after stage", "start", *rows])
    cw = [max(10, len(n)) for n in names]
    out = ["  " + "after stage".ljust(width) + "  " + "  ".join(n.rjust(w) for n, w in zip(names, cw))]
    marks = scored or [[True] * len(columns) for _ in range(len(R) + 1)]
    for (label, row), done in zip([("start", baseline), *zip(rows, R)], marks):
        cells = [NOT_SCORED if not d else "-" if v is None else f"{v:.4f}" for v, d in zip(row, done)]
        out.append("  " + label.ljust(width) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, cw)))
    return out


def heatmap_png(R: Matrix, baseline: list[float | None], rows: list[str], columns: list[Column],
                scored: list[list[bool]] | None = None) -> bytes:
    """Rows: the starting model, then each stage; columns: the sets. Each column is coloured on its own
    scale, darker = better (a perplexity and an accuracy share no scale; perplexity on a log scale); cells
    show the values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [baseline, *R]
    labels = ["start", *rows]
    shade = [[math.nan] * len(columns) for _ in table]
    for j, c in enumerate(columns):
        # perplexities span orders of magnitude (an initialised head: ~1e4): shaded on a log scale
        scale = (lambda v: math.log(max(v, 1e-12))) if c.metric == "perplexity" else (lambda v: v)
        vals = [scale(v) for v in (r[j] for r in table) if v is not None]
        lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
        for i, r in enumerate(table):
            v = r[j]
            if v is not None:
                x = 0.5 if hi == lo else (scale(v) - lo) / (hi - lo)
                shade[i][j] = x if c.mode == "max" else 1 - x
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(columns), 1.2 + 0.6 * len(table)), dpi=DPI)
    ax.imshow(shade, cmap="Blues", vmin=-0.2, vmax=1.2, aspect="auto")
    marks = scored or [[True] * len(columns) for _ in table]
    for i, r in enumerate(table):
        for j, v in enumerate(r):
            text = (NOT_SCORED if not marks[i][j] else "n/a" if v is None
                    else f"{v:.3f}" if abs(v) < 1000 else f"{v:.3g}")
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="grey" if not marks[i][j] else "white" if not math.isnan(shade[i][j]) and shade[i][j] > 0.6
                    else "black")
    ax.set_xticks(range(len(columns)), [f"{c.name}\n{c.metric} ({'↑' if c.mode == 'max' else '↓'})" for c in columns],
                  fontsize=8)
    ax.set_yticks(range(len(table)), labels, fontsize=8)
    ax.set_xlabel("evaluation set")
    ax.set_ylabel("model after stage")
    ax.set_title("R[after stage][on set] (colour per column, darker = better; perplexity: log scale)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()
