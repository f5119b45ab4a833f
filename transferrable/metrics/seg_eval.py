"""VOC segmentation accuracy: per-class intersection over union accumulated over the whole data set.

``ConfusionMatrix(n)`` (n = classes + background) accumulates ``update(pred, gt)`` over images with
``np.bincount`` on ``gt * n + pred``; pixels whose ground truth is void (255) are ignored (a prediction of
any label there counts nowhere). ``iou()`` is ``TP / (TP + FP + FN)`` per class over the data set, as the
VOC development kit computes it; a class that neither occurs nor is predicted anywhere is NaN and left out
of the mean (``mean_iou``). (The VOC palette for figures: ``transferrable/viz/palette.py``.)
"""

from __future__ import annotations

import numpy as np

VOID = 255


class ConfusionMatrix:
    def __init__(self, num_labels: int):
        self.n = int(num_labels)
        self.matrix = np.zeros((self.n, self.n), np.int64)  # rows: ground truth, columns: prediction

    def update(self, pred: np.ndarray, gt: np.ndarray) -> ConfusionMatrix:
        pred, gt = np.asarray(pred).ravel().astype(np.int64), np.asarray(gt).ravel().astype(np.int64)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction has {pred.size} pixels, ground truth {gt.size}")
        keep = gt != VOID
        pred, gt = pred[keep], gt[keep]
        if len(gt) and (gt.max() >= self.n or pred.max() >= self.n or pred.min() < 0):
            raise ValueError(f"labels outside 0..{self.n - 1} (ground truth max {gt.max()}, prediction max {pred.max()})")
        self.matrix += np.bincount(gt * self.n + pred, minlength=self.n * self.n).reshape(self.n, self.n)
        return self

    def iou(self) -> np.ndarray:
        tp = np.diag(self.matrix).astype(np.float64)
        denom = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, tp / denom, np.nan)

    def mean_iou(self) -> float:
        v = self.iou()
        return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")


def mean_iou(preds, gts, num_labels: int) -> tuple[float, np.ndarray]:
    cm = ConfusionMatrix(num_labels)
    for p, g in zip(preds, gts, strict=True):
        cm.update(p, g)
    return cm.mean_iou(), cm.iou()
