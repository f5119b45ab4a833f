"""task=rcnn_segmentation's pipeline: region-based semantic segmentation with R-CNN features (thesis 3.2).

The stages (plain parts in ``models/rcnn/segments.py`` and ``models/rcnn/seg_regions.py``, the metric in
``transferrable/seg_eval.py``, the network's part in ``lightning_modules/rcnn_segmentation.py``):

1. masked region proposals for every train / val / test image: ~150 regions from a selective-search-style
   hierarchical grouping of Felzenszwalb segments (CPMC is not available), cached per image on disk;
2. optionally (``finetune: detection``) the backbone is first fine-tuned for detection on the same training
   images exactly as ``task=rcnn`` does it (``engine.rcnn.finetune``: selective-search windows, (N+1)-way
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
with an all-background baseline row; ``transferrable.rcnn_report``), ``segmentation_results.json``,
``segmentations.png`` (image | ground truth | prediction of the best variant for a few test images, VOC palette).
Metrics: ``test/<features>/<layer>/mean_iou``, ``test/mean_iou`` of the variant with the best validation mean IoU
(``rcnn_segmentation/main``), ``test/background_only/mean_iou``.

On N DDP processes (``hardware=ddp_cpu trainer.devices=N``, issue 19), as task=rcnn (``engine/rcnn.py``): segment
proposals (and the fine-tuning's window proposals) and region features are computed through ``trainer.predict`` over
the image indices (``sharded_map_on``: rank r takes images r, r + N, ...; each image's segment cache file written by
the rank computing it); every rank writes its images' feature rows into the scratch memmaps rank 0 made, and after a
barrier rank 0 alone saves the feature cache entries (every rank then reads the same rows). The optional detection
fine-tuning is task=rcnn's DDP fit. The regressors, thresholds and test evaluation are computed by every rank from
the same features (deterministic; no collective inside these long CPU stages), rank 0 writes the outputs and its
metrics are handed to every rank.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from engine.ranks import output_dir_of
from engine.rcnn import finetune, sharded_map_on
from lightning_modules.rcnn import RCNNModule
from lightning_modules.rcnn_segmentation import RCNNSegmentationModule
from models.rcnn.feature_rows import RegionIndex
from models.rcnn.proposals import ProposalCache
from models.rcnn.seg_regions import paste_labels, region_quality
from models.rcnn.segments import SegmentCache, SegmentProposals
from models.rcnn.svm import norm_scale
from models.rcnn.windows import ImageSet
from transferrable.artifact_cache import digest
from transferrable.atomic import atomic_write_json
from transferrable.distributed import gather_objects, initialized
from transferrable.errors import ConfigError
from transferrable.feature_cache import FeatureCache, state_sha256
from transferrable.log_results import log_results
from transferrable.precision import inference_bf16
from transferrable.rcnn_report import draw_label_maps, segmentation_tables
from transferrable.report_core import render_table
from transferrable.seg_eval import ConfusionMatrix
from transferrable.task_defaults import plain, task_config

log = logging.getLogger(__name__)

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


# -- the whole task ----------------------------------------------------------------------------------------
def run(cfg: DictConfig, trainer, datamodule, model: RCNNSegmentationModule) -> dict:
    """The stages of the module docstring, in order; returns the run's metrics (under DDP: rank 0's, on every rank)."""
    with output_dir_of(trainer, Path(cfg.paths.output_dir)) as out:  # rank 0: the run's; others: scratch
        metrics = _run(cfg, trainer, datamodule, model, out)
    if trainer.world_size > 1 and initialized():
        metrics = gather_objects(metrics)[0]
    return metrics


def _run(cfg: DictConfig, trainer, datamodule, model: RCNNSegmentationModule, output_dir: Path) -> dict:
    t_all = time.perf_counter()
    sc = model.cfg
    model.use_bf16 = inference_bf16(sc["bf16"], trainer.precision)
    datamodule.setup("fit")
    mean, std = datamodule.mean, datamodule.std
    cache_dir = cfg.paths.get("cache_dir")
    cache_root = Path(cache_dir) if (sc["cache"] and cache_dir) else None
    root_tag = digest(str(getattr(datamodule, "root", "")), 10)
    model.stats.clear()
    timing: dict[str, float] = {}
    items = split_items(datamodule, sc, cfg.get("seed"))  # 1. regions
    seg_cache = SegmentCache(None if cache_root is None else cache_root / "segments" / root_tag,
                             SegmentProposals(**sc["segments"]))
    log.info("rcnn_segmentation: segment proposals (%s) for %s images", seg_cache.tag,
             "/".join(str(len(v)) for v in items.values()))
    splits = {k: regions(k, v, seg_cache, timing, trainer, model) for k, v in items.items()}
    info: dict[str, Any] = {"dataset_summary": getattr(datamodule, "summary", {}),
                            "images": {k: len(v) for k, v in splits.items()},
                            "regions_per_image": {k: float(np.mean(v.counts)) for k, v in splits.items()}}
    targets = {k: quality_targets(d, model.num_classes, sc["quality"]) for k, d in splits.items()}
    metrics: dict[str, Any] = {"rcnn_segmentation/best_region_overlap": best_region_overlap(splits["test"],
                                                                                           targets["test"])}
    if sc["finetune"] == "detection":  # 2. optional detection fine-tuning
        log.info("rcnn_segmentation: fine-tuning the backbone for detection first")
        info["finetune"] = finetune_for_detection(trainer, model, items["train"], mean, std, cache_root, root_tag,
                                                  cfg.get("seed"))
    model.eval()
    weights = state_sha256(model.backbone)
    fcache = FeatureCache(cache_root / "features" if cache_root is not None else output_dir / ".features",
                          enabled=cache_root is not None)  # 3. features
    feats = {k: split_features(model, d, mean, std, fcache, weights, seg_cache.tag, timing, trainer)
             for k, d in splits.items()}
    info["feature_cache"] = dict(model.stats)
    variants = fit_variants(model, feats, targets, splits, metrics)  # 4-6. regressors, thresholds, test
    bg = test_baselines(model.num_classes, splits["test"], targets["test"], metrics)
    main = max(variants, key=lambda k: (variants[k]["val_mean_iou"], -list(variants).index(k)))
    metrics["test/mean_iou"] = variants[main]["mean_iou"]
    metrics["rcnn_segmentation/main"] = main
    metrics["rcnn_segmentation/finetune"] = sc["finetune"]
    metrics["rcnn_segmentation/total_seconds"] = time.perf_counter() - t_all
    info["timing"] = dict(timing)
    info["segment_cache"] = dict(seg_cache.stats)
    if trainer.is_global_zero:
        write_outputs(trainer, datamodule, model, output_dir, splits["test"], variants, bg, main, metrics, info,
                      seg_cache.proposals.params)
    return metrics


# -- 1. regions and their targets ------------------------------------------------------------------------
def split_items(datamodule, sc: dict, seed) -> dict[str, list[dict]]:
    """train / val / test items (each limited by ``max_*_images``); no val split: ``val_fraction`` of train."""
    ds = datamodule.datasets
    if "train" not in ds or "test" not in ds:
        raise ConfigError("rcnn_segmentation: the data module needs train and test splits")

    def read(key, limit):
        n = len(ds[key]) if not limit else min(len(ds[key]), int(limit))
        return [ds[key][i] for i in range(n)]

    train = read("train", sc["max_train_images"])
    if ds.get("val") is not None and len(ds["val"]):
        val = read("val", sc["max_val_images"])
    else:  # no validation split: hold out a seeded fraction of the training images for the thresholds
        n_val = max(1, int(round(float(sc["val_fraction"]) * len(train))))
        if n_val >= len(train):
            raise ConfigError(f"rcnn_segmentation.val_fraction={sc['val_fraction']} leaves no training image")
        perm = np.random.default_rng(seed).permutation(len(train))
        val = [train[i] for i in np.sort(perm[:n_val])][: sc["max_val_images"] or None]
        train = [train[i] for i in np.sort(perm[n_val:])]
    return {"train": train, "val": val, "test": read("test", sc["max_test_images"])}


def regions(name: str, items: list[dict], cache: SegmentCache, timing: dict, trainer=None,
            model: RCNNSegmentationModule | None = None) -> SegSplit:
    from tqdm import tqdm

    t = time.perf_counter()
    if trainer is not None and trainer.world_size > 1:  # sharded by image, gathered on every rank
        regs = sharded_map_on(trainer, model, len(items), lambda i: cache.get(items[i]["image_id"], items[i]["image"]))
    else:
        regs = [cache.get(it["image_id"], it["image"]) for it in tqdm(items, desc=f"segments ({name})", unit="img",
                                                                       leave=False, disable=len(items) < 20)]
    timing[f"segments_{name}"] = time.perf_counter() - t
    return SegSplit(name, items, regs)


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


# -- 2. detection fine-tuning (task=rcnn's) ---------------------------------------------------------------
def detection_config(sc: dict) -> dict:
    """task=rcnn's node (conf/task/rcnn.yaml) with ``detection``'s proposals and fine-tuning (the whole
    ``finetune`` node, as its cache key has always been) and this task's geometry."""
    rc = plain(task_config("rcnn", "rcnn").rcnn)
    det = sc["detection"]
    rc.update(proposals=dict(det.get("proposals") or {}), finetune=dict(det["finetune"]), layers=["fc7"],
              scoring="svm", context_pad=sc["context_pad"], channels_last=sc["channels_last"])
    return rc


