"""The suite's one confusion-matrix drawer (task=classify's test split, LRCN activity's test videos)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transferrable.viz.plot_files import new_figure, save_plot

MAX_ANNOTATED = 20  # classes up to which each cell prints its percentage


def plot_confusion(path: str | Path, counts: np.ndarray, classes: Sequence[str], title: str) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted) of ``counts`` as a PNG; the JSON
    beside it holds the counts, the row-normalised rates and the accuracy."""
    counts = np.asarray(counts, np.int64)
    k = len(classes)
    if counts.shape != (k, k):
        raise ValueError(f"confusion counts of shape {counts.shape} for {k} classes")
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    accuracy = float(np.trace(counts) / max(counts.sum(), 1))
    side = max(4.5, 0.45 * k + 2.5)
    fig = new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    font = 8 if k <= MAX_ANNOTATED else 5
    ticks = range(k) if k <= 60 else range(0, k, max(1, k // 30))
    ax.set_xticks(list(ticks), [classes[i] for i in ticks], rotation=90, fontsize=font)
    ax.set_yticks(list(ticks), [classes[i] for i in ticks], fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}\naccuracy {accuracy * 100:.1f}% ({int(counts.sum())} samples)", fontsize=10)
    if k <= MAX_ANNOTATED:
        for i in range(k):
            for j in range(k):
                if rates[i, j] >= 0.005:
                    ax.text(j, i, f"{rates[i, j] * 100:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.tight_layout()
    return save_plot(fig, path, {"title": title, "classes": list(classes), "counts": counts.tolist(),
                                 "rates": rates.tolist(), "accuracy": accuracy})
