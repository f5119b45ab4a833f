"""Linear classifiers on frozen features, as in DeCAF (thesis ch. 2): multinomial logistic regression and a
linear SVM (scikit-learn), each optionally with feature *dropout*, and C chosen on a validation subsplit.

* ``logreg``: ``sklearn.linear_model.LogisticRegression`` (newton-cg, multinomial), L2-regularised by ``1/C``.
* ``svm``: ``sklearn.svm.LinearSVC`` (liblinear, squared hinge, one-vs-rest), L2-regularised by ``1/C``.
* ``<kind>_dropout``: the thesis's dropout on features -- at training time half of the features are set to
  zero at random (here: ``copies`` independently dropped copies of the training set are stacked, so the
  classifier sees several masks per sample), at test time every feature is multiplied by 0.5
  (generally ``1 - rate``).
* Features are first multiplied by one scalar so that the mean L2 norm of the training rows is 1: a
  single scale keeps zeros zero (so dropout's meaning is unchanged) and makes one C grid fit every feature.
* Cross-validation: a stratified train/validation subsplit of the *training* data (``val_fraction`` of each
  class, thesis: 5 of 30), every C of the grid fitted on the first part and scored (mean per-class
  accuracy) on the second; the best C (ties: the smaller, more regularised one) is then refit on all of
  the training data. Test data never enters the choice.
* ``solver``: ``sklearn`` (the estimators above) or ``torch`` (``models.torch_linear``: the same objectives with
  L-BFGS on float32, the C grid fitted along one warm-started path and the refit started from the chosen C's
  solution; 14x (logreg) and 5x (svm) the fits/s of scikit-learn at 101 classes x 30 x 1024 dims, bench/decaf_fits.py;
  the same accuracies within noise: tests/test_torch_linear.py).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KINDS = ("logreg", "svm")
SOLVERS = ("torch", "sklearn")
DROPOUT_SUFFIX = "_dropout"
LABELS = {"logreg": "LogReg", "svm": "SVM"}


@dataclass(frozen=True)
class ClassifierSpec:
    kind: str
    dropout: bool = False

    @property
    def name(self) -> str:
        return self.kind + (DROPOUT_SUFFIX if self.dropout else "")

    @property
    def label(self) -> str:
        """As the thesis's tables write it: ``LogReg``, ``SVM with Dropout``."""
        return LABELS[self.kind] + (" with Dropout" if self.dropout else "")

    @classmethod
    def parse(cls, name: str) -> ClassifierSpec:
        base, dropout = (name[: -len(DROPOUT_SUFFIX)], True) if name.endswith(DROPOUT_SUFFIX) else (name, False)
        if base not in KINDS:
            choices = [k + s for k in KINDS for s in ("", DROPOUT_SUFFIX)]
            raise ValueError(f"unknown classifier {name!r}; choices: {choices}")
        return cls(base, dropout)


def mean_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over the classes present in ``y_true`` of the fraction of that class predicted correctly."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0:
        return float("nan")
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


