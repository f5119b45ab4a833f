"""task=rcnn's pipeline: proposals -> warped regions -> CNN -> per-class SVMs (thesis 3.1), on ``RCNNModule``.

1. proposals for every train/test image (``models.rcnn.proposals``: selective search or sliding windows,
   cached per image on disk);
2. fine-tuning (:func:`finetune`): the backbone plus a fresh (N+1)-way head on fc7 is trained with SGD on warped
   windows, positives = proposals/GT with IoU >= 0.5 to a ground-truth box (its class), the rest background;
   every minibatch holds ``positives`` (32) positive and ``background`` (96) windows drawn from all training
   images; lr 1/10 of the pretraining lr (``task=classify``: 0.1 -> 0.01), x0.1 every ``step_epochs``.
   ``trainer.max_epochs`` epochs of ``iterations`` minibatches. ``finetune.windows=roi_pool`` (the default
   when ``feature_mode=roi_pool``) fine-tunes the Fast R-CNN way instead: ``roi_images`` whole images per
   minibatch, their regions RoI-pooled from each image's conv5 map. With ``backbone.freeze=all`` only the head
   trains (needed by softmax scoring; skipped for SVM-only runs) -- the "no fine-tuning" rows. The fine-tuned
   network is cached under ``${paths.cache_dir}/rcnn_finetune`` (an ``ArtifactCache`` file entry);
3. pool5 of every region (train: GT boxes + proposals; test: proposals) written once to a memory-mapped
   file under ``${paths.cache_dir}/rcnn_features`` (an ``ArtifactCache`` memmap entry that resumes after a kill)
   keyed by the weights' hash, the feature mode, geometry, proposals and image ids (:func:`pool5_features`);
   fc6/fc7 are computed from it (as the original did);
4. per-class linear SVMs with hard negative mining for each layer in ``layers`` (``models.rcnn.svm``),
   and/or softmax scoring by the fine-tuned head (``scoring``);
5. class-specific ridge box regression on pool5 (``models.rcnn.bbox_regression``) -> an extra "+BB" row;
6. test: per-class NMS at 0.3 (``models.rcnn.detection``), at most 100 detections per image; VOC AP
   in both conventions (``transferrable.metrics.voc_eval``), a per-class table shaped like Table 3.2
   (``tables.json``), ``rcnn_results.json``, detections drawn on test images (``detections.png``), each class's
   precision-recall curve of the headline variant (``pr_curves.png`` + ``pr_curves.json``).

Before fine-tuning, ``grayscale_source`` folds conv1's untrained colour components (a source learnt on
grayscale images, ``models.weights.fold_conv1_colour``); afterwards the head's accuracy on windows of the
train and the held-out val images is reported (``rcnn/finetune/*``). ``analysis`` adds ``pool5_units.png``
(Figure 3.4) and ``fp_breakdown.png`` (Figure 3.5); tables and figures are ``engine.rcnn.report``'s.

Metrics: ``test/mAP`` (VOC2010+ area) and ``test/mAP_07`` (11-point) of the headline variant (the last
layer of the first scoring, with box regression when enabled), ``test/<variant>/mAP[_07]`` for each row,
and ``rcnn/time/*`` seconds per test image (proposals / warping / cnn / scoring+nms).

On N DDP processes (``hardware=ddp_cpu trainer.devices=N``, issue 19): proposals and pool5 are computed through
``trainer.predict`` over the image indices (:func:`sharded_map`: rank r takes images r, r + N, ..., Lightning's
unpadded sampler), the proposals gathered on every rank, the pool5 rows written by each rank into the one partial
memmap that rank 0's ``memmap_writer`` opened and rank 0 alone commits (barriers around it; a DDP extraction resumes
from a killed one-process build but saves no progress of its own); fine-tuning is Lightning's DDP fit (each rank
its share of the ``iterations`` minibatches, gradients averaged; rank 0 writes the fine-tuned cache). SVM
training, box regression, scoring, NMS and VOC AP are computed by every rank from the same memmaps (deterministic,
no collective inside these long CPU stages, so no rank waits at a barrier for hours); rank 0 writes the outputs and
its metrics are handed to every rank. ``rcnn/time/*`` are then CPU seconds summed over the ranks.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from engine.rcnn.cache_keys import feature_key, state_digest
from engine.rcnn.features import feature_stage
from engine.rcnn.finetune import finetune_stage
from engine.rcnn.report import ap_table, draw_detections, fp_breakdown_figure, pool5_units_figure
from engine.rcnn.state import RCNNRun, load_split, prepare, proposal_recall
from engine.rcnn.svms import svm_store, train_box_regressor, train_svms
from lightning_modules.rcnn import RCNNModule, as_list
from models.rcnn.bbox_regression import BoxRegressor
from models.rcnn.detection import detect_boxes
from models.rcnn.feature_rows import ChunkedRows
from models.rcnn.svm import norm_scale
from models.rcnn.windows import ImageSet
from transferrable.core.atomic import atomic_write_json
from transferrable.core.distributed import (
    distributed,
    gather_objects,
    output_dir_of,
    rank_aware,
    sum_over_ranks,
)
from transferrable.core.log_results import log_results
from transferrable.core.progress import trainer_bars
from transferrable.metrics.voc_eval import evaluate_detections, precision_envelope
from transferrable.viz.pr_curves import plot_pr_curves
from transferrable.viz.tables import render_table

log = logging.getLogger(__name__)


@rank_aware
def run(cfg: DictConfig, trainer, datamodule, model: RCNNModule) -> dict:
    """The stages of the module docstring, in order; returns the run's metrics."""
    with output_dir_of(trainer, Path(cfg.paths.output_dir)) as out:  # rank 0: the run's; others: scratch
        r = prepare(cfg, trainer, datamodule, model)
        r.output_dir = out
        metrics = _run(r)
    if distributed(trainer):  # every rank returns rank 0's numbers (the same up to its own seconds)
        metrics = gather_objects(metrics)[0]
    return metrics


