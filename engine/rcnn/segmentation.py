"""task=rcnn_segmentation's pipeline: region-based semantic segmentation with R-CNN features (thesis 3.2).

The stages (plain parts in ``models/rcnn/segments.py`` and ``models/rcnn/seg_regions.py``, the metric in
``transferrable/metrics/seg_eval.py``, the network's part in ``lightning_modules/rcnn_segmentation.py``):

1. masked region proposals for every train / val / test image: ~150 regions from a selective-search-style
   hierarchical grouping of Felzenszwalb segments (CPMC is not available), cached per image on disk;
2. optionally (``finetune: detection``) the backbone is first fine-tuned for detection on the same training
   images exactly as ``task=rcnn`` does it (``engine.rcnn.finetune.finetune``: selective-search windows, (N+1)-way
   head, 32 + 96 minibatches); boxes come from the instance masks. ``finetune: none`` keeps the source
   network frozen -- the thesis's setting ("without any fine-tuning");
3. features of every region, all variants in one pass: the warped context-padded box (*full*) and the same
   warp with the background replaced by the mean (*fg*), fc6 and fc7 (eval mode, no dropout), cached in
   ``${paths.cache_dir}/features`` (``transferrable.core.feature_cache``: weights hash, segments, geometry, ids);
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
with an all-background baseline row; ``engine.rcnn.report``), ``segmentation_results.json``,
``segmentations.png`` (image | ground truth | prediction of the best variant for a few test images, VOC palette).
Metrics: ``test/<features>/<layer>/mean_iou``, ``test/mean_iou`` of the variant with the best validation mean IoU
(``rcnn_segmentation/main``), ``test/background_only/mean_iou``.

On N DDP processes (``hardware=ddp_cpu trainer.devices=N``, issue 19), as task=rcnn (``engine/rcnn/pipeline.py``): segment
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
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from engine.rcnn.finetune import finetune
from engine.rcnn.report import draw_label_maps, segmentation_tables
from engine.rcnn.segmentation_features import SegSplit, split_features
from engine.rcnn.segmentation_scoring import (
    best_region_overlap,
    fit_variants,
    label_maps,
    quality_targets,
    test_baselines,
)
from lightning_modules.rcnn import RCNNModule
from lightning_modules.rcnn_segmentation import RCNNSegmentationModule
from models.rcnn.proposals import ProposalCache
from models.rcnn.segments import SegmentCache, SegmentProposals
from models.rcnn.windows import ImageSet
from transferrable.core.artifact_cache import digest
from transferrable.core.atomic import atomic_write_json
from transferrable.core.distributed import (
    gather_objects,
    initialized,
    output_dir_of,
    rank_aware,
    sharded_map_on,
)
from transferrable.core.errors import ConfigError
from transferrable.core.feature_cache import FeatureCache, state_sha256
from transferrable.core.log_results import log_results
from transferrable.core.precision import inference_bf16
from transferrable.core.progress import trainer_bars
from transferrable.core.task_defaults import plain, task_config
from transferrable.metrics.seg_eval import ConfusionMatrix
from transferrable.viz.tables import render_table

log = logging.getLogger(__name__)


@rank_aware
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
    variants = fit_variants(model, feats, targets, splits, metrics, bars=trainer_bars(trainer))  # 4-6. regressors, thresholds, test
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
    t = time.perf_counter()
    if trainer is not None:  # under DDP sharded by image, gathered on every rank
        regs = sharded_map_on(trainer, model, len(items), lambda i: cache.get(items[i]["image_id"], items[i]["image"]),
                              f"rcnn_segmentation: segments ({name})")
    else:
        regs = [cache.get(it["image_id"], it["image"]) for it in items]
    timing[f"segments_{name}"] = time.perf_counter() - t
    return SegSplit(name, items, regs)


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
    props = sharded_map_on(trainer, model, len(items), lambda i: pc.get(items[i]["image_id"], items[i]["image"]),
                           "rcnn_segmentation: proposals")
    info = finetune(trainer, rcnn, ImageSet("train", items, props, True), mean, std, seed,
                    None if cache_root is None else cache_root / "rcnn_finetune")
    model.backbone.eval()
    return info


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