def finetune_for_detection(trainer, model: RCNNSegmentationModule, items: list[dict], mean, std,
                           cache_root: Path | None, root_tag: str, seed) -> dict:
    """Fine-tune ``model``'s backbone as task=rcnn does (a fresh (N+1)-way head around it), boxes from the masks."""
    rcnn = RCNNModule(model.backbone, model.num_classes, cfg=detection_config(model.cfg))
    pc = ProposalCache(None if cache_root is None else cache_root / "proposals" / root_tag, **rcnn.cfg["proposals"])
    props = sharded_map_on(trainer, model, len(items), lambda i: pc.get(items[i]["image_id"], items[i]["image"]))
    info = finetune(trainer, rcnn, ImageSet("train", items, props, True), mean, std, seed,
                    None if cache_root is None else cache_root / "rcnn_finetune")
    model.backbone.eval()
    return info


# -- 3. features -----------------------------------------------------------------------------------------
def split_features(model: RCNNSegmentationModule, data: SegSplit, mean, std, cache: FeatureCache, weights: str,
                   segment_tag: str, timing: dict, trainer=None) -> dict[tuple[str, str], np.ndarray]:
    """Features of every region of ``data`` for the base kinds (full, fg) the variants need, float16,
    cached per (kind, layer)."""
    from tqdm import tqdm

    if trainer is not None and trainer.world_size > 1:
        return split_features_sharded(trainer, model, data, mean, std, cache, weights, segment_tag, timing)
    base = base_kinds(model)
    keys = feature_keys(model, data, base, weights, segment_tag)
    out = {k: cache.load(f"rcnnseg-{data.name}-{k[0]}-{k[1]}", key) for k, key in keys.items()}
    if all(v is not None for v in out.values()):
        model.stats[f"feature_cache_{data.name}"] = "hit"
        return out
    model.stats[f"feature_cache_{data.name}"] = "miss"
    arrays = {k: np.zeros((data.num_regions, model.backbone.feature_dim(k[1])), np.float16) for k in keys}
    model.backbone.eval()
    t = time.perf_counter()
    for i in tqdm(range(len(data)), desc=f"features ({data.name})", unit="img", leave=False, disable=len(data) < 20):
        feats = model.image_features(data.images[i], data.masks(i), data.boxes[i], mean, std, base)
        for k in keys:
            arrays[k][data.rows(i)] = feats[k]
    timing[f"features_{data.name}"] = time.perf_counter() - t
    for k, key in keys.items():
        cache.save(f"rcnnseg-{data.name}-{k[0]}-{k[1]}", key, arrays[k])
    return arrays


