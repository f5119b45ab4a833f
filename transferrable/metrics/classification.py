"""Classification metrics on label arrays (numpy only)."""

from __future__ import annotations

import numpy as np


def per_class_accuracy(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy of each class over its videos (NaN for a class without test videos)."""
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            out[c] = float((pred[mask] == c).mean())
    return out


def confusion_counts(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """K x K counts: row = true class, column = predicted class."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (np.asarray(labels, np.int64), np.asarray(pred, np.int64)), 1)
    return counts