def _run(r: RCNNRun) -> dict:
    model, trainer, datamodule = r.model, r.trainer, r.datamodule
    rc = model.cfg
    t_all = time.perf_counter()
    log.info("rcnn: proposals (%s) for train/test images", r.proposals.tag)
    train = load_split(r, ["train"], rc["max_train_images"], True, "train")
    svm_keys = as_list(rc["svm_splits"])
    svm_data = train if svm_keys == ["train"] else load_split(r, svm_keys, rc["max_train_images"], True, "+".join(svm_keys))
    model.timing.clear()
    test = load_split(r, ["test"], rc["max_test_images"], False, "test", timed=True)
    metrics: dict[str, Any] = {}
    info: dict[str, Any] = {"proposal_cache": dict(r.proposals.stats), "dataset_summary": getattr(datamodule, "summary", {}),
                            "proposals_per_image": {"train": float(np.mean([len(p) for p in train.proposals])),
                                                    "test": float(np.mean([len(p) for p in test.proposals]))}}
    metrics["rcnn/proposal_recall"] = proposal_recall(test)
    finetuned = finetune_stage(r, train, test, metrics, info)
    model.eval()
    r.digest = state_digest(model)
    pool5_train, pool5_test = feature_stage(r, svm_data, test, info)
    if trainer.world_size > 1:  # each rank timed its own share of the images
        summed = sum_over_ranks(trainer, model.timing)
        model.timing.clear()
        model.timing.update(summed)
    variants, t_score = score_stage(r, svm_data, test, pool5_train, pool5_test, info)
    results = evaluate_variants(variants, test, model.num_classes, metrics)
    firsts = [k for k in variants if k.startswith(model.scorings[0] + "/")]
    main = firsts[-1]
    metrics["test/mAP"] = results[main]["mAP"]
    metrics["test/mAP_07"] = results[main]["mAP_07"]
    metrics["rcnn/main"] = main
    metrics["rcnn/finetuned"] = bool(finetuned)
    metrics.update(timing_metrics(model.timing, t_score, len(test)))
    metrics["rcnn/total_seconds"] = time.perf_counter() - t_all
    for k in ("feature_cache_train", "feature_cache_test", "pool5_images_by_rank_train", "pool5_images_by_rank_test"):
        if k in model.stats:
            info[k] = model.stats[k]
    info["proposal_cache"] = dict(r.proposals.stats)
    if trainer.is_global_zero:
        write_outputs(r, test, pool5_test, variants, results, main, metrics, info, finetuned)
    return metrics