def base_kinds(model: RCNNSegmentationModule) -> list[str]:
    return sorted({k for kind in model.kinds for k in kind.split("+")})


def feature_keys(model: RCNNSegmentationModule, data: SegSplit, base: list[str], weights: str,
                 segment_tag: str) -> dict[tuple[str, str], dict]:
    return {(k, layer): {"version": CACHE_VERSION, "weights": weights, "kind": k, "layer": layer,
                         "segments": segment_tag, "size": model.size, "pad": model.pad,
                         "ids": digest("\n".join(data.ids)),
                         "regions": data.num_regions, "bf16": model.use_bf16}
            for k in base for layer in model.layers}


def split_features_sharded(trainer, model: RCNNSegmentationModule, data: SegSplit, mean, std, cache: FeatureCache,
                           weights: str, segment_tag: str, timing: dict) -> dict[tuple[str, str], np.ndarray]:
    """:func:`split_features` on N DDP processes: the same cache entries, the images sharded by rank.

    Rank 0 makes one scratch memmap per (kind, layer) under the cache root; after a barrier every rank writes its
    images' rows into them (``sharded_map_on``) and flushes; after a second barrier every rank reads the complete
    rows and rank 0 alone saves the cache entries; after a third rank 0 removes the scratch files."""
    import torch.distributed as dist

    base = base_kinds(model)
    keys = feature_keys(model, data, base, weights, segment_tag)
    out = {k: cache.load(f"rcnnseg-{data.name}-{k[0]}-{k[1]}", key) for k, key in keys.items()}
    if all(gather_objects(all(v is not None for v in out.values()))):  # the segments' trainer.predict opened the group
        model.stats[f"feature_cache_{data.name}"] = "hit"
        return out
    model.stats[f"feature_cache_{data.name}"] = "miss"
    shapes = {k: (data.num_regions, model.backbone.feature_dim(k[1])) for k in keys}
    scratch = None
    if trainer.is_global_zero:
        cache.root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".rcnnseg-{data.name}-", dir=cache.root))
        for n, k in enumerate(keys):
            np.memmap(scratch / f"{n}.dat", dtype=np.float16, mode="w+", shape=shapes[k]).flush()
    scratch = Path(gather_objects(None if scratch is None else str(scratch))[0])  # a barrier: the files exist
    arrays = {k: np.memmap(scratch / f"{n}.dat", dtype=np.float16, mode="r+", shape=shapes[k])
              for n, k in enumerate(keys)}
    model.backbone.eval()
    t = time.perf_counter()

    def write(i: int) -> None:
        feats = model.image_features(data.images[i], data.masks(i), data.boxes[i], mean, std, base)
        for k in keys:
            arrays[k][data.rows(i)] = feats[k]

    sharded_map_on(trainer, model, len(data), write)
    model.stats[f"feature_images_by_rank_{data.name}"] = model.stats.get("images_by_rank")
    for a in arrays.values():
        a.flush()
    timing[f"features_{data.name}"] = time.perf_counter() - t  # this rank's share
    dist.barrier()  # every rank's rows are on disk
    arrays = {k: np.array(a) for k, a in arrays.items()}  # the complete rows, in memory as one process holds them
    if trainer.is_global_zero:
        for k, key in keys.items():
            cache.save(f"rcnnseg-{data.name}-{k[0]}-{k[1]}", key, arrays[k])
    dist.barrier()  # every rank has read the scratch files
    if trainer.is_global_zero:
        shutil.rmtree(scratch, ignore_errors=True)
    return arrays


