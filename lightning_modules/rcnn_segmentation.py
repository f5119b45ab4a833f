"""task=rcnn_segmentation: region-based semantic segmentation with R-CNN features (thesis 3.2).

``run_task`` drives the stages (plain parts in ``models/rcnn/segments.py`` and ``models/rcnn/seg_regions.py``,
the metric in ``transferrable/seg_eval.py``):

1. masked region proposals for every train / val / test image: ~150 regions from a selective-search-style
   hierarchical grouping of Felzenszwalb segments (CPMC is not available), cached per image on disk;
2. optionally (``finetune: detection``) the backbone is first fine-tuned for detection on the same training
   images exactly as ``task=rcnn`` does it (``RCNNModule.finetune``: selective-search windows, (N+1)-way
   head, 32 + 96 minibatches); boxes come from the instance masks. ``finetune: none`` keeps the source
   network frozen -- the thesis's setting ("without any fine-tuning");
3. features of every region, all variants in one pass: the warped context-padded box (*full*) and the same
   warp with the background replaced by the mean (*fg*), fc6 and fc7 (eval mode, no dropout), cached in
   ``${paths.cache_dir}/features`` (``transferrable.feature_cache``: weights hash, segments, geometry, ids);
   *full+fg* concatenates them;
4. per variant (``features`` x ``layers``, Table 3.5's six columns by default) and class, a linear support
   vector regressor (``sklearn.svm.LinearSVR``; ``regressor: ridge`` is the fast fallback) from the features
   -- scaled so their mean L2 norm is 20, as R-CNN's SVMs -- to the region's quality for the class (its
   overlap with the class's ground-truth segments);
5. the thresholds below which a class's prediction counts as background are chosen on the validation
   split (or ``val_fraction`` of the training images when the data has no val split) by maximising mean
   IoU: one shared threshold over a grid, then one pass of per-class refinement;
6. test: regions pasted into a label map (highest predicted quality wins per pixel), VOC segmentation
   accuracy = per-class IoU over the test set (background included, void ignored) and its mean.

Outputs: ``tables.json`` (Table 3.5's layout -- mean IoU per variant -- and Table 3.7's per-class layout,
with an all-background baseline row), ``segmentation_results.json``, ``segmentations.png`` (image | ground
truth | prediction of the best variant for a few test images, VOC palette). Metrics:
``test/<features>/<layer>/mean_iou``, ``test/mean_iou`` of the variant with the best validation mean IoU
(``rcnn_segmentation/main``), ``test/background_only/mean_iou``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from lightning_modules.rcnn import _as_list
from models.backbones import TapBackbone
from models.rcnn.feature_rows import RegionIndex
from models.rcnn.regions import scaled_pad
from models.rcnn.seg_regions import paste_labels, region_quality, warp_full_and_fg
from models.rcnn.segments import SegmentCache, SegmentProposals
from transferrable.errors import ConfigError
from transferrable.log_results import log_results
from transferrable.precision import inference_bf16
from transferrable.seg_eval import ConfusionMatrix, colorize

log = logging.getLogger(__name__)

FEATURE_KINDS = ("full", "fg", "full+fg")
LAYERS = ("fc6", "fc7")
REGRESSORS = ("svr", "ridge")
FINETUNE = ("none", "detection")
CACHE_VERSION = 1


class SegSplit(RegionIndex):
    """One split in memory: ground truth, packed region masks, boxes, row offsets into the feature arrays."""

    def __init__(self, name: str, items: list[dict], regions: list[tuple[np.ndarray, np.ndarray]]):
        self.name = name
        self.ids = [it["image_id"] for it in items]
        self.images = [it["image"] for it in items]
        self.gt = [it["mask"] for it in items]
        self.instances = [it.get("instances") for it in items]
        self.shapes = [m.shape for m in self.gt]
        self.packed = [np.packbits(m.ravel()) for m, _ in regions]  # region masks, bit-packed (memory)
        self.counts = [len(m) for m, _ in regions]
        self.boxes = [b for _, b in regions]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def masks(self, i: int) -> np.ndarray:
        h, w = self.shapes[i]
        n = self.counts[i]
        return np.unpackbits(self.packed[i], count=n * h * w).reshape(n, h, w).astype(bool)


class RCNNSegmentationModule(L.LightningModule):
    REQUIRES_DATA = ("images", "masks")  # checked against the dataset before any work (transferrable/compat.py)

    def __init__(
        self,
        backbone: TapBackbone,
        num_classes: int,
        segments: dict | None = None,
        features: list[str] | str = FEATURE_KINDS,
        layers: list[str] | str = LAYERS,
        context_pad: float = 16.0,
        quality: str = "instance",
        regressor: str = "svr",
        svr: dict | None = None,
        ridge_alpha: float = 1.0,
        feature_norm: float = 20.0,
        thresholds: list[float] | None = None,
        per_class_thresholds: bool = True,
        finetune: str = "none",
        detection: dict | None = None,
        val_fraction: float = 0.2,
        max_train_images: int | None = None,
        max_val_images: int | None = None,
        max_test_images: int | None = None,
        feature_batch: int = 256,
        bf16: bool | None = None,
        channels_last: bool = True,
        cache: bool = True,
        cache_dir: str | None = None,
        draw_images: int = 6,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        # bf16 autocast of this task's own inference paths; null follows trainer.precision (run_task)
        self.use_bf16 = inference_bf16(bf16, None)
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.kinds, self.layers = _as_list(features), _as_list(layers)
        for v, ok, what in ((self.kinds, FEATURE_KINDS, "rcnn_segmentation.features"),
                            (self.layers, LAYERS, "rcnn_segmentation.layers"),
                            ([regressor], REGRESSORS, "rcnn_segmentation.regressor"),
                            ([finetune], FINETUNE, "rcnn_segmentation.finetune"),
                            ([quality], ("instance", "class"), "rcnn_segmentation.quality")):
            bad = [x for x in v if x not in ok]
            if bad or not v:
                raise ConfigError(f"{what}={v}: expected values from {list(ok)}")
        backbone.check_taps(self.layers)
        self.segment_cfg = dict(segments or {})
        self.svr_cfg = {"C": 0.01, "epsilon": 0.0, "loss": "squared_epsilon_insensitive", "max_iter": 2000, **(svr or {})}
        self.grid = np.asarray(thresholds if thresholds is not None else np.arange(0.05, 0.81, 0.05), np.float32)
        self.size = int(backbone.input_size)
        self.pad = scaled_pad(self.size, context_pad)
        self.timing: dict[str, float] = {}

    # -- data ---------------------------------------------------------------------------------------------
    def _split_items(self, datamodule) -> dict[str, list[dict]]:
        hp = self.hparams
        ds = datamodule.datasets
        if "train" not in ds or "test" not in ds:
            raise ConfigError("rcnn_segmentation: the data module needs train and test splits")

        def read(key, limit):
            n = len(ds[key]) if not limit else min(len(ds[key]), int(limit))
            return [ds[key][i] for i in range(n)]

        train = read("train", hp.max_train_images)
        if ds.get("val") is not None and len(ds["val"]):
            val = read("val", hp.max_val_images)
        else:  # no validation split: hold out a seeded fraction of the training images for the thresholds
            n_val = max(1, int(round(float(hp.val_fraction) * len(train))))
            if n_val >= len(train):
                raise ConfigError(f"rcnn_segmentation.val_fraction={hp.val_fraction} leaves no training image")
            perm = np.random.default_rng(hp.seed).permutation(len(train))
            val = [train[i] for i in np.sort(perm[:n_val])][: hp.max_val_images or None]
            train = [train[i] for i in np.sort(perm[n_val:])]
        return {"train": train, "val": val, "test": read("test", hp.max_test_images)}

    def _regions(self, name: str, items: list[dict], cache: SegmentCache) -> SegSplit:
        from tqdm import tqdm

        t = time.perf_counter()
        regions = [cache.get(it["image_id"], it["image"]) for it in tqdm(items, desc=f"segments ({name})", unit="img",
                                                                          leave=False, disable=len(items) < 20)]
        self.timing[f"segments_{name}"] = time.perf_counter() - t
        return SegSplit(name, items, regions)

    # -- detection fine-tuning (reuses task=rcnn's fine-tuning) ----------------------------------------------
    def finetune_for_detection(self, trainer: L.Trainer, items: list[dict], mean, std, cache_root: Path | None,
                               root_tag: str) -> dict:
        from lightning_modules.rcnn import ImageSet, RCNNModule
        from models.rcnn.proposals import ProposalCache

        det = dict(self.hparams.detection or {})
        rcnn = RCNNModule(self.backbone, self.num_classes, proposals=det.get("proposals"),
                          context_pad=self.hparams.context_pad, finetune=det.get("finetune"), layers=["fc7"],
                          scoring="svm", channels_last=self.hparams.channels_last, seed=self.hparams.seed,
                          cache=cache_root is not None, cache_dir=None if cache_root is None else str(cache_root))
        pc = ProposalCache(None if cache_root is None else cache_root / "proposals" / root_tag,
                           **dict(det.get("proposals") or {}))
        props = [pc.get(it["image_id"], it["image"]) for it in items]
        info = rcnn.finetune(trainer, ImageSet("train", items, props, True), mean, std)
        self.backbone.eval()
        return info

    # -- features -----------------------------------------------------------------------------------------
    def _autocast(self):
        if self.use_bf16 and self.device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    @torch.inference_mode()
    def image_features(self, image: np.ndarray, masks: np.ndarray, boxes: np.ndarray, mean, std,
                       kinds: list[str]) -> dict[tuple[str, str], np.ndarray]:
        """{(full|fg, fc6|fc7): R x D} of one image's regions."""
        full, fg = warp_full_and_fg(image, masks, boxes, self.size, self.pad, mean, std)
        inputs = {"full": full, "fg": fg}
        out: dict[tuple[str, str], list] = {}
        bs = int(self.hparams.feature_batch)
        for kind in kinds:
            x = inputs[kind]
            for s in range(0, len(x), bs):
                xb = x[s:s + bs].to(self.device)
                if self.hparams.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with self._autocast():
                    taps = self.backbone.forward_taps(xb, self.layers)
                for layer in self.layers:
                    out.setdefault((kind, layer), []).append(taps[layer].float().cpu())
        return {k: torch.cat(v).numpy() for k, v in out.items()}

    def split_features(self, data: SegSplit, mean, std, cache) -> dict[tuple[str, str], np.ndarray]:
        """Features of every region of ``data`` for the base kinds (full, fg) the variants need, float16,
        cached per (kind, layer)."""
        from tqdm import tqdm

        base = sorted({k for kind in self.kinds for k in kind.split("+")})
        keys = {(k, layer): {"version": CACHE_VERSION, "weights": self._digest, "kind": k, "layer": layer,
                             "segments": self._segment_tag, "size": self.size, "pad": self.pad,
                             "ids": hashlib.sha256("\n".join(data.ids).encode()).hexdigest(),
                             "regions": data.num_regions, "bf16": self.use_bf16}
                for k in base for layer in self.layers}
        out = {k: cache.load(f"rcnnseg-{data.name}-{k[0]}-{k[1]}", key) for k, key in keys.items()}
        if all(v is not None for v in out.values()):
            self.stats[f"feature_cache_{data.name}"] = "hit"
            return out
        self.stats[f"feature_cache_{data.name}"] = "miss"
        arrays = {k: np.zeros((data.num_regions, self.backbone.feature_dim(k[1])), np.float16) for k in keys}
        self.backbone.eval()
        t = time.perf_counter()
        for i in tqdm(range(len(data)), desc=f"features ({data.name})", unit="img", leave=False, disable=len(data) < 20):
            feats = self.image_features(data.images[i], data.masks(i), data.boxes[i], mean, std, base)
            for k in keys:
                arrays[k][data.rows(i)] = feats[k]
        self.timing[f"features_{data.name}"] = time.perf_counter() - t
        for k, key in keys.items():
            cache.save(f"rcnnseg-{data.name}-{k[0]}-{k[1]}", key, arrays[k])
        return arrays

    @staticmethod
    def variant_matrix(feats: dict, kind: str, layer: str) -> np.ndarray:
        return np.concatenate([np.asarray(feats[(k, layer)], np.float32) for k in kind.split("+")], 1)

    # -- regression ---------------------------------------------------------------------------------------
    def fit_regressors(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(W C x D, b C): one regressor per class from scaled features to region quality."""
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        if self.hparams.regressor == "ridge":
            from sklearn.linear_model import Ridge

            m = Ridge(alpha=float(self.hparams.ridge_alpha)).fit(X, Y)
            return m.coef_.astype(np.float32).reshape(Y.shape[1], -1), np.asarray(m.intercept_, np.float32)
        from sklearn.svm import LinearSVR

        W = np.zeros((Y.shape[1], X.shape[1]), np.float32)
        b = np.zeros(Y.shape[1], np.float32)
        for c in range(Y.shape[1]):
            loss = str(self.svr_cfg["loss"])
            # the primal solver (liblinear -s 11) is much faster with more regions than dimensions; the L1 loss
            # has only a dual solver
            reg = LinearSVR(C=float(self.svr_cfg["C"]), epsilon=float(self.svr_cfg["epsilon"]),
                            dual=loss == "epsilon_insensitive",
                            loss=loss, max_iter=int(self.svr_cfg["max_iter"]), random_state=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                reg.fit(X, Y[:, c])
            W[c], b[c] = reg.coef_, reg.intercept_[0]
        return W, b

    # -- labelling and thresholds -------------------------------------------------------------------------
    def label_maps(self, data: SegSplit, scores: np.ndarray, thresholds: np.ndarray) -> list[np.ndarray]:
        return [paste_labels(data.masks(i), scores[data.rows(i)], thresholds) for i in range(len(data))]

    def evaluate(self, data: SegSplit, scores: np.ndarray, thresholds: np.ndarray, masks_cache=None) -> ConfusionMatrix:
        cm = ConfusionMatrix(self.num_classes + 1)
        for i in range(len(data)):
            m = masks_cache[i] if masks_cache is not None else data.masks(i)
            cm.update(paste_labels(m, scores[data.rows(i)], thresholds), data.gt[i])
        return cm

    def choose_thresholds(self, val: SegSplit, scores: np.ndarray) -> tuple[np.ndarray, float]:
        """The shared threshold from the grid with the best validation mean IoU, then one pass of per-class
        refinement (each class's threshold over the grid, the others fixed)."""
        unpacked_bytes = sum(n * h * w for n, (h, w) in zip(val.counts, val.shapes, strict=True))
        masks = [val.masks(i) for i in range(len(val))] if unpacked_bytes < 2e9 else None  # else unpack per use

        def score(th):
            return self.evaluate(val, scores, th, masks).mean_iou()

        C = self.num_classes
        results = [(score(np.full(C, t, np.float32)), -i) for i, t in enumerate(self.grid)]
        best_val, neg_i = max(results)
        th = np.full(C, self.grid[-neg_i], np.float32)
        if self.hparams.per_class_thresholds:
            for c in range(C):
                for t in self.grid:
                    if t == th[c]:
                        continue
                    trial = th.copy()
                    trial[c] = t
                    v = score(trial)
                    if v > best_val + 1e-9:
                        best_val, th = v, trial
        return th, float(best_val)

    # -- the whole task -----------------------------------------------------------------------------------
    def run_task(self, trainer: L.Trainer, datamodule, output_dir: str | Path) -> dict:
        self.use_bf16 = inference_bf16(self.hparams.bf16, trainer.precision)
        from models.rcnn.svm import norm_scale
        from transferrable.atomic import atomic_write_json
        from transferrable.feature_cache import FeatureCache, state_sha256

        t_all = time.perf_counter()
        hp = self.hparams
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        datamodule.setup("fit")
        class_names = list(getattr(datamodule, "class_names", None) or [str(i) for i in range(self.num_classes)])
        mean, std = datamodule.mean, datamodule.std
        cache_root = Path(hp.cache_dir) if (hp.cache and hp.cache_dir) else None
        root_tag = hashlib.sha256(str(getattr(datamodule, "root", "")).encode()).hexdigest()[:10]
        self.stats: dict[str, Any] = {}

        # 1. regions
        items = self._split_items(datamodule)
        proposals = SegmentProposals(**self.segment_cfg)
        seg_cache = SegmentCache(None if cache_root is None else cache_root / "segments" / root_tag, proposals)
        self._segment_tag = seg_cache.tag
        log.info("rcnn_segmentation: segment proposals (%s) for %s images", seg_cache.tag,
                 "/".join(str(len(v)) for v in items.values()))
        splits = {k: self._regions(k, v, seg_cache) for k, v in items.items()}
        info: dict[str, Any] = {"dataset_summary": getattr(datamodule, "summary", {}),
                                "images": {k: len(v) for k, v in splits.items()},
                                "regions_per_image": {k: float(np.mean(v.counts)) for k, v in splits.items()}}
        # region quality targets, and how well the proposals can cover the ground truth at best
        targets = {}
        for k, d in splits.items():
            targets[k] = np.concatenate([region_quality(d.masks(i), d.gt[i], d.instances[i], self.num_classes,
                                                        hp.quality) for i in range(len(d))])
        best_overlap = []
        for i in range(len(splits["test"])):
            q = targets["test"][splits["test"].rows(i)]
            present = np.unique(splits["test"].gt[i][(splits["test"].gt[i] > 0) & (splits["test"].gt[i] != 255)]) - 1
            best_overlap += [float(q[:, c].max()) if len(q) else 0.0 for c in present]
        metrics: dict[str, Any] = {"rcnn_segmentation/best_region_overlap": float(np.mean(best_overlap)) if best_overlap else float("nan")}

        # 2. optional detection fine-tuning
        if hp.finetune == "detection":
            log.info("rcnn_segmentation: fine-tuning the backbone for detection first")
            info["finetune"] = self.finetune_for_detection(trainer, items["train"], mean, std, cache_root, root_tag)
        self.eval()
        self._digest = state_sha256(self.backbone)

        # 3. features
        fcache = FeatureCache(cache_root / "features" if cache_root is not None else Path(output_dir) / ".features",
                              enabled=cache_root is not None)
        feats = {k: self.split_features(d, mean, std, fcache) for k, d in splits.items()}
        info["feature_cache"] = dict(self.stats)

        # 4-6. regressors, thresholds, test
        variants: dict[str, dict] = {}
        for kind in self.kinds:
            for layer in self.layers:
                name = f"{kind}/{layer}"
                t0 = time.perf_counter()
                Xtr = self.variant_matrix(feats["train"], kind, layer)
                scale = norm_scale(Xtr[: min(len(Xtr), 20000)], float(hp.feature_norm))
                W, b = self.fit_regressors(Xtr * scale, targets["train"])
                del Xtr
                t_fit = time.perf_counter() - t0
                S = {k: self.variant_matrix(feats[k], kind, layer) * scale @ W.T + b for k in ("val", "test")}
                th, val_miou = self.choose_thresholds(splits["val"], S["val"])
                cm = self.evaluate(splits["test"], S["test"], th)
                variants[name] = {"iou": cm.iou().tolist(), "mean_iou": cm.mean_iou(), "val_mean_iou": val_miou,
                                  "pixel_accuracy": cm.pixel_accuracy(), "thresholds": th.tolist(),
                                  "feature_scale": scale, "fit_seconds": t_fit,
                                  "seconds": time.perf_counter() - t0, "scores_test": S["test"]}
                metrics[f"test/{name}/mean_iou"] = cm.mean_iou()
                metrics[f"val/{name}/mean_iou"] = val_miou
                log.info("rcnn_segmentation: %s test mean IoU %.3f (val %.3f, %.0fs)", name, cm.mean_iou(),
                         val_miou, variants[name]["seconds"])
        # the regions' ceiling: pasting with the true qualities (a region labelled when it overlaps a class's
        # segment by more than half)
        metrics["test/oracle_regions/mean_iou"] = self.evaluate(splits["test"], targets["test"],
                                                                np.full(self.num_classes, 0.5, np.float32)).mean_iou()
        bg = ConfusionMatrix(self.num_classes + 1)
        for g in splits["test"].gt:
            bg.update(np.zeros_like(g), g)
        metrics["test/background_only/mean_iou"] = bg.mean_iou()
        main = max(variants, key=lambda k: (variants[k]["val_mean_iou"], -list(variants).index(k)))
        metrics["test/mean_iou"] = variants[main]["mean_iou"]
        metrics["rcnn_segmentation/main"] = main
        metrics["rcnn_segmentation/finetune"] = hp.finetune
        metrics["rcnn_segmentation/total_seconds"] = time.perf_counter() - t_all
        info["timing"] = dict(self.timing)
        info["segment_cache"] = dict(seg_cache.stats)

        # tables, results, figure
        tables = self.tables(variants, bg, class_names, getattr(datamodule, "name", "dataset"))
        atomic_write_json(output_dir / "tables.json", tables)
        atomic_write_json(output_dir / "segmentation_results.json", {
            "classes": class_names, "main": main, "metrics": metrics, "info": info,
            "variants": {k: {kk: vv for kk, vv in v.items() if kk != "scores_test"} for k, v in variants.items()},
            "background_only": {"iou": bg.iou().tolist(), "mean_iou": bg.mean_iou()},
            "config": {"segments": proposals.params, "features": self.kinds, "layers": self.layers,
                       "quality": hp.quality, "regressor": hp.regressor, "svr": self.svr_cfg,
                       "thresholds": self.grid.tolist(), "finetune": hp.finetune, "input_size": self.size,
                       "context_pad": self.pad}})
        from transferrable.report import render_table

        print("\n".join(render_table(t) for t in tables), flush=True)
        images = {}
        if hp.draw_images:
            try:
                test = splits["test"]
                preds = self.label_maps(test, variants[main]["scores_test"], np.asarray(variants[main]["thresholds"]))
                images["rcnn_segmentation/label_maps"] = draw_label_maps(
                    test, preds, output_dir / "segmentations.png", int(hp.draw_images), main)
            except Exception as err:  # noqa: BLE001 - a drawing failure must not lose the results
                log.warning("could not draw label maps: %s", err)
        log_results(trainer, metrics, images)
        return metrics

    def tables(self, variants: dict, bg: ConfusionMatrix, class_names: list[str], dataset: str) -> list[dict]:
        tag = "detection fine-tuned" if self.hparams.finetune == "detection" else "frozen"
        cols = [f"{k.split('/')[0]} {k.split('/')[1]}" for k in variants]
        cells = [[100 * v["mean_iou"]] for v in variants.values()]  # one run: no std
        best = int(np.argmax([c[0] for c in cells]))
        t35 = {"title": f"Segmentation mean accuracy (%) = mean IoU over background + {self.num_classes} classes, "
                        f"{dataset} test, backbone {self.backbone.arch} ({tag}); all-background baseline "
                        f"{100 * bg.mean_iou():.1f} (Table 3.5 layout)",
               "corner": "", "columns": cols, "rows": [{"label": f"R-CNN ({tag})", "cells": cells}], "bold": [0, best]}

        def row(label, iou):
            iou = np.asarray(iou, np.float64)
            return {"label": label, "cells": [None if not math.isfinite(v) else [100 * v] for v in iou]
                    + [[100 * float(np.nanmean(iou))]]}

        rows = [row(f"{k.split('/')[0]} R-CNN {k.split('/')[1]}", v["iou"]) for k, v in variants.items()]
        rows.append(row("all background (baseline)", bg.iou()))
        t37 = {"title": f"Per-category segmentation accuracy (%) = IoU, {dataset} test ({tag}; Table 3.7 layout)",
               "corner": dataset, "columns": ["bg", *class_names, "mean"], "rows": rows,
               "bold": [best, len(class_names) + 1]}
        return [t35, t37]


def draw_label_maps(data: SegSplit, preds: list[np.ndarray], path: Path, n: int, variant: str) -> Path:
    """``n`` test images as rows of image | ground truth | prediction (VOC palette; void drawn as in VOC)."""
    from PIL import Image

    from callbacks.image_grid import save_image_grid

    n = min(n, len(data))
    H = max(data.shapes[i][0] for i in range(n))
    W = max(data.shapes[i][1] for i in range(n))
    up = max(1, int(round(160 / W)))
    tiles, titles = [], []
    for i in range(n):
        for arr, title in ((data.images[i], data.ids[i]), (colorize(data.gt[i]), "ground truth"),
                           (colorize(preds[i]), variant)):
            img = Image.fromarray(np.ascontiguousarray(arr)).resize((W * up, H * up), Image.NEAREST)
            tiles.append(np.asarray(img.convert("RGB")))
            titles.append(title)
    return save_image_grid(np.stack(tiles), path, nrow=3, titles=titles)
