"""Per-class linear SVMs with hard negative mining (thesis 3.1.3; knobs of the original code).

Objective: liblinear's L2-regularised L1-loss (hinge) SVM, ``sklearn.svm.LinearSVC(loss="hinge",
dual=True)``, C = 1e-3, bias multiplier 10 (``intercept_scaling``; the bias is regularised as in liblinear),
positive loss weight 2. Features are expected already scaled to a mean L2 norm of 20 (``norm_scale``).

Data: positives are the ground-truth boxes of the class; negatives are proposals whose IoU with every
ground-truth box of that class is < 0.3 (the caller passes that mask); the grey zone is never used.

Mining (``HardNegativeMiner``, one pass over the training images, in bounded memory): for every image and
class, the candidate negatives scoring above ``hard_threshold`` (-1.0001; before the first training every
candidate, since a zero model scores 0) join the class's negative cache. When a class has collected
``retrain_limit`` (2000) new hard negatives since its last training -- or its cache exceeds ``max_cache``
-- it is retrained, then negatives scoring below ``easy_threshold`` (-1.2) are evicted and, if the cache is
still larger than ``max_cache``, only the ``max_cache`` highest-scoring (hardest) are kept. ``finish``
retrains every class with new negatives since its last training. The cache holds feature rows
(``max_cache x D`` float32 per class at most, plus one image's candidates).

Classes are independent (a class's model depends only on its positives and its negatives' features), so a
class finished in an earlier, interrupted run can be restored (``restore``) and is then skipped by the pass;
``on_finished(c)`` is called as soon as each class's final model exists (R-CNN saves it to disk there).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


def norm_scale(features: np.ndarray, target: float = 20.0) -> float:
    """The factor that makes the mean L2 norm of ``features`` equal ``target``."""
    n = np.linalg.norm(np.asarray(features, np.float64).reshape(len(features), -1), axis=1).mean()
    return float(target / n) if n > 0 else 1.0


def fit_linear_svm(pos: np.ndarray, neg: np.ndarray, C: float = 1e-3, bias_multiplier: float = 10.0,
                   pos_weight: float = 2.0, max_iter: int = 5000, tol: float = 1e-4) -> tuple[np.ndarray, float]:
    """(w, b) of liblinear's L2-reg L1-loss SVM on positives vs negatives."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    X = np.concatenate([pos, neg]).astype(np.float64, copy=False)
    y = np.concatenate([np.ones(len(pos)), -np.ones(len(neg))])
    clf = LinearSVC(C=C, loss="hinge", dual=True, class_weight={1: pos_weight, -1: 1.0},
                    intercept_scaling=bias_multiplier, max_iter=max_iter, tol=tol, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    return clf.coef_.ravel().astype(np.float32), float(clf.intercept_[0])


class HardNegativeMiner:
    def __init__(self, num_classes: int, dim: int, C: float = 1e-3, bias_multiplier: float = 10.0,
                 pos_weight: float = 2.0, hard_threshold: float = -1.0001, easy_threshold: float = -1.2,
                 retrain_limit: int = 2000, max_cache: int = 20000, max_iter: int = 5000, fit=None, on_finished=None):
        self.num_classes, self.dim = num_classes, dim
        self.svm_kw = dict(C=C, bias_multiplier=bias_multiplier, pos_weight=pos_weight, max_iter=max_iter)
        self.hard_threshold, self.easy_threshold = hard_threshold, easy_threshold
        self.retrain_limit, self.max_cache = int(retrain_limit), int(max_cache)
        self.fit = fit or fit_linear_svm
        self.on_finished = on_finished
        self.restored = np.zeros(num_classes, bool)
        self.restored_stats: dict[int, dict] = {}
        self.W = np.zeros((num_classes, dim), np.float32)
        self.b = np.zeros(num_classes, np.float32)
        self.trained = np.zeros(num_classes, bool)
        self.pos: list[np.ndarray] = [np.zeros((0, dim), np.float32) for _ in range(num_classes)]
        self.cache: list[np.ndarray] = [np.zeros((0, dim), np.float32) for _ in range(num_classes)]
        self.new_since_train = np.zeros(num_classes, np.int64)
        self.retrains = np.zeros(num_classes, np.int64)
        self.peak_cache = np.zeros(num_classes, np.int64)

    def set_positives(self, c: int, features: np.ndarray) -> None:
        self.pos[c] = np.asarray(features, np.float32).reshape(-1, self.dim)

    def scores(self, X: np.ndarray, c: int | None = None) -> np.ndarray:
        if c is None:
            return X @ self.W.T + self.b
        return X @ self.W[c] + self.b[c]

    def add_image(self, X: np.ndarray, negative_mask: np.ndarray) -> None:
        """One image: ``X`` (R x D) scaled features of its proposals, ``negative_mask`` (R x C) True where the
        proposal is a negative candidate for the class (IoU < 0.3 with every ground-truth box of it)."""
        X = np.asarray(X, np.float32)
        for c in range(self.num_classes):
            if len(self.pos[c]) == 0 or self.restored[c]:
                continue
            cand = X[negative_mask[:, c]]
            if len(cand) == 0:
                continue
            hard = cand[self.scores(cand, c) > self.hard_threshold]
            if len(hard) == 0:
                continue
            self.cache[c] = np.concatenate([self.cache[c], hard])
            self.new_since_train[c] += len(hard)
            self.peak_cache[c] = max(self.peak_cache[c], len(self.cache[c]))
            if self.new_since_train[c] >= self.retrain_limit or len(self.cache[c]) > self.max_cache:
                self.retrain(c)

    def retrain(self, c: int) -> None:
        if len(self.pos[c]) == 0:
            return
        neg = self.cache[c]
        if len(neg) == 0:  # no negatives at all: a positive-only problem has no separating direction
            self.W[c], self.b[c] = 0.0, 1.0
        else:
            self.W[c], self.b[c] = self.fit(self.pos[c], neg, **self.svm_kw)
        self.trained[c] = True
        self.retrains[c] += 1
        self.new_since_train[c] = 0
        if len(neg):
            s = self.scores(neg, c)
            keep = s >= self.easy_threshold
            neg, s = neg[keep], s[keep]
            if len(neg) > self.max_cache:
                top = np.argsort(-s, kind="stable")[: self.max_cache]
                neg = neg[np.sort(top)]
            self.cache[c] = neg

    def restore(self, c: int, w: np.ndarray, b: float, stats: dict) -> None:
        """Class ``c``'s final model from an earlier run: the pass skips it from now on."""
        self.W[c], self.b[c] = np.asarray(w, np.float32), float(b)
        self.trained[c] = self.restored[c] = True
        self.restored_stats[c] = dict(stats)

    def finish(self) -> None:
        for c in range(self.num_classes):
            if self.restored[c] or not len(self.pos[c]):
                continue
            if self.new_since_train[c] > 0 or not self.trained[c]:
                self.retrain(c)
            if self.on_finished is not None:
                self.on_finished(c)

    def class_stats(self, c: int) -> dict:
        if c in self.restored_stats:
            return self.restored_stats[c]
        return {"positives": len(self.pos[c]), "cache": len(self.cache[c]), "peak_cache": int(self.peak_cache[c]),
                "retrains": int(self.retrains[c])}

    @property
    def has_model(self) -> np.ndarray:
        return np.array([len(p) > 0 for p in self.pos])

    def summary(self) -> dict:
        per_class = [self.class_stats(c) for c in range(self.num_classes)]
        return {k: [s[k] for s in per_class] for k in ("positives", "cache", "peak_cache", "retrains")} | {
            "restored_classes": int(self.restored.sum())}


def train_svms(batches: Sequence[tuple[np.ndarray, np.ndarray]], positives: Sequence[np.ndarray], **kw) -> HardNegativeMiner:
    """Convenience: positives per class, then one pass of ``(X, negative_mask)`` per image."""
    dim = next(p.shape[1] for p in positives if len(p)) if any(len(p) for p in positives) else batches[0][0].shape[1]
    miner = HardNegativeMiner(len(positives), dim, **kw)
    for c, p in enumerate(positives):
        miner.set_positives(c, p)
    for X, mask in batches:
        miner.add_image(X, mask)
    miner.finish()
    return miner