# -- dropout ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureDropout:
    """Train: ``copies`` copies of X, each with ``rate`` of its entries zeroed at random. Test: X * (1 - rate)."""

    rate: float = 0.5
    copies: int = 4

    def __post_init__(self):
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"dropout rate {self.rate}: expected 0 <= rate < 1")
        if self.copies < 1:
            raise ValueError(f"dropout copies {self.copies}: expected >= 1")

    def train_view(self, X: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        X = np.asarray(X, dtype=np.float32)
        stacked = np.concatenate([X] * self.copies, axis=0)
        keep = rng.random(stacked.shape, dtype=np.float32) >= self.rate
        return stacked * keep, np.concatenate([np.asarray(y)] * self.copies)

    def test_view(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float32) * np.float32(1.0 - self.rate)


# -- one classifier -----------------------------------------------------------------------------
def make_estimator(kind: str, C: float, max_iter: int = 1000, seed: int = 0):
    if kind == "logreg":
        from sklearn.linear_model import LogisticRegression

        # newton-cg: the same convex objective as lbfgs, 2-5x faster on these few-hundred-sample problems
        return LogisticRegression(C=C, solver="newton-cg", max_iter=max_iter, tol=1e-4)
    if kind == "svm":
        from sklearn.svm import LinearSVC

        return LinearSVC(C=C, max_iter=max_iter, dual="auto", random_state=seed)
    raise ValueError(f"unknown classifier kind {kind!r}; choices: {list(KINDS)}")


class LinearClassifier:
    """A ``ClassifierSpec`` with a fixed C: ``fit(X, y)``, ``predict(X)``."""

    def __init__(self, spec: ClassifierSpec, C: float, dropout: FeatureDropout | None = None, seed: int = 0,
                 max_iter: int = 1000, solver: str = "sklearn"):
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choices: {list(SOLVERS)}")
        self.spec, self.C, self.seed, self.max_iter, self.solver = spec, float(C), int(seed), int(max_iter), solver
        self.dropout = (dropout or FeatureDropout()) if spec.dropout else None
        self.scale = 1.0
        self.estimator = None
        self.constant: int | None = None  # a training set with one class predicts it everywhere

    def train_view(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(X, y) as the estimator is fitted on them: scaled (sets ``scale``), dropped out when ``spec.dropout``."""
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        norm = float(np.linalg.norm(X, axis=1).mean()) if len(X) else 0.0
        self.scale = 1.0 / norm if norm > 0 and math.isfinite(norm) else 1.0
        X = X * np.float32(self.scale)
        if self.dropout is not None:
            X, y = self.dropout.train_view(X, y, np.random.default_rng(self.seed))
        return X, y

    def fit(self, X: np.ndarray, y: np.ndarray, init=None) -> LinearClassifier:
        """``init``: a fitted torch model to start from (solver=torch; ignored by sklearn)."""
        from sklearn.exceptions import ConvergenceWarning

        X, y = self.train_view(X, y)
        if len(np.unique(y)) < 2:
            self.constant = int(y[0])
            return self
        if self.solver == "torch":
            from models.torch_linear import fit_path

            self.estimator = fit_path(self.spec.kind, X, y, [self.C], self.max_iter, init=init)[0]
            return self
        self.estimator = make_estimator(self.spec.kind, self.C, self.max_iter, self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.estimator.fit(X, y)
        return self

    def transform_test(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32) * np.float32(self.scale)
        return self.dropout.test_view(X) if self.dropout is not None else X

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self.constant is not None:
            return np.full(len(X), self.constant)
        return self.estimator.predict(self.transform_test(X))


def fit_grid(spec: ClassifierSpec, X: np.ndarray, y: np.ndarray, grid: Sequence[float],
             dropout: FeatureDropout | None = None, seed: int = 0, max_iter: int = 1000,
             solver: str = "sklearn") -> list[LinearClassifier]:
    """One classifier per C of ``grid`` on the same (X, y) and dropout masks. torch: one warm-started path."""
    if solver != "torch":
        return [LinearClassifier(spec, C, dropout, seed, max_iter, solver).fit(X, y) for C in grid]
    from models.torch_linear import fit_path

    first = LinearClassifier(spec, grid[0], dropout, seed, max_iter, solver)
    Xv, yv = first.train_view(X, y)
    if len(np.unique(yv)) < 2:
        return [LinearClassifier(spec, C, dropout, seed, max_iter, solver).fit(X, y) for C in grid]
    out = []
    for C, model in zip(grid, fit_path(spec.kind, Xv, yv, grid, max_iter), strict=True):
        clf = LinearClassifier(spec, C, dropout, seed, max_iter, solver)
        clf.scale, clf.estimator = first.scale, model
        out.append(clf)
    return out


# -- choosing C ---------------------------------------------------------------------------------
def validation_subsplit(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, val): ``round(val_fraction * n_c)`` of each class (at least 1, and at least 1 left to fit)
    held out for validation; a class with a single sample stays in ``fit``. Deterministic from ``seed``."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = min(max(int(round(val_fraction * len(idx))), 1), len(idx) - 1) if len(idx) >= 2 else 0
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def can_validate(y: np.ndarray) -> bool:
    """A validation subsplit needs every class to keep one sample for fitting and give one to validation."""
    _, counts = np.unique(np.asarray(y), return_counts=True)
    return len(counts) >= 2 and bool((counts >= 2).all())


def select_C(
    spec: ClassifierSpec,
    X_fit: np.ndarray,
    y_fit: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    grid: Sequence[float],
    dropout: FeatureDropout | None = None,
    seed: int = 0,
    max_iter: int = 1000,
    solver: str = "sklearn",
    fitted: dict | None = None,
) -> tuple[float, dict[float, float]]:
    """(best C, {C: validation mean per-class accuracy}); ties go to the smallest C. ``fitted``, when given, is
    filled with {C: classifier} (the torch refit starts from the chosen one)."""
    if not grid:
        raise ValueError("empty C grid")
    scores = {}
    grid = sorted(float(c) for c in grid)
    for C, clf in zip(grid, fit_grid(spec, X_fit, y_fit, grid, dropout, seed, max_iter, solver), strict=True):
        scores[C] = mean_class_accuracy(y_val, clf.predict(X_val))
        if fitted is not None:
            fitted[C] = clf
    best = max(scores.values())
    return next(C for C, s in scores.items() if s == best), scores


def fit_cross_validated(
    spec: ClassifierSpec,
    X: np.ndarray,
    y: np.ndarray,
    grid: Sequence[float],
    val_fraction: float = 1 / 6,
    default_C: float = 1.0,
    dropout: FeatureDropout | None = None,
    seed: int = 0,
    max_iter: int = 1000,
    C: float | None = None,
    solver: str = "sklearn",
) -> tuple[LinearClassifier, float, float]:
    """(classifier refit on all of X, chosen C, its validation accuracy). C is chosen on a
    ``validation_subsplit`` of (X, y) when every class has 2+ samples, else ``default_C`` is used (val NaN);
    a given ``C`` skips the search."""
    val_acc = float("nan")
    fitted: dict[float, LinearClassifier] = {}
    if C is None:
        if len(grid) > 1 and can_validate(y):
            fit_idx, val_idx = validation_subsplit(y, val_fraction, seed)
            C, scores = select_C(spec, X[fit_idx], y[fit_idx], X[val_idx], y[val_idx], grid, dropout, seed, max_iter,
                                 solver, fitted)
            val_acc = scores[C]
        else:
            C = float(grid[0]) if len(grid) == 1 else float(default_C)
    init = fitted[C].estimator if C in fitted else None
    clf = LinearClassifier(spec, C, dropout, seed, max_iter, solver).fit(X, y, init=init)
    return clf, float(C), val_acc


# -- domain adaptation --------------------------------------------------------------------------
def daume_augment(X: np.ndarray, domain: str) -> np.ndarray:
    """Daumé III's "frustratingly easy" feature augmentation: source rows become [x, x, 0], target rows
    [x, 0, x] (shared, source-only, target-only copies)."""
    X = np.asarray(X, dtype=np.float32)
    zeros = np.zeros_like(X)
    if domain == "source":
        return np.concatenate([X, X, zeros], axis=1)
    if domain == "target":
        return np.concatenate([X, zeros, X], axis=1)
    raise ValueError(f"domain {domain!r}: expected 'source' or 'target'")
