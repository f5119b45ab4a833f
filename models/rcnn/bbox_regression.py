"""Class-specific bounding-box regression (appendix 3.4.3): ridge regression from pool5 features to
t_x = (G_x - P_x) / P_w, t_y = (G_y - P_y) / P_h, t_w = log(G_w / P_w), t_h = log(G_h / P_h)
(centres and sizes of 0-based pixel-edge boxes: w = x2 - x1, centre x1 + w / 2), lambda = 1000, trained on
pairs whose IoU with their ground-truth box exceeds 0.6; applied once at test time.
"""

from __future__ import annotations

import numpy as np


def _centres(b: np.ndarray) -> tuple[np.ndarray, ...]:
    b = np.asarray(b, np.float64).reshape(-1, 4)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    return b[:, 0] + 0.5 * w, b[:, 1] + 0.5 * h, w, h


def encode(proposals: np.ndarray, gt: np.ndarray) -> np.ndarray:
    px, py, pw, ph = _centres(proposals)
    gx, gy, gw, gh = _centres(gt)
    pw, ph = np.maximum(pw, 1e-6), np.maximum(ph, 1e-6)
    return np.stack([(gx - px) / pw, (gy - py) / ph, np.log(np.maximum(gw, 1e-6) / pw),
                     np.log(np.maximum(gh, 1e-6) / ph)], 1)


def decode(proposals: np.ndarray, deltas: np.ndarray, max_log: float = np.log(1000.0 / 16)) -> np.ndarray:
    px, py, pw, ph = _centres(proposals)
    d = np.asarray(deltas, np.float64).reshape(-1, 4)
    cx, cy = pw * d[:, 0] + px, ph * d[:, 1] + py
    w, h = pw * np.exp(np.minimum(d[:, 2], max_log)), ph * np.exp(np.minimum(d[:, 3], max_log))
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], 1).astype(np.float32)


class BoxRegressor:
    """One ridge regressor (4 outputs) per class: ``fit(features, proposals, gt_boxes, classes)``,
    ``predict(features, proposals, class)``. The bias is not regularised (features are centred first)."""

    def __init__(self, num_classes: int, lam: float = 1000.0, min_iou: float = 0.6, min_pairs: int = 2):
        self.num_classes, self.lam, self.min_iou, self.min_pairs = num_classes, float(lam), float(min_iou), min_pairs
        self.models: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # class -> (mu, W, b)
        self.pairs: dict[int, int] = {}

    def fit_class(self, c: int, X: np.ndarray, proposals: np.ndarray, gt: np.ndarray) -> None:
        X = np.asarray(X, np.float64)
        if len(X) < self.min_pairs:
            return  # identity for this class
        T = encode(proposals, gt)
        mu, tmu = X.mean(0), T.mean(0)
        Xc = X - mu
        d = X.shape[1]
        if d <= len(X):
            W = np.linalg.solve(Xc.T @ Xc + self.lam * np.eye(d), Xc.T @ (T - tmu))
        else:  # dual form: cheaper when there are fewer pairs than dimensions
            W = Xc.T @ np.linalg.solve(Xc @ Xc.T + self.lam * np.eye(len(X)), T - tmu)
        self.models[int(c)] = (mu, W, tmu - 0.0)
        self.pairs[int(c)] = len(X)

    def fit(self, X: np.ndarray, proposals: np.ndarray, gt: np.ndarray, classes: np.ndarray,
            ious: np.ndarray) -> BoxRegressor:
        keep = np.asarray(ious) > self.min_iou
        for c in range(self.num_classes):
            m = keep & (np.asarray(classes) == c)
            self.fit_class(c, X[m], proposals[m], gt[m])
        return self

    def deltas(self, X: np.ndarray, c: int) -> np.ndarray:
        if int(c) not in self.models:
            return np.zeros((len(X), 4))
        mu, W, b = self.models[int(c)]
        return (np.asarray(X, np.float64) - mu) @ W + b

    def predict(self, X: np.ndarray, proposals: np.ndarray, c: int) -> np.ndarray:
        return decode(proposals, self.deltas(X, c))
