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