def variant_matrix(feats: dict, kind: str, layer: str) -> np.ndarray:
    return np.concatenate([np.asarray(feats[(k, layer)], np.float32) for k in kind.split("+")], 1)


# -- 4. regression -----------------------------------------------------------------------------------------
def fit_regressors(X: np.ndarray, Y: np.ndarray, sc: dict) -> tuple[np.ndarray, np.ndarray]:
    """(W C x D, b C): one regressor per class from scaled features to region quality."""
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
    for c in range(Y.shape[1]):
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


def fit_variants(model: RCNNSegmentationModule, feats: dict, targets: dict, splits: dict, metrics: dict) -> dict:
    """Every (features, layer) variant: regressors on train, thresholds on val, IoU on test (into ``metrics``)."""
    sc = model.cfg
    grid = np.asarray(sc["thresholds"] if sc["thresholds"] is not None else np.arange(0.05, 0.81, 0.05), np.float32)
    variants: dict[str, dict] = {}
    for kind in model.kinds:
        for layer in model.layers:
            name = f"{kind}/{layer}"
            t0 = time.perf_counter()
            Xtr = variant_matrix(feats["train"], kind, layer)
            scale = norm_scale(Xtr[: min(len(Xtr), 20000)], float(sc["feature_norm"]))
            W, b = fit_regressors(Xtr * scale, targets["train"], sc)
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


# -- 5-6. thresholds and evaluation -----------------------------------------------------------------------
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


def write_outputs(trainer, datamodule, model: RCNNSegmentationModule, output_dir: Path, test: SegSplit,
                  variants: dict, bg: ConfusionMatrix, main: str, metrics: dict, info: dict,
                  segment_params: dict) -> None:
    """``tables.json``, ``segmentation_results.json``, ``segmentations.png``, and the numbers to the loggers."""
    sc = model.cfg
    class_names = list(getattr(datamodule, "class_names", None) or [str(i) for i in range(model.num_classes)])
    tables = segmentation_tables(variants, bg, class_names, model.num_classes, getattr(datamodule, "name", "dataset"),
                                 model.backbone.arch, sc["finetune"])
    atomic_write_json(output_dir / "tables.json", tables)
    grid = sc["thresholds"] if sc["thresholds"] is not None else np.arange(0.05, 0.81, 0.05)
    atomic_write_json(output_dir / "segmentation_results.json", {
        "classes": class_names, "main": main, "metrics": metrics, "info": info,
        "variants": {k: {kk: vv for kk, vv in v.items() if kk != "scores_test"} for k, v in variants.items()},
        "background_only": {"iou": bg.iou().tolist(), "mean_iou": bg.mean_iou()},
        "config": {"segments": segment_params, "features": model.kinds, "layers": model.layers,
                   "quality": sc["quality"], "regressor": sc["regressor"], "svr": sc["svr"],
                   "thresholds": np.asarray(grid, np.float32).tolist(), "finetune": sc["finetune"],
                   "input_size": model.size, "context_pad": model.pad}})
    log.info("rcnn_segmentation results:\n%s", "\n".join(render_table(t) for t in tables))
    images = {}
    if sc["draw_images"]:
        try:
            preds = label_maps(test, variants[main]["scores_test"], np.asarray(variants[main]["thresholds"]))
            images["rcnn_segmentation/label_maps"] = draw_label_maps(
                test, preds, output_dir / "segmentations.png", int(sc["draw_images"]), main)
        except Exception as err:  # noqa: BLE001 - a drawing failure must not lose the results
            log.warning("could not draw label maps: %s", err)
    log_results(trainer, metrics, images)