def timing_metrics(timing: dict, t_score: float, n_test: int) -> dict:
    n = max(n_test, 1)
    out = {f"rcnn/time/{k}": timing.get(k, 0.0) / n for k in ("proposals", "warp", "cnn")}
    out["rcnn/time/scoring_nms"] = t_score / n
    out["rcnn/seconds_per_image"] = sum(out[f"rcnn/time/{k}"] for k in ("proposals", "warp", "cnn", "scoring_nms"))
    return out


def score_stage(r: RCNNRun, svm_data: ImageSet, test: ImageSet, pool5_train: np.ndarray, pool5_test: np.ndarray,
                info: dict) -> tuple[dict, float]:
    """Every variant's test detections: (scoring, layer), and +bb (box regression) for each scoring's last layer.
    Returns them and the headline variant's scoring + NMS seconds."""
    model = r.model
    scale5 = norm_scale(pool5_train[: min(len(pool5_train), 20000)], model.cfg["svm"]["feature_norm"])
    regressor = None
    if model.cfg["bbox_reg"]["enabled"]:
        regressor = train_box_regressor(model, svm_data, pool5_train, scale5)
        info["bbox_reg_pairs"] = regressor.pairs
    variants: dict[str, dict] = {}
    t_score = 0.0
    for scoring in model.scorings:
        layers = model.layers if scoring == "svm" else ["fc7"]
        for layer in layers:
            name = f"{scoring}/{layer}"
            log.info("rcnn: %s", name)
            S, t_feat = variant_scores(r, scoring, layer, svm_data, pool5_train, pool5_test, info)
            for bb in [False] + ([True] if regressor is not None and layer == layers[-1] else []):
                t2 = time.perf_counter()
                dets = detect_all(model, test, S, regressor if bb else None, pool5_test, scale5)
                key = name + ("+bb" if bb else "")
                variants[key] = {"detections": dets, "seconds": time.perf_counter() - t2 + t_feat}
            if scoring == model.scorings[0] and layer == layers[-1]:
                t_score = variants[key]["seconds"]
    return variants, t_score


def variant_scores(r: RCNNRun, scoring: str, layer: str, svm_data: ImageSet, pool5_train: np.ndarray,
                   pool5_test: np.ndarray, info: dict) -> tuple[np.ndarray, float]:
    """Test regions x classes scores of one variant (SVMs trained here), and the seconds the test scoring took."""
    model = r.model
    if scoring == "softmax":
        t1 = time.perf_counter()
        S = model.softmax_scores(pool5_test)
        return S, time.perf_counter() - t1
    t0 = time.perf_counter()
    # read chunk by chunk (fc6/fc7 computed per chunk): memory stays bounded as the cache grows
    ftr = ChunkedRows(pool5_train, None if layer == "pool5" else partial(model.from_pool5, layer=layer))
    scale = norm_scale(ftr[: min(len(ftr), 20000)], model.cfg["svm"]["feature_norm"])
    features = feature_key(model, svm_data, r.digest, r.proposals.tag)
    miner = train_svms(model, svm_data, ftr, scale, layer, svm_store(r.output_dir), features,
                       bars=trainer_bars(r.trainer))
    info[f"svm/{layer}"] = {"seconds": time.perf_counter() - t0, "feature_scale": scale, **miner.summary()}
    del ftr
    t1 = time.perf_counter()
    fte = model.from_pool5(pool5_test, layer) if layer != "pool5" else np.asarray(pool5_test, np.float32)
    S = miner.scores(fte * scale)
    S[:, ~miner.has_model] = -np.inf
    return S, time.perf_counter() - t1


def detect_all(model: RCNNModule, test: ImageSet, S: np.ndarray, regressor: BoxRegressor | None,
               pool5_test: np.ndarray, scale5: float) -> list[dict]:
    """Per-image detections: each class's boxes (regressed when ``regressor``), NMS, the top ``max_per_image``."""
    dets = []
    for i in range(len(test)):
        rows = test.rows(i)
        boxes = test.boxes[i]
        reg = None
        if regressor is not None:
            X5 = np.asarray(pool5_test[rows], np.float32) * scale5
            reg = [regressor.predict(X5, boxes, c) for c in range(model.num_classes)]
        h, w = test.images[i].shape[:2]
        dets.append(detect_boxes(boxes, S[rows], reg, (w, h), model.cfg["nms_threshold"], model.cfg["max_per_image"]))
    return dets


