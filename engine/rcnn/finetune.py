"""R-CNN fine-tuning (thesis 3.1.3): the backbone plus a fresh (N+1)-way head trained with SGD on warped (or
RoI-pooled) windows, positives IoU >= 0.5; cached under ``${paths.cache_dir}/rcnn_finetune``; the head's window
accuracy on the train and held-out images.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from engine.rcnn.cache_keys import FINETUNE_CACHE_VERSION, finetune_key
from engine.rcnn.state import RCNNRun, load_split
from lightning_modules.rcnn import RCNNModule
from models.rcnn.windows import ImageSet, WindowBatches, window_batches
from models.weights import fold_grayscale_source
from transferrable.core.artifact_cache import ArtifactCache, digest

log = logging.getLogger(__name__)


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
