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
   in both conventions (``transferrable.voc_eval``), a per-class table shaped like Table 3.2
   (``tables.json``), ``rcnn_results.json``, detections drawn on test images (``detections.png``).

Before fine-tuning, ``grayscale_source`` folds conv1's untrained colour components (a source learnt on
grayscale images, ``models.weights.fold_conv1_colour``); afterwards the head's accuracy on windows of the
train and the held-out val images is reported (``rcnn/finetune/*``). ``analysis`` adds ``pool5_units.png``
(Figure 3.4) and ``fp_breakdown.png`` (Figure 3.5); tables and figures are ``transferrable.rcnn_report``'s.

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

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from engine.ranks import output_dir_of
from lightning_modules.rcnn import RCNNModule, as_list
from models.rcnn.bbox_regression import BoxRegressor
from models.rcnn.detection import detect_boxes
from models.rcnn.feature_rows import ChunkedRows
from models.rcnn.proposals import ProposalCache
from models.rcnn.regions import assign_labels, class_max_iou
from models.rcnn.svm import HardNegativeMiner, norm_scale
from models.rcnn.windows import ImageSet, WindowBatches, window_batches
from models.weights import fold_grayscale_source
from transferrable.artifact_cache import ArtifactCache, digest
from transferrable.atomic import atomic_write_json
from transferrable.distributed import gather_objects, initialized
from transferrable.feature_cache import FeatureCache
from transferrable.log_results import log_results
from transferrable.precision import inference_bf16
from transferrable.rcnn_report import ap_table, draw_detections, fp_breakdown_figure, pool5_units_figure
from transferrable.report_core import render_table
from transferrable.voc_eval import box_iou, evaluate_detections

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # pool5 memmaps (rcnn_features/)
FINETUNE_CACHE_VERSION = 1  # fine-tuned networks (rcnn_finetune/): in the key and the manifests
SVM_STATS = ("positives", "cache", "peak_cache", "retrains")


# -- cache keys -----------------------------------------------------------------------------------------
def state_digest_arrays(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def state_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _describe(factory) -> Any:
    if factory is None:
        return None
    if isinstance(factory, partial):
        return [f"{factory.func.__module__}.{factory.func.__qualname__}", dict(factory.keywords)]
    return repr(factory)


def optimizer_key(model: RCNNModule) -> dict:
    """The optimiser and scheduler in the fine-tuning key, only where they are not the SGD + StepLR that
    ``rcnn.finetune``'s values (already in the key) describe: the default keys stay what they always were."""
    ft = model.cfg["finetune"]
    default = {"optimizer": ["torch.optim.sgd.SGD", {"lr": ft["lr"], "momentum": ft["momentum"],
                                                     "weight_decay": ft["weight_decay"]}],
               "scheduler": ["torch.optim.lr_scheduler.StepLR", {"step_size": ft["step_epochs"], "gamma": ft["gamma"]}]}
    got = {"optimizer": _describe(model.optimizer_factory), "scheduler": _describe(model.scheduler_factory)}
    return {} if got == default else {"optim": got}


def finetune_key(trainer, model: RCNNModule, data: ImageSet, mean, std, seed) -> dict:
    ft = model.cfg["finetune"]
    # warp fine-tuning keeps the key it had before finetune.windows existed (its caches stay valid)
    ft_key = {k: v for k, v in ft.items() if ft["windows"] != "warp" or k not in ("windows", "roi_images")}
    return {"version": FINETUNE_CACHE_VERSION, "start": state_digest(model), "finetune": ft_key,
            "epochs": trainer.max_epochs, "seed": seed, "precision": str(trainer.precision),
            "size": model.size, "pad": model.pad, "images": data.ids, "boxes": state_digest_arrays(data.boxes),
            "mean": [float(m) for m in mean], "std": [float(s) for s in std], **optimizer_key(model),
            # N DDP processes share each epoch's minibatches and average their gradients: another network
            **({"world_size": int(trainer.world_size)} if trainer.world_size > 1 else {})}


def feature_key(model: RCNNModule, data: ImageSet, weights: str, proposals: str) -> dict:
    """What a pool5 memmap depends on: the network (``weights``: its state digest), the proposals' tag, geometry."""
    rc = model.cfg
    return {"version": CACHE_VERSION, "weights": weights, "mode": rc["feature_mode"],
            "roi_scale": rc["roi_scale"] if rc["feature_mode"] == "roi_pool" else None,
            "size": model.size, "pad": model.pad, "proposals": proposals, "split": data.name,
            "ids": digest("\n".join(data.ids)), "regions": data.num_regions,
            "dtype": rc["feature_dtype"], "bf16": model.use_bf16}


# -- the run's shared state ------------------------------------------------------------------------------
@dataclass
class RCNNRun:
    """What the stages share: the network, the trainer and data, where outputs and caches go."""

    model: RCNNModule
    trainer: Any
    datamodule: Any
    output_dir: Path
    cache_root: Path | None
    seed: Any
    proposals: ProposalCache
    mean: Any = None
    std: Any = None
    digest: str = ""
    class_names: list[str] = field(default_factory=list)

    @property
    def finetune_dir(self) -> Path | None:
        return None if self.cache_root is None else self.cache_root / "rcnn_finetune"


def prepare(cfg: DictConfig, trainer, datamodule, model: RCNNModule) -> RCNNRun:
    rc = model.cfg
    model.use_bf16 = inference_bf16(rc["bf16"], trainer.precision)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    datamodule.setup("fit")
    cache_dir = cfg.paths.get("cache_dir")
    cache_root = Path(cache_dir) if (rc["cache"] and cache_dir) else None
    root_tag = digest(str(getattr(datamodule, "root", "")), 10)
    pc = ProposalCache(None if cache_root is None else cache_root / "proposals" / root_tag, **rc["proposals"])
    names = list(getattr(datamodule, "class_names", None) or [str(i) for i in range(model.num_classes)])
    return RCNNRun(model, trainer, datamodule, output_dir, cache_root, cfg.get("seed"), pc, datamodule.mean,
                   datamodule.std, class_names=names)


def load_split(r: RCNNRun, split_keys: list[str], limit, with_gt: bool, name: str, timed: bool = False) -> ImageSet:
    """The images of ``split_keys`` (the first ``limit``) with their proposals (seconds in ``timing`` if ``timed``)."""
    items = []
    for key in split_keys:
        ds = r.datamodule.datasets.get(key)
        if ds is None:
            raise ValueError(f"rcnn: the data module has no '{key}' split")
        items += [ds[i] for i in range(len(ds))]
    if limit:
        items = items[: int(limit)]
    def proposals_of(i: int) -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        return r.proposals.get(items[i]["image_id"], items[i]["image"]), time.perf_counter() - t

    done = sharded_map(r, len(items), proposals_of)  # each image's cache file written by the rank computing it
    if timed and r.trainer.is_global_zero:  # every rank holds every image's seconds: counted once
        r.model.timing["proposals"] += sum(t for _, t in done)
    return ImageSet(name, items, [p for p, _ in done], with_gt)


def sharded_map(r: RCNNRun, n: int, job: Callable[[int], Any]) -> list:
    """``[job(i) for i in range(n)]``. Under DDP a ``trainer.predict`` over the indices (the same call on every
    rank; rank r takes r, r + W, ... through Lightning's unpadded sampler), the answers gathered on every rank."""
    return sharded_map_on(r.trainer, r.model, n, job)


def sharded_map_on(trainer, model, n: int, job: Callable[[int], Any]) -> list:
    """:func:`sharded_map` for any module with a ``predict_job`` attribute and ``RCNNModule``'s ``predict_step``
    (task=rcnn_segmentation's module has both)."""
    if trainer.world_size <= 1:
        return [job(i) for i in range(n)]
    model.predict_job = job
    try:
        batches = trainer.predict(model, dataloaders=DataLoader(list(range(n)), batch_size=1, shuffle=False),
                                  return_predictions=True) or []
    finally:
        model.predict_job = None
    merged: dict[int, Any] = {}
    parts = gather_objects({i: v for batch in batches for i, v in batch})
    for part in parts:
        merged.update(part)
    model.stats["images_by_rank"] = [len(p) for p in parts]  # the last sharded call's split of the images
    if sorted(merged) != list(range(n)):
        raise RuntimeError(f"rcnn: the ranks answered {len(merged)} of {n} images (limit_predict_batches set?)")
    return [merged[i] for i in range(n)]


def proposal_recall(test: ImageSet) -> float:
    """Share of the non-difficult test objects that some proposal overlaps with IoU >= 0.5."""
    recall = []
    for p, g in zip(test.proposals, test.gt, strict=True):
        m = ~g["difficult"]
        if m.any():
            recall += list(box_iou(g["boxes"][m], p).max(1) >= 0.5) if len(p) else [False] * int(m.sum())
    return float(np.mean(recall)) if recall else float("nan")


# -- the whole task ----------------------------------------------------------------------------------------
def run(cfg: DictConfig, trainer, datamodule, model: RCNNModule) -> dict:
    """The stages of the module docstring, in order; returns the run's metrics."""
    with output_dir_of(trainer, Path(cfg.paths.output_dir)) as out:  # rank 0: the run's; others: scratch
        r = prepare(cfg, trainer, datamodule, model)
        r.output_dir = out
        metrics = _run(r)
    if _distributed(trainer):  # every rank returns rank 0's numbers (the same up to its own seconds)
        metrics = gather_objects(metrics)[0]
    return metrics


def _distributed(trainer) -> bool:
    return trainer.world_size > 1 and initialized()


def _sum_over_ranks(trainer, values: dict) -> dict:
    if not _distributed(trainer):
        return dict(values)
    out: dict = {}
    for part in gather_objects(dict(values)):
        for k, v in part.items():
            out[k] = out.get(k, 0) + v
    return out


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
        summed = _sum_over_ranks(trainer, model.timing)
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


# -- 2. fine-tuning ------------------------------------------------------------------------------------------
def backbone_trainable(model: RCNNModule) -> bool:
    return any(p.requires_grad for p in model.backbone.parameters())


def finetune_stage(r: RCNNRun, train: ImageSet, test: ImageSet, metrics: dict, info: dict) -> bool:
    """Fine-tune when anything uses it (a trainable backbone, or softmax scoring); True if the backbone trains."""
    model, rc = r.model, r.model.cfg
    removed = fold_grayscale_source(model.backbone, rc["grayscale_source"])
    if removed is not None:
        info["conv1_colour_removed"] = removed
        log.info("rcnn: grayscale source: conv1 folded to colour-blind filters (%.0f%% of its weight norm "
                 "was untrained colour noise)", 100 * info["conv1_colour_removed"])
    finetuned = backbone_trainable(model)
    log.info("rcnn: %d train images (%.0f proposals each), %d test; proposal recall@0.5 %.3f; fine-tuning: %s",
             len(train), info["proposals_per_image"]["train"], len(test), metrics["rcnn/proposal_recall"],
             finetuned or "softmax" in model.scorings)
    if not (finetuned or "softmax" in model.scorings):
        return finetuned
    # fine-tuning sees every training image (as the thesis fine-tunes on all of trainval); only the
    # SVMs' hard-negative mining, the slow part on a CPU, is limited by max_train_images
    ft_limit = rc["finetune"].get("max_images")
    ft_data = train if ft_limit == rc["max_train_images"] else load_split(r, ["train"], ft_limit, True, "finetune")
    info["finetune"] = {"images": len(ft_data),
                        **finetune(r.trainer, model, ft_data, r.mean, r.std, r.seed, r.finetune_dir)}
    if int(rc["finetune_eval_batches"]) > 0 and not info["finetune"].get("skipped"):
        held_out_accuracy(r, train, metrics, info)
    return finetuned


def held_out_accuracy(r: RCNNRun, train: ImageSet, metrics: dict, info: dict) -> None:
    """Is the (N+1)-way head recognising objects, or only the training windows? Its accuracy on train and val."""
    rc = r.model.cfg
    held = {"train": train}
    if r.datamodule.datasets.get("val") is not None:
        held["val"] = load_split(r, ["val"], rc["max_test_images"], True, "val")
    for split, data in held.items():
        acc = window_accuracy(r.model, data, r.mean, r.std, int(rc["finetune_eval_batches"]), r.seed)
        info["finetune"][f"{split}_windows"] = acc
        for k in ("acc", "fg_acc", "bg_acc", "fg_class_acc"):
            if k in acc:
                metrics[f"rcnn/finetune/{split}_{k}"] = acc[k]
    log.info("rcnn: fine-tuned head accuracy %s", {k: round(v, 3) for k, v in metrics.items()
                                                   if k.startswith("rcnn/finetune/")})


def model_windows(model: RCNNModule, data: ImageSet, iterations: int, mean, std, seed) -> WindowBatches:
    """Fine-tuning minibatches of ``data`` for ``model`` (its ``finetune.windows`` mode and geometry)."""
    return window_batches(data, model.cfg["finetune"], model.size, model.pad, iterations, mean, std, seed)


def finetune(trainer, model: RCNNModule, data: ImageSet, mean, std, seed, cache_dir: Path | None) -> dict:
    """Fit ``model`` on ``data``'s windows (``trainer.max_epochs`` x ``finetune.iterations`` minibatches), or load
    the network a run with the same key fine-tuned before: the warp and roi_pool runs, the SVM and softmax runs
    and a rerun after a kill all start from the same fine-tuning, so it is computed once."""
    ft = model.cfg["finetune"]
    windows = model_windows(model, data, ft["iterations"], mean, std, seed)
    info = {"windows": ft["windows"], "positive_windows": len(windows.pos), "background_windows": len(windows.bg)}
    if ft["iterations"] <= 0 or trainer.max_epochs == 0:
        return {**info, "skipped": True}
    key = finetune_key(trainer, model, data, mean, std, seed)
    cache = None if cache_dir is None else ArtifactCache(cache_dir, version=FINETUNE_CACHE_VERSION,
                                                         what="fine-tuned R-CNN network")
    path = None if cache is None else cache.path_for(key, name=f"{digest(key, 16)}.pt")  # its name of before
    if cache is not None:  # absent, or killed before its manifest: a silent miss; damaged: a CacheWarning
        saved, _ = cache.read(path, key, lambda p, m: torch.load(p, map_location="cpu", weights_only=True))
        if saved is not None:
            model.load_state_dict(saved["state_dict"])
            model.stats["finetune"] = "reused"
            log.info("rcnn: reusing the fine-tuned network %s", path)
            return {**info, **json.loads(saved["info_json"]), "cache": "hit", "cache_path": str(path)}
    model.stats["finetune"] = "trained"
    # the stages after fc7 never run: no gradients for them (DDP refuses parameters without one; the optimiser
    # skipped them anyway, so one process trains the same)
    taps = model.backbone.tap_names
    for name in taps[taps.index("fc7") + 1:]:
        model.backbone.stages[name].requires_grad_(False)
    t0 = time.perf_counter()
    trainer.fit(model, train_dataloaders=DataLoader(windows, batch_size=None, shuffle=True))
    info["seconds"] = time.perf_counter() - t0
    info["loss"] = float(trainer.callback_metrics.get("finetune/loss_epoch", float("nan")))
    if cache is not None and trainer.is_global_zero:  # one writer: every rank holds the same network
        with cache.writer(path, key) as w:
            torch.save({"state_dict": model.state_dict(), "info_json": json.dumps(info, default=float)}, w.path)
        info["cache_path"] = str(path)
    return info


@torch.inference_mode()
def window_accuracy(model: RCNNModule, data: ImageSet, mean, std, batches: int = 8, seed=0) -> dict:
    """Accuracy of the (N+1)-way head on ``batches`` fine-tuning-style minibatches (32 positive + 96
    background windows) of ``data``, in eval mode: overall, on positive windows (the right class among
    N + 1) and on background windows. Run on held-out (val) images it says whether fine-tuning learned
    to recognise the objects rather than the training windows."""
    windows = model_windows(model, data, batches, mean, std, seed + 7919)
    was_training = model.training
    model.eval()
    hit, cls_hit, ys = [], [], []
    for k in range(len(windows)):
        batch = windows[k]
        if len(batch) == 2:
            batch = (batch[0].to(model.device), batch[1])
        with model._autocast():
            logits, y = model.window_logits(batch)
            logits = logits.float().cpu()
        hit.append(logits.argmax(1) == y)
        cls_hit.append(logits[:, 1:].argmax(1) + 1 == y)  # the class alone, background left out
        ys.append(y)
    model.train(was_training)
    if not hit:
        return {}
    hit, cls_hit, ys = torch.cat(hit).float(), torch.cat(cls_hit).float(), torch.cat(ys)
    fg = ys > 0

    def mean_of(v, m):
        return float(v[m].mean()) if m.any() else float("nan")

    # fg_class_acc: on positive windows, is the best-scoring class the right one (what the per-class
    # ranking of detections needs even while background still wins the argmax)
    return {"acc": float(hit.mean()), "fg_acc": mean_of(hit, fg), "bg_acc": mean_of(hit, ~fg),
            "fg_class_acc": mean_of(cls_hit, fg), "windows": int(len(ys))}


# -- 3. pool5 features ------------------------------------------------------------------------------------------
def feature_stage(r: RCNNRun, svm_data: ImageSet, test: ImageSet, info: dict) -> tuple[np.ndarray, np.ndarray]:
    model = r.model
    feat_dir = None if r.cache_root is None else r.cache_root / "rcnn_features"
    kw = {"weights": r.digest, "proposals": r.proposals.tag}
    t = time.perf_counter()
    log.info("rcnn: pool5 of %d train and %d test regions (%s)", svm_data.num_regions, test.num_regions,
             model.cfg["feature_mode"])
    extract = partial(pool5_features_sharded, r) if r.trainer.world_size > 1 else partial(pool5_features, model)
    pool5_train = extract(svm_data, r.mean, r.std, feat_dir, **kw)
    info["train_feature_seconds"] = time.perf_counter() - t  # wall seconds (under DDP: of the sharded extraction)
    info["pool5_regions"] = {"train": int(svm_data.num_regions), "test": int(test.num_regions)}
    test_timing_before = dict(model.timing)
    pool5_test = extract(test, r.mean, r.std, feat_dir, **kw)
    if model.stats.get("feature_cache_test") == "hit":
        model.timing.clear()
        model.timing.update(test_timing_before)
    return pool5_train, pool5_test


def pool5_features(model: RCNNModule, data: ImageSet, mean, std, cache_dir: Path | None, *, weights: str,
                   proposals: str) -> np.ndarray:
    """pool5 of every region of ``data`` as a (read-only) np.memmap, computed once per key (:func:`feature_key`).

    An ``ArtifactCache`` memmap entry under ``cache_dir``: ``pool5-<split>-<hash16>.dat`` (rows, ``feature_dtype``)
    and its manifest ``.json`` (version, key, key hash, shape, dtype, bytes; written last). A manifest that does not
    parse, names another key or shape, or a ``.dat`` of another size (truncated) is reported with a
    ``CacheWarning`` and rebuilt. While it is being built the rows go to ``.pool5-<split>-<hash16>.partial`` with a
    progress file saying how many images are on disk (flushed before it is written): a run killed mid-extraction
    resumes from there.
    """
    key = feature_key(model, data, weights, proposals)
    dtype = np.dtype(model.cfg["feature_dtype"])
    shape = (data.num_regions, model.pool5_dim)
    model.stats[f"pool5_images_computed_{data.name}"] = 0
    if cache_dir is None:
        arr = np.zeros(shape, dtype)
        model.stats[f"feature_cache_{data.name}"] = "miss"
        _extract_pool5(model, data, mean, std, arr, 0)
        return arr
    cache = ArtifactCache(cache_dir, version=CACHE_VERSION, what="pool5 cache", checksum=False, record_key=True,
                          manifest_name="{stem}.json")
    path = cache.path_for(key, prefix=f"pool5-{data.name}-", suffix=".dat")
    rows = cache.open_memmap(path, key, shape, dtype)
    if rows is not None:
        model.stats[f"feature_cache_{data.name}"] = "hit"
        return rows
    with cache.memmap_writer(path, key, shape, dtype) as w:
        if w.start:
            log.info("rcnn: pool5 of %s resumes at image %d of %d (%s)", data.name, w.start, len(data), w.partial)
        model.stats[f"feature_cache_{data.name}"] = "resumed" if w.start else "miss"
        _extract_pool5(model, data, mean, std, w.array, w.start, w.checkpoint)
    return w.result


def pool5_features_sharded(r: RCNNRun, data: ImageSet, mean, std, cache_dir: Path | None, *, weights: str,
                           proposals: str) -> np.ndarray:
    """:func:`pool5_features` on N DDP processes: the same entry, its images sharded by rank (:func:`sharded_map`).

    Rank 0 opens the ``memmap_writer`` (resuming where a killed one-process build stopped); after a barrier every
    rank writes its images' rows into that partial file, flushes, and after a second barrier rank 0 alone commits it
    (rename + manifest); after a third every rank opens the committed entry read-only. Without a cache directory the
    rows are gathered instead."""
    model, trainer = r.model, r.trainer
    key = feature_key(model, data, weights, proposals)
    dtype = np.dtype(model.cfg["feature_dtype"])
    shape = (data.num_regions, model.pool5_dim)
    model.stats[f"pool5_images_computed_{data.name}"] = 0
    if cache_dir is None:
        model.stats[f"feature_cache_{data.name}"] = "miss"
        parts = sharded_map(r, len(data), lambda i: model.image_pool5(data.images[i], data.boxes[i], mean, std))
        arr = np.zeros(shape, dtype)
        for i, rows in enumerate(parts):
            arr[data.rows(i)] = rows
        model.stats[f"pool5_images_computed_{data.name}"] = len(data)
        return arr
    import torch.distributed as dist

    cache = ArtifactCache(cache_dir, version=CACHE_VERSION, what="pool5 cache", checksum=False, record_key=True,
                          manifest_name="{stem}.json")
    path = cache.path_for(key, prefix=f"pool5-{data.name}-", suffix=".dat")
    rows = cache.open_memmap(path, key, shape, dtype)
    hits = gather_objects(rows is not None)  # the proposals' trainer.predict opened the process group
    if all(hits):
        model.stats[f"feature_cache_{data.name}"] = "hit"
        return rows
    del rows
    writer = cache.memmap_writer(path, key, shape, dtype) if trainer.is_global_zero else contextlib.nullcontext()
    with writer as w:
        start = gather_objects(w.start if w is not None else None)[0]  # after rank 0 made the partial file
        if start:
            log.info("rcnn: pool5 of %s resumes at image %d of %d", data.name, start, len(data))
        model.stats[f"feature_cache_{data.name}"] = "resumed" if start else "miss"
        arr = w.array if w is not None else np.memmap(path.with_name(f".{path.stem}.partial"), dtype=dtype,
                                                      mode="r+", shape=shape)

        def write(i: int) -> None:
            i += start
            arr[data.rows(i)] = model.image_pool5(data.images[i], data.boxes[i], mean, std)

        model.eval()
        done = sharded_map(r, len(data) - start, write)  # the predict call opens the process group if none yet
        arr.flush()
        arr = None  # rank 0's writer closes the file when it commits
        model.stats[f"pool5_images_computed_{data.name}"] = len(done)
        model.stats[f"pool5_images_by_rank_{data.name}"] = model.stats["images_by_rank"]
        dist.barrier()  # every rank's rows are in the file before rank 0 commits it
    dist.barrier()  # committed: the entry and its manifest are in place
    rows = w.result if w is not None else cache.open_memmap(path, key, shape, dtype)
    if rows is None:
        raise RuntimeError(f"rcnn: rank {trainer.global_rank} cannot open the pool5 cache {path} rank 0 committed")
    return rows


def _extract_pool5(model: RCNNModule, data: ImageSet, mean, std, arr: np.ndarray, start: int,
                   checkpoint: Callable[[int], None] | None = None) -> None:
    model.eval()
    every = max(1, len(data) // 20)  # progress points: a kill loses at most ~5% of the extraction
    for i in range(start, len(data)):
        arr[data.rows(i)] = model.image_pool5(data.images[i], data.boxes[i], mean, std)
        model.stats[f"pool5_images_computed_{data.name}"] += 1
        if checkpoint is not None and ((i + 1) % every == 0) and i + 1 < len(data):
            checkpoint(i + 1)  # the rows reach the file before the progress file says they are there


# -- 4-5. SVMs, softmax, box regression ------------------------------------------------------------------------
def svm_store(output_dir: Path | None) -> FeatureCache | None:
    """Per-class SVMs of this run on disk (``<output_dir>/svms``, one entry + manifest per class and layer,
    written atomically as each class finishes): a rerun in the same directory reuses the finished classes."""
    return None if output_dir is None else FeatureCache(Path(output_dir) / "svms")


def svm_key(model: RCNNModule, features: dict | None, layer: str, scale: float, c: int) -> dict:
    return {"features": features, "layer": layer, "scale": float(scale), "svm": model.cfg["svm"], "class": int(c),
            "num_classes": model.num_classes}


def train_svms(model: RCNNModule, data: ImageSet, feats: np.ndarray, scale: float, layer: str = "fc7",
               store: FeatureCache | None = None, features: dict | None = None) -> HardNegativeMiner:
    """One linear SVM per class over ``feats`` (rows of ``data``'s regions, x ``scale``): the ground-truth boxes
    are the positives, regions under ``neg_threshold`` IoU with every box of the class the negatives, mined hard.
    With a ``store`` each class is saved as it finishes (keyed by ``features``, the pool5 key) and restored."""
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
    _mine(model, miner, data, feats, scale)
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


def _mine(model: RCNNModule, miner: HardNegativeMiner, data: ImageSet, feats: np.ndarray, scale: float) -> None:
    """Positives (non-difficult ground truth), then one pass of hard negatives over every image."""
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
    for i in range(len(data)):
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
    miner = train_svms(model, svm_data, ftr, scale, layer, svm_store(r.output_dir), features)
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


# -- 6. evaluation and outputs -------------------------------------------------------------------------------
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