def evaluate_variants(variants: dict, test: ImageSet, num_classes: int, metrics: dict) -> dict:
    """VOC AP of every variant (both conventions) into ``metrics``; returns the per-variant results."""
    results = {}
    for key, v in variants.items():
        ev = evaluate_detections(v["detections"], test.gt, num_classes)
        results[key] = {"ap": ev["ap"], "ap07": ev["ap07"], "mAP": ev["mAP"], "mAP_07": ev["mAP_07"], "npos": ev["npos"]}
        metrics[f"test/{key}/mAP"] = ev["mAP"]
        metrics[f"test/{key}/mAP_07"] = ev["mAP_07"]
    return results


def write_outputs(r: RCNNRun, test: ImageSet, pool5_test: np.ndarray, variants: dict, results: dict, main: str,
                  metrics: dict, info: dict, finetuned: bool) -> None:
    """``tables.json``, ``rcnn_results.json``, the figures, and the numbers and figures to the loggers."""
    model, rc, out = r.model, r.model.cfg, r.output_dir
    table = ap_table(results, r.class_names, getattr(r.datamodule, "name", "dataset"), model.backbone.arch,
                     rc["feature_mode"], finetuned)
    atomic_write_json(out / "tables.json", [table])
    record = {"classes": r.class_names, "main": main, "results": results, "metrics": metrics, "info": info,
              "config": {"feature_mode": rc["feature_mode"], "layers": model.layers, "scoring": model.scorings,
                         "input_size": model.size, "context_pad": model.pad, "proposals": rc["proposals"],
                         "finetune": rc["finetune"], "svm": rc["svm"], "bbox_reg": rc["bbox_reg"]}}
    atomic_write_json(out / "rcnn_results.json", record)
    log.info("rcnn results:\n%s", render_table(table))
    images = {}
    try:
        images["rcnn/pr_curves"] = pr_curves_figure(r, test, variants[main]["detections"], main)
    except Exception as err:  # noqa: BLE001 - a drawing failure must not lose the results
        log.warning("could not draw the precision-recall curves: %s", err)
    if rc["draw_images"]:
        try:
            images["rcnn/detections"] = draw_detections(test, variants[main]["detections"], r.class_names,
                                                        out / "detections.png", rc["draw_images"], rc["draw_top"])
        except Exception as err:  # noqa: BLE001 - a drawing failure must not lose the results
            log.warning("could not draw detections: %s", err)
    if rc["analysis"]:
        try:
            images.update(analysis_figures(r, test, pool5_test, variants[main]["detections"], info))
        except Exception as err:  # noqa: BLE001 - a figure failure must not lose the results
            log.warning("could not draw the analysis figures: %s", err)
        atomic_write_json(out / "rcnn_results.json", {**record, "info": info})
    log_results(r.trainer, metrics, images)


def pr_curves_figure(r: RCNNRun, test: ImageSet, detections: list[dict], main: str) -> Path:
    """``pr_curves.png``: each class's precision-recall curve of the headline variant (its AP is the table's)."""
    ev = evaluate_detections(detections, test.gt, r.model.num_classes)
    curves = [precision_envelope(c.recall, c.precision) for c in ev["classes"]]
    title = (f"R-CNN {main} on {getattr(r.datamodule, 'name', 'dataset')} test: precision-recall per class "
             f"(mAP {ev['mAP'] * 100:.1f}%)")
    return plot_pr_curves(r.output_dir / "pr_curves.png", curves, ev["ap"], r.class_names, title, ev["npos"])


def analysis_figures(r: RCNNRun, test: ImageSet, pool5_test: np.ndarray, detections: list[dict], info: dict) -> dict:
    """``pool5_units.png``: the top regions of six pool5 units over the test proposals (Figure 3.4);
    ``fp_breakdown.png``: the false positives of the headline detector by type (Figure 3.5)."""
    model, rc = r.model, r.model.cfg
    out = {}
    out["rcnn/pool5_units"], info["pool5_units"] = pool5_units_figure(
        test, pool5_test, model.pool5_grid, rc["pool5_units"], int(rc["draw_top_regions"]),
        r.output_dir / "pool5_units.png")
    out["rcnn/fp_breakdown"], info["false_positives_top_npos"] = fp_breakdown_figure(
        detections, test.gt, r.class_names, model.num_classes, model.backbone.arch, r.output_dir / "fp_breakdown.png")
    return out
