"""Per-class precision-recall curves of a detector (R-CNN's ``pr_curves.png``), one small panel per class."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transferrable.viz.plot_files import new_figure, save_plot

COLUMNS = 5


def plot_pr_curves(path: str | Path, curves: Sequence[tuple[np.ndarray, np.ndarray]], ap: Sequence[float],
                   class_names: Sequence[str], title: str, npos: Sequence[int] | None = None) -> Path:
    """``curves[c]`` = (recall, precision) of class ``c`` (the interpolated envelope,
    ``transferrable.metrics.voc_eval.precision_envelope``), drawn as the step whose area is the class's ``ap``.
    ``npos``: each class's number of (non-difficult) test objects, shown in its panel's title. The JSON beside the
    PNG holds each class's points and AP."""
    k = len(class_names)
    if len(curves) != k or len(ap) != k:
        raise ValueError(f"{len(curves)} curves and {len(ap)} APs for {k} classes")
    cols = min(COLUMNS, k)
    rows = math.ceil(k / cols)
    fig = new_figure(2.6 * cols, 2.4 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    data = {"title": title, "classes": []}
    for c in range(k):
        ax = axes[c // cols][c % cols]
        r, p = (np.asarray(v, float) for v in curves[c])
        a = float(ap[c])
        if len(r):
            # the step drawn is the integrated one: precision p_k held on (r_{k-1}, r_k]
            ax.step(np.concatenate([[0.0], r]), np.concatenate([p[:1], p]), where="pre", color="tab:blue")
            ax.fill_between(np.concatenate([[0.0], r]), np.concatenate([p[:1], p]), step="pre", alpha=0.15)
        elif not math.isnan(a):  # recall never rose: no detection of the class hit an object
            ax.text(0.5, 0.5, "no true positive", ha="center", va="center", color="gray", transform=ax.transAxes)
        label = "no test object" if math.isnan(a) else f"AP {a * 100:.1f}%"
        objects = f" ({int(npos[c])} obj.)" if npos is not None else ""
        ax.set_title(f"{class_names[c]}: {label}{objects}", fontsize=9)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        data["classes"].append({"name": class_names[c], "ap": None if math.isnan(a) else a,
                                "npos": None if npos is None else int(npos[c]), "recall": r.tolist(),
                                "precision": p.tolist()})
    for c in range(k, rows * cols):
        axes[c // cols][c % cols].set_visible(False)
    for row in axes:
        row[0].set_ylabel("precision")
    for ax in axes[-1]:
        ax.set_xlabel("recall")
    for c in range(max(0, k - cols), k):  # the last panel of each column carries the recall axis label
        axes[c // cols][c % cols].xaxis.set_tick_params(labelbottom=True)
        axes[c // cols][c % cols].set_xlabel("recall")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_plot(fig, path, data)
