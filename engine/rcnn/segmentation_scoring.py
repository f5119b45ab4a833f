"""R-CNN region segmentation's scoring (thesis 3.2): per-class regressors of region quality, the background
thresholds chosen on validation, label maps pasted from regions, and VOC mean IoU.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from engine.rcnn.segmentation_features import SegSplit, variant_matrix
from lightning_modules.rcnn_segmentation import RCNNSegmentationModule
from models.rcnn.seg_regions import paste_labels, region_quality
from models.rcnn.svm import norm_scale
from transferrable.core.progress import progress
from transferrable.metrics.seg_eval import ConfusionMatrix

log = logging.getLogger(__name__)


def quality_targets(d: SegSplit, num_classes: int, quality: str) -> np.ndarray:
    """Regions x classes: each region's overlap with the class's ground-truth segments (the regression target)."""
    return np.concatenate([region_quality(d.masks(i), d.gt[i], d.instances[i], num_classes, quality)
                           for i in range(len(d))])


def best_region_overlap(test: SegSplit, q_test: np.ndarray) -> float:
    """How well the proposals can cover the ground truth at best: mean over present classes of the best quality."""
    best = []
    for i in range(len(test)):
        q = q_test[test.rows(i)]
        present = np.unique(test.gt[i][(test.gt[i] > 0) & (test.gt[i] != 255)]) - 1
        best += [float(q[:, c].max()) if len(q) else 0.0 for c in present]
    return float(np.mean(best)) if best else float("nan")


def fit_regressors(X: np.ndarray, Y: np.ndarray, sc: dict, desc: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(W C x D, b C): one regressor per class from scaled features to region quality (SVRs: a ``desc`` bar)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    if sc["regressor"] == "ridge":
        from sklearn.linear_model import Ridge

        m = Ridge(alpha=float(sc["ridge_alpha"])).fit(X, Y)
        return m.coef_.astype(np.float32).reshape(Y.shape[1], -1), np.asarray(m.intercept_, np.float32)
    from sklearn.svm import LinearSVR

    svr = sc["svr"]
    W = np.zeros((Y.shape[1], X.shape[1]), np.float32)
    b = np.zeros(Y.shape[1], np.float32)
    for c in progress(range(Y.shape[1]), desc, enabled=bool(desc), unit="class"):
        loss = str(svr["loss"])
        # the primal solver (liblinear -s 11) is much faster with more regions than dimensions; the L1 loss
        # has only a dual solver
        reg = LinearSVR(C=float(svr["C"]), epsilon=float(svr["epsilon"]), dual=loss == "epsilon_insensitive",
                        loss=loss, max_iter=int(svr["max_iter"]), random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            reg.fit(X, Y[:, c])
        W[c], b[c] = reg.coef_, reg.intercept_[0]
    return W, b


def fit_variants(model: RCNNSegmentationModule, feats: dict, targets: dict, splits: dict, metrics: dict,
                 bars: bool = False) -> dict:
    """Every (features, layer) variant: regressors on train, thresholds on val, IoU on test (into ``metrics``);
    ``bars``: a bar of each variant's per-class fits."""
    sc = model.cfg
    grid = np.asarray(sc["thresholds"] if sc["thresholds"] is not None else np.arange(0.05, 0.81, 0.05), np.float32)
    variants: dict[str, dict] = {}
    for kind in model.kinds:
        for layer in model.layers:
            name = f"{kind}/{layer}"
            t0 = time.perf_counter()
            Xtr = variant_matrix(feats["train"], kind, layer)
            scale = norm_scale(Xtr[: min(len(Xtr), 20000)], float(sc["feature_norm"]))
            W, b = fit_regressors(Xtr * scale, targets["train"], sc, f"rcnn_segmentation: {name} regressors" if bars else "")
            del Xtr
            t_fit = time.perf_counter() - t0
            S = {k: variant_matrix(feats[k], kind, layer) * scale @ W.T + b for k in ("val", "test")}
            th, val_miou = choose_thresholds(splits["val"], S["val"], grid, model.num_classes,
                                             sc["per_class_thresholds"])
            cm = evaluate(splits["test"], S["test"], th, model.num_classes)
            variants[name] = {"iou": cm.iou().tolist(), "mean_iou": cm.mean_iou(), "val_mean_iou": val_miou,
                              "pixel_accuracy": cm.pixel_accuracy(), "thresholds": th.tolist(),
                              "feature_scale": scale, "fit_seconds": t_fit,
                              "seconds": time.perf_counter() - t0, "scores_test": S["test"]}
            metrics[f"test/{name}/mean_iou"] = cm.mean_iou()
            metrics[f"val/{name}/mean_iou"] = val_miou
            log.info("rcnn_segmentation: %s test mean IoU %.3f (val %.3f, %.0fs)", name, cm.mean_iou(),
                     val_miou, variants[name]["seconds"])
    return variants


def label_maps(data: SegSplit, scores: np.ndarray, thresholds: np.ndarray) -> list[np.ndarray]:
    return [paste_labels(data.masks(i), scores[data.rows(i)], thresholds) for i in range(len(data))]


def evaluate(data: SegSplit, scores: np.ndarray, thresholds: np.ndarray, num_classes: int,
             masks_cache=None) -> ConfusionMatrix:
    cm = ConfusionMatrix(num_classes + 1)
    for i in range(len(data)):
        m = masks_cache[i] if masks_cache is not None else data.masks(i)
        cm.update(paste_labels(m, scores[data.rows(i)], thresholds), data.gt[i])
    return cm


def choose_thresholds(val: SegSplit, scores: np.ndarray, grid: np.ndarray, num_classes: int,
                      per_class: bool = True) -> tuple[np.ndarray, float]:
    """The shared threshold from the grid with the best validation mean IoU, then one pass of per-class
    refinement (each class's threshold over the grid, the others fixed)."""
    unpacked_bytes = sum(n * h * w for n, (h, w) in zip(val.counts, val.shapes, strict=True))
    masks = [val.masks(i) for i in range(len(val))] if unpacked_bytes < 2e9 else None  # else unpack per use

    def score(th):
        return evaluate(val, scores, th, num_classes, masks).mean_iou()

    C = num_classes
    results = [(score(np.full(C, t, np.float32)), -i) for i, t in enumerate(grid)]
    best_val, neg_i = max(results)
    th = np.full(C, grid[-neg_i], np.float32)
    if per_class:
        for c in range(C):
            for t in grid:
                if t == th[c]:
                    continue
                trial = th.copy()
                trial[c] = t
                v = score(trial)
                if v > best_val + 1e-9:
                    best_val, th = v, trial
    return th, float(best_val)


def test_baselines(num_classes: int, test: SegSplit, q_test: np.ndarray, metrics: dict) -> ConfusionMatrix:
    """The regions' ceiling (pasting the true qualities: a region labelled when it overlaps a class's segment by
    more than half) and the all-background baseline, into ``metrics``; returns the latter's confusion matrix."""
    metrics["test/oracle_regions/mean_iou"] = evaluate(test, q_test, np.full(num_classes, 0.5, np.float32),
                                                       num_classes).mean_iou()
    bg = ConfusionMatrix(num_classes + 1)
    for g in test.gt:
        bg.update(np.zeros_like(g), g)
    metrics["test/background_only/mean_iou"] = bg.mean_iou()
    return bg
