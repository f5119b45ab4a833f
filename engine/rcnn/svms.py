"""R-CNN's per-class linear SVMs with hard negative mining (thesis 3.1.2; ``models.rcnn.svm``), cached per layer,
and the class-specific ridge box regressor on pool5.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from engine.rcnn.cache_keys import svm_key
from lightning_modules.rcnn import RCNNModule
from models.rcnn.bbox_regression import BoxRegressor
from models.rcnn.regions import assign_labels, class_max_iou
from models.rcnn.svm import HardNegativeMiner
from models.rcnn.windows import ImageSet
from transferrable.core.feature_cache import FeatureCache
from transferrable.core.progress import progress

log = logging.getLogger(__name__)


SVM_STATS = ("positives", "cache", "peak_cache", "retrains")


def svm_store(output_dir: Path | None) -> FeatureCache | None:
    """Per-class SVMs of this run on disk (``<output_dir>/svms``, one entry + manifest per class and layer,
    written atomically as each class finishes): a rerun in the same directory reuses the finished classes."""
    return None if output_dir is None else FeatureCache(Path(output_dir) / "svms")


def train_svms(model: RCNNModule, data: ImageSet, feats: np.ndarray, scale: float, layer: str = "fc7",
               store: FeatureCache | None = None, features: dict | None = None, bars: bool = False) -> HardNegativeMiner:
    """One linear SVM per class over ``feats`` (rows of ``data``'s regions, x ``scale``): the ground-truth boxes
    are the positives, regions under ``neg_threshold`` IoU with every box of the class the negatives, mined hard.
    With a ``store`` each class is saved as it finishes (keyed by ``features``, the pool5 key) and restored.
    ``bars``: a progress bar over the mining pass (every class's hard negatives, image by image)."""
    c = model.cfg["svm"]

    def save(k: int) -> None:
        key = svm_key(model, features, layer, scale, k)
        store.save(f"svm-{layer}-class{k:03d}", key, np.append(miner.W[k], miner.b[k]).astype(np.float32))
        st = miner.class_stats(k)
        store.save(f"svm-{layer}-class{k:03d}-stats", key, np.array([st[n] for n in SVM_STATS], np.int64))
        model.stats["svm_classes_trained"] = model.stats.get("svm_classes_trained", 0) + 1

    miner = HardNegativeMiner(model.num_classes, feats.shape[1], C=c["C"], bias_multiplier=c["bias_multiplier"],
                              pos_weight=c["pos_weight"], hard_threshold=c["hard_threshold"],
                              easy_threshold=c["easy_threshold"], retrain_limit=c["retrain_limit"],
                              max_cache=c["max_cache"], max_iter=c["max_iter"],
                              on_finished=None if store is None else save)
    if store is not None:
        _restore_svms(model, miner, store, features, layer, scale, feats.shape[1])
    _mine(model, miner, data, feats, scale, f"rcnn: {layer} SVM hard negatives" if bars else "")
    miner.finish()
    return miner


def _restore_svms(model: RCNNModule, miner: HardNegativeMiner, store: FeatureCache, features: dict | None,
                  layer: str, scale: float, dim: int) -> None:
    for k in range(model.num_classes):
        key = svm_key(model, features, layer, scale, k)
        wb = store.load(f"svm-{layer}-class{k:03d}", key)
        st = store.load(f"svm-{layer}-class{k:03d}-stats", key)
        if wb is not None and st is not None and wb.shape == (dim + 1,):
            miner.restore(k, wb[:-1], float(wb[-1]), dict(zip(SVM_STATS, st.tolist(), strict=True)))
    model.stats["svm_classes_reused"] = model.stats.get("svm_classes_reused", 0) + int(miner.restored.sum())
    if miner.restored.any():
        log.info("rcnn: %s SVMs of %d classes reused from %s", layer, int(miner.restored.sum()), store.root)


def _mine(model: RCNNModule, miner: HardNegativeMiner, data: ImageSet, feats: np.ndarray, scale: float,
          desc: str = "") -> None:
    """Positives (non-difficult ground truth), then one pass of hard negatives over every image (a ``desc`` bar)."""
    pos: dict[int, list] = {}
    for i in range(len(data)):
        g = data.gt[i]
        rows = np.arange(data.rows(i).start, data.rows(i).stop)[data.is_gt[i]]
        for r, lab, d in zip(rows, g["labels"], g["difficult"], strict=True):
            if not d:
                pos.setdefault(int(lab), []).append(feats[r])
    for k, v in pos.items():
        miner.set_positives(k, np.stack(v) * scale)
    if miner.restored[miner.has_model].all():  # every class restored: no pass over the features
        return
    threshold = model.cfg["svm"]["neg_threshold"]
    for i in progress(range(len(data)), desc, enabled=bool(desc), unit="img"):
        g = data.gt[i]
        X = feats[data.rows(i)] * scale
        miner.add_image(X, class_max_iou(data.boxes[i], g["boxes"], g["labels"], model.num_classes) < threshold)


def train_box_regressor(model: RCNNModule, data: ImageSet, pool5: np.ndarray, scale: float) -> BoxRegressor:
    """Class-specific ridge regression from pool5 to the box of the ground truth each region overlaps most."""
    bb = model.cfg["bbox_reg"]
    X, P, G, C, ious = [], [], [], [], []
    for i in range(len(data)):
        g = data.gt[i]
        if len(g["boxes"]) == 0:
            continue
        _, iou, arg = assign_labels(data.boxes[i], g["boxes"], g["labels"], 0.0)
        keep = iou > bb["min_iou"]
        rows = np.arange(data.rows(i).start, data.rows(i).stop)[keep]
        X.append(np.asarray(pool5[rows], np.float32) * scale)
        P.append(data.boxes[i][keep])
        G.append(g["boxes"][arg[keep]])
        C.append(g["labels"][arg[keep]])
        ious.append(iou[keep])
    reg = BoxRegressor(model.num_classes, bb["lam"], bb["min_iou"])
    if X:
        reg.fit(np.concatenate(X), np.concatenate(P), np.concatenate(G), np.concatenate(C), np.concatenate(ious))
    return reg
