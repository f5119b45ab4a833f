"""task=rcnn: R-CNN object detection (thesis 3.1): proposals -> warped regions -> CNN -> per-class SVMs.

``run_task`` drives the stages (each a plain module in ``models/rcnn``):

1. proposals for every train/test image (``models.rcnn.proposals``: selective search or sliding windows,
   cached per image on disk);
2. fine-tuning (``finetune``): the backbone plus a fresh (N+1)-way head on fc7 is trained with SGD on warped
   windows, positives = proposals/GT with IoU >= 0.5 to a ground-truth box (its class), the rest background;
   every minibatch holds ``positives`` (32) positive and ``background`` (96) windows drawn from all training
   images; lr 1/10 of the pretraining lr (``task=classify``: 0.1 -> 0.01), x0.1 every ``step_epochs``.
   ``trainer.max_epochs`` epochs of ``iterations`` minibatches. ``finetune.windows=roi_pool`` (the default
   when ``feature_mode=roi_pool``) fine-tunes the Fast R-CNN way instead: ``roi_images`` whole images per
   minibatch, their regions RoI-pooled from each image's conv5 map. With ``backbone.freeze=all`` only the head
   trains (needed by softmax scoring; skipped for SVM-only runs) -- the "no fine-tuning" rows;
3. pool5 of every region (train: GT boxes + proposals; test: proposals) written once to a memory-mapped
   file under ``${paths.cache_dir}/rcnn_features`` keyed by the weights' hash, the feature mode, geometry,
   proposals and image ids; fc6/fc7 are computed from it (as the original did). ``feature_mode=warp``
   warps each region (context pad 16 at 227 px, scaled to ``input_size``); ``feature_mode=roi_pool``
   runs conv1..conv5 once per image (resized by ``roi_scale``) and max-pools every proposal's cell grid
   from the shared map with ``torchvision.ops.roi_pool`` (the SPP / Fast R-CNN idea, thesis 3.1.7.6);
4. per-class linear SVMs with hard negative mining for each layer in ``layers`` (``models.rcnn.svm``),
   and/or softmax scoring by the fine-tuned head (``scoring``);
5. class-specific ridge box regression on pool5 (``models.rcnn.bbox_regression``) -> an extra "+BB" row;
6. test: per-class NMS at 0.3 (``torchvision.ops.batched_nms``), at most 100 detections per image; VOC AP
   in both conventions (``transferrable.voc_eval``), a per-class table shaped like Table 3.2
   (``tables.json``), ``rcnn_results.json``, detections drawn on test images (``detections.png``).

Before fine-tuning, ``grayscale_source`` folds conv1's untrained colour components (a source learnt on
grayscale images, ``models.rcnn.regions.fold_conv1_colour``); the fresh head learns at ``head_lr_mult`` x the
lr; afterwards the head's accuracy on windows of the train and the held-out val images is reported
(``rcnn/finetune/*``). ``analysis`` adds ``pool5_units.png`` (Figure 3.4) and ``fp_breakdown.png`` (Figure
3.5, ``transferrable.detection_analysis``).

Metrics: ``test/mAP`` (VOC2010+ area) and ``test/mAP_07`` (11-point) of the headline variant (the last
layer of the first scoring, with box regression when enabled), ``test/<variant>/mAP[_07]`` for each row,
and ``rcnn/time/*`` seconds per test image (proposals / warping / cnn / scoring+nms).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from models.backbones import TapBackbone
from models.rcnn.bbox_regression import BoxRegressor
from models.rcnn.feature_rows import ChunkedRows, RegionIndex
from models.rcnn.proposals import ProposalCache
from models.rcnn.regions import (
    assign_labels,
    class_max_iou,
    fold_conv1_colour,
    image_tensor,
    scaled_pad,
    warp_regions,
    warp_regions_multi,
)
from models.rcnn.svm import HardNegativeMiner, norm_scale
from transferrable.log_results import log_results
from transferrable.precision import inference_bf16

log = logging.getLogger(__name__)

FEATURE_LAYERS = ("pool5", "fc6", "fc7")
SCORINGS = ("svm", "softmax")
FEATURE_MODES = ("warp", "roi_pool")
CACHE_VERSION = 1
FINETUNE_CACHE_VERSION = 1


def _as_list(v) -> list:
    if v is None:
        return []
    return [v] if isinstance(v, str) else list(v)


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


class ImageSet(RegionIndex):
    """One split in memory: images, ground truth, proposals and the region list used for features."""

    def __init__(self, name: str, items: list[dict], proposals: list[np.ndarray], with_gt: bool):
        self.name = name
        self.ids = [it["image_id"] for it in items]
        self.images = [it["image"] for it in items]
        self.gt = [{"boxes": it["boxes"], "labels": it["labels"], "difficult": it["difficult"]} for it in items]
        self.proposals = proposals
        # regions: GT first (training only), then proposals
        self.boxes, self.is_gt = [], []
        for it, p in zip(items, proposals, strict=True):
            g = it["boxes"] if with_gt else np.zeros((0, 4), np.float32)
            self.boxes.append(np.concatenate([g, p]).astype(np.float32))
            self.is_gt.append(np.concatenate([np.ones(len(g), bool), np.zeros(len(p), bool)]))
        counts = [len(b) for b in self.boxes]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


class WindowBatches(Dataset):
    """Fine-tuning minibatches: item k is ``positives`` + ``background`` warped windows drawn (with a
    per-item seed) from every training image, labels 0 = background, 1..N = classes."""

    def __init__(self, data: ImageSet, labels: list[np.ndarray], iterations: int, positives: int,
                 background: int, size: int, pad: float, mean, std, seed: int):
        self.data, self.size, self.pad, self.mean, self.std = data, size, pad, mean, std
        self.iterations, self.n_pos, self.n_bg, self.seed = int(iterations), int(positives), int(background), seed
        img = np.concatenate([np.full(len(lab), i) for i, lab in enumerate(labels)])
        idx = np.concatenate([np.arange(len(lab)) for lab in labels])
        lab = np.concatenate(labels)
        self.pos = np.stack([img[lab > 0], idx[lab > 0]], 1)
        self.bg = np.stack([img[lab == 0], idx[lab == 0]], 1)
        self.labels = labels
        self.tensors: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.iterations

    def _tensor(self, i: int) -> torch.Tensor:
        if i not in self.tensors:
            self.tensors[i] = image_tensor(self.data.images[i], self.mean, self.std)
        return self.tensors[i]

    def __getitem__(self, k: int):
        rng = np.random.default_rng([self.seed, k])
        picks = []
        for pool, n in ((self.pos, self.n_pos), (self.bg, self.n_bg)):
            if len(pool) and n > 0:
                picks.append(pool[rng.choice(len(pool), n, replace=len(pool) < n)])
        sel = np.concatenate(picks) if picks else np.zeros((0, 2), np.int64)
        imgs, bxs, ys = [], [], []
        for i in np.unique(sel[:, 0]):
            j = sel[sel[:, 0] == i, 1]
            imgs.append(self._tensor(int(i)))
            bxs.append(self.data.boxes[i][j])
            ys.append(torch.from_numpy(self.labels[i][j]))
        return warp_regions_multi(imgs, bxs, self.size, self.pad), torch.cat(ys)


class RoiBatches(WindowBatches):
    """Fast R-CNN minibatches for fine-tuning through RoI pooling (``finetune.windows=roi_pool``): item k is
    ``images`` whole images (drawn with a per-item seed) and (``positives`` + ``background``) / ``images``
    proposals of each, positives first (as many as the image has, up to its share), so that the conv map of
    each image is computed once and shared by its regions, as at test time in ``feature_mode=roi_pool``."""

    def __init__(self, *args, images: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.per_batch = max(1, int(images))
        self.usable = np.array([i for i, lab in enumerate(self.labels) if len(lab)], np.int64)

    def __getitem__(self, k: int):
        rng = np.random.default_rng([self.seed, k])
        chosen = rng.choice(self.usable, min(self.per_batch, len(self.usable)), replace=False)
        per_image = max(1, (self.n_pos + self.n_bg) // len(chosen))
        pos_share = max(0, self.n_pos // len(chosen))
        imgs, bxs, ys = [], [], []
        for i in chosen:
            lab = self.labels[i]
            fg, bg = np.flatnonzero(lab > 0), np.flatnonzero(lab == 0)
            take = [rng.choice(fg, min(pos_share, len(fg)), replace=False)] if len(fg) else []
            n_bg = per_image - sum(len(t) for t in take)
            pool = bg if len(bg) else fg
            take.append(rng.choice(pool, n_bg, replace=len(pool) < n_bg))
            j = np.concatenate(take)
            imgs.append(self._tensor(int(i)))
            bxs.append(torch.from_numpy(self.data.boxes[i][j]))
            ys.append(torch.from_numpy(lab[j]))
        return imgs, bxs, torch.cat(ys)


class RCNNModule(L.LightningModule):
    REQUIRES_DATA = ("images", "boxes")  # checked against the dataset before any work (transferrable/compat.py)

    def __init__(
        self,
        backbone: TapBackbone,
        num_classes: int,
        proposals: dict | None = None,
        context_pad: float = 16.0,
        feature_mode: str = "warp",
        roi_scale: float = 1.0,
        layers: list[str] | str = ("fc7",),
        scoring: list[str] | str = "svm",
        finetune: dict | None = None,
        svm: dict | None = None,
        bbox_reg: dict | None = None,
        nms_threshold: float = 0.3,
        max_per_image: int = 100,
        svm_splits: list[str] | str = ("train",),
        max_train_images: int | None = None,
        max_test_images: int | None = None,
        feature_batch: int = 256,
        feature_dtype: str = "float16",
        bf16: bool | None = None,
        channels_last: bool = True,
        cache: bool = True,
        cache_dir: str | None = None,
        draw_images: int = 8,
        draw_top: int = 5,
        seed: int = 0,
        finetune_eval_batches: int = 8,
        analysis: bool = True,
        grayscale_source: bool = False,
        pool5_units: list[int] | None = None,
        draw_top_regions: int = 8,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        # bf16 autocast of this task's own inference paths; null follows trainer.precision (run_task)
        self.use_bf16 = inference_bf16(bf16, None)
        self.backbone = backbone
        self.num_classes = int(num_classes)
        backbone.check_taps(["pool5", "fc6", "fc7"])
        self.head = nn.Linear(backbone.feature_dim("fc7"), self.num_classes + 1)
        self.layers = _as_list(layers)
        self.scorings = _as_list(scoring)
        for v, ok, what in ((self.layers, FEATURE_LAYERS, "rcnn.layers"), (self.scorings, SCORINGS, "rcnn.scoring"),
                            ([feature_mode], FEATURE_MODES, "rcnn.feature_mode")):
            bad = [x for x in v if x not in ok]
            if bad or not v:
                raise ValueError(f"{what}={v}: expected values from {list(ok)}")
        self.proposal_cfg = dict(proposals or {})
        self.ft = {"iterations": 50, "positives": 32, "background": 96, "fg_threshold": 0.5, "lr": 0.01,
                   "momentum": 0.9, "weight_decay": 5e-4, "step_epochs": 10, "gamma": 0.1, "head_lr_mult": 10.0,
                   "windows": "warp", "roi_images": 2, **(finetune or {})}
        if self.ft["windows"] not in FEATURE_MODES:
            raise ValueError(f"rcnn.finetune.windows={self.ft['windows']}: expected one of {list(FEATURE_MODES)}")
        self.svm_cfg = {"C": 1e-3, "bias_multiplier": 10.0, "pos_weight": 2.0, "hard_threshold": -1.0001,
                        "easy_threshold": -1.2, "retrain_limit": 2000, "max_cache": 20000, "neg_threshold": 0.3,
                        "feature_norm": 20.0, "max_iter": 5000, **(svm or {})}
        self.bb_cfg = {"enabled": True, "lam": 1000.0, "min_iou": 0.6, **(bbox_reg or {})}
        self.size = int(backbone.input_size)
        self.pad = scaled_pad(self.size, context_pad)
        self.timing: dict[str, float] = defaultdict(float)
        self.stats: dict[str, Any] = {}
        self.finetune_cache_dir = Path(cache_dir) / "rcnn_finetune" if (cache and cache_dir) else None

    # -- fine-tuning (Lightning) ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone.forward_taps(x, "fc7")["fc7"])

    def roi_pool5(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """pool5 rows (R x D) of ``boxes`` (image pixels) pooled from one image's shared conv5 map (resized by
        ``roi_scale``): torchvision's RoI max pooling onto the pool5 grid. Differentiable, so fine-tuning
        through it (``finetune.windows=roi_pool``) trains the network the way roi_pool features use it."""
        from torchvision.ops import roi_pool

        scale = float(self.hparams.roi_scale)
        if scale != 1.0:
            image = nn.functional.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)
        image = image.to(self.device)
        if self.hparams.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        fmap = self.backbone.forward_taps(image, "conv5")["conv5"].float()
        stride = image.shape[-1] / fmap.shape[-1]
        rois = torch.cat([torch.zeros(len(boxes), 1), boxes.float().cpu() * scale], 1).to(fmap.device)
        g = self.pool5_grid
        return roi_pool(fmap, rois, output_size=(g, g), spatial_scale=1.0 / stride).flatten(1)

    def window_logits(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, labels) of a fine-tuning minibatch: warped windows (x, y) or RoI batches (images, boxes, y)."""
        if len(batch) == 2:
            x, y = batch
            return self(x), y
        images, boxes, y = batch
        pool5 = torch.cat([self.roi_pool5(im, b) for im, b in zip(images, boxes, strict=True)])
        fc7 = self.backbone.stages["fc7"](self.backbone.stages["fc6"](pool5))
        return self.head(fc7), y

    def window_batches(self, data: ImageSet, iterations: int, mean, std, seed: int) -> WindowBatches:
        """Fine-tuning minibatches of ``data`` in the configured ``finetune.windows`` mode."""
        labels = [assign_labels(b, g["boxes"], g["labels"], self.ft["fg_threshold"])[0]
                  for b, g in zip(data.boxes, data.gt, strict=True)]
        args = (data, labels, iterations, self.ft["positives"], self.ft["background"], self.size, self.pad, mean, std, seed)
        if self.ft["windows"] == "roi_pool":
            return RoiBatches(*args, images=self.ft["roi_images"])
        return WindowBatches(*args)

    def training_step(self, batch, batch_idx):
        logits, y = self.window_logits(batch)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("finetune/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("finetune/acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def configure_optimizers(self):
        # the fresh (N+1)-way layer learns faster than the pretrained ones (the original's fc8: lr x10)
        head = [p for p in self.head.parameters() if p.requires_grad]
        body = [p for p in self.backbone.parameters() if p.requires_grad]
        lr = self.ft["lr"]
        groups = [{"params": head, "lr": lr * float(self.ft["head_lr_mult"])}] + ([{"params": body, "lr": lr}] if body else [])
        opt = torch.optim.SGD(groups, lr=lr, momentum=self.ft["momentum"], weight_decay=self.ft["weight_decay"])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(self.ft["step_epochs"]), gamma=self.ft["gamma"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def backbone_trainable(self) -> bool:
        return any(p.requires_grad for p in self.backbone.parameters())

    def finetune(self, trainer: L.Trainer, data: ImageSet, mean, std) -> dict:
        windows = self.window_batches(data, self.ft["iterations"], mean, std, self.hparams.seed)
        info = {"windows": self.ft["windows"], "positive_windows": len(windows.pos), "background_windows": len(windows.bg)}
        if self.ft["iterations"] <= 0 or trainer.max_epochs == 0:
            return {**info, "skipped": True}
        # the fine-tuned network is cached (with a manifest): the warp and roi_pool runs, the SVM and softmax
        # runs and a rerun after a kill all start from the same fine-tuning, so it is computed once
        from transferrable.atomic import atomic_torch_save
        from transferrable.manifest import check_sidecar, sidecar, warn_rebuild, write_sidecar

        # warp fine-tuning keeps the key it had before finetune.windows existed (its caches stay valid)
        ft_key = {k: v for k, v in self.ft.items() if self.ft["windows"] != "warp" or k not in ("windows", "roi_images")}
        key = {"version": FINETUNE_CACHE_VERSION, "start": state_digest(self), "finetune": ft_key,
               "epochs": trainer.max_epochs, "seed": self.hparams.seed, "precision": str(trainer.precision),
               "size": self.size, "pad": self.pad, "images": data.ids, "boxes": state_digest_arrays(data.boxes),
               "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
        name = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = None if self.finetune_cache_dir is None else self.finetune_cache_dir / f"{name}.pt"
        if path is not None and path.is_file():
            why = check_sidecar(path, key)
            if why is None:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                self.load_state_dict(saved["state_dict"])
                self.stats["finetune"] = "reused"
                log.info("rcnn: reusing the fine-tuned network %s", path)
                return {**info, **json.loads(saved["info_json"]), "cache": "hit", "cache_path": str(path)}
            if why != "it has no manifest":  # no manifest: killed while saving, simply fine-tune again
                warn_rebuild("fine-tuned R-CNN network", path, why)
        self.stats["finetune"] = "trained"
        t0 = time.perf_counter()
        trainer.fit(self, train_dataloaders=DataLoader(windows, batch_size=None, shuffle=True))
        info["seconds"] = time.perf_counter() - t0
        info["loss"] = float(trainer.callback_metrics.get("finetune/loss_epoch", float("nan")))
        if path is not None:
            sidecar(path).unlink(missing_ok=True)
            atomic_torch_save(path, {"state_dict": self.state_dict(), "info_json": json.dumps(info, default=float)})
            write_sidecar(path, key)
            info["cache_path"] = str(path)
        return info

    @torch.inference_mode()
    def window_accuracy(self, data: ImageSet, mean, std, batches: int = 8) -> dict:
        """Accuracy of the (N+1)-way head on ``batches`` fine-tuning-style minibatches (32 positive + 96
        background windows) of ``data``, in eval mode: overall, on positive windows (the right class among
        N + 1) and on background windows. Run on held-out (val) images it says whether fine-tuning learned
        to recognise the objects rather than the training windows."""
        windows = self.window_batches(data, batches, mean, std, self.hparams.seed + 7919)
        was_training = self.training
        self.eval()
        hit, cls_hit, ys = [], [], []
        for k in range(len(windows)):
            batch = windows[k]
            if len(batch) == 2:
                batch = (batch[0].to(self.device), batch[1])
            with self._autocast():
                logits, y = self.window_logits(batch)
                logits = logits.float().cpu()
            hit.append(logits.argmax(1) == y)
            cls_hit.append(logits[:, 1:].argmax(1) + 1 == y)  # the class alone, background left out
            ys.append(y)
        self.train(was_training)
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

    # -- features ---------------------------------------------------------------------------------------
    def _autocast(self):
        if self.use_bf16 and self.device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    @torch.inference_mode()
    def image_pool5(self, image: np.ndarray, boxes: np.ndarray, mean, std) -> np.ndarray:
        """pool5 (R x D) of the regions of one image, in the configured feature mode."""
        dev, bs = self.device, int(self.hparams.feature_batch)
        out = []
        if self.hparams.feature_mode == "warp":
            t = time.perf_counter()
            x = image_tensor(image, mean, std)
            self.timing["warp"] += time.perf_counter() - t
            for s in range(0, len(boxes), bs):
                t = time.perf_counter()
                w = warp_regions(x, boxes[s:s + bs], self.size, self.pad).to(dev)
                if self.hparams.channels_last:
                    w = w.contiguous(memory_format=torch.channels_last)
                t1 = time.perf_counter()
                with self._autocast():
                    out.append(self.backbone.forward_taps(w, "pool5")["pool5"].float().cpu())
                t2 = time.perf_counter()
                self.timing["warp"] += t1 - t
                self.timing["cnn"] += t2 - t1
            return torch.cat(out).numpy() if out else np.zeros((0, self.pool5_dim), np.float32)
        t = time.perf_counter()
        with self._autocast():
            pooled = self.roi_pool5(image_tensor(image, mean, std), torch.from_numpy(boxes))
        self.timing["cnn"] += time.perf_counter() - t
        return pooled.float().cpu().numpy()

    @property
    def pool5_grid(self) -> int:
        shape = self.backbone.tap_shapes(["conv5"])["conv5"]
        return int(round(math.sqrt(self.pool5_dim / shape[0])))

    def feature_key(self, data: ImageSet) -> dict:
        return {"version": CACHE_VERSION, "weights": self._digest, "mode": self.hparams.feature_mode,
                "roi_scale": self.hparams.roi_scale if self.hparams.feature_mode == "roi_pool" else None,
                "size": self.size, "pad": self.pad, "proposals": self._proposal_tag, "split": data.name,
                "ids": hashlib.sha256("\n".join(data.ids).encode()).hexdigest(), "regions": data.num_regions,
                "dtype": self.hparams.feature_dtype, "bf16": self.use_bf16}

    def pool5_features(self, data: ImageSet, mean, std, cache_dir: Path | None) -> np.ndarray:
        """pool5 of every region of ``data`` as a (read-only) np.memmap, computed once per key.

        Files under ``cache_dir``: ``pool5-<split>-<hash>.dat`` (rows, ``feature_dtype``) and its manifest ``.json``
        (version, key, key hash, shape, dtype, bytes; written last). A manifest that does not parse, names another
        key or shape, or a ``.dat`` of another size (truncated) is reported with a ``CacheWarning`` and rebuilt.
        While it is being built the rows go to ``.pool5-<split>-<hash>.partial`` with a progress file saying how
        many images are on disk (flushed before it is written): a run killed mid-extraction resumes from there.
        """
        import warnings

        from transferrable.atomic import atomic_write_json
        from transferrable.feature_cache import key_hash
        from transferrable.manifest import CacheWarning

        key = self.feature_key(data)
        h = key_hash(key)
        dtype = np.dtype(self.hparams.feature_dtype)
        shape = (data.num_regions, self.pool5_dim)
        start = 0
        self.stats[f"pool5_images_computed_{data.name}"] = 0
        if cache_dir is not None:
            stem = f"pool5-{data.name}-{h[:16]}"
            path, manifest = cache_dir / f"{stem}.dat", cache_dir / f"{stem}.json"
            partial, progress = cache_dir / f".{stem}.partial", cache_dir / f".{stem}.progress.json"
            if manifest.is_file():
                why = None
                try:
                    m = json.loads(manifest.read_text())
                    if m.get("version") != CACHE_VERSION or m.get("key_hash") != h or m.get("key") != key:
                        why = "it names another key or version"
                    elif tuple(m["shape"]) != shape or m["dtype"] != dtype.name:
                        why = f"shape/dtype {m['shape']}/{m['dtype']} != {list(shape)}/{dtype.name}"
                    elif not path.is_file() or path.stat().st_size != m["bytes"]:
                        size = path.stat().st_size if path.is_file() else 0
                        why = f"the .dat file has {size} bytes, the manifest says {m['bytes']} (truncated?)"
                except (ValueError, KeyError, TypeError, OSError) as err:
                    why = f"unreadable manifest ({type(err).__name__})"
                if why is None:
                    self.stats[f"feature_cache_{data.name}"] = "hit"
                    return np.memmap(path, dtype=dtype, mode="r", shape=shape)
                warnings.warn(f"pool5 cache {manifest} is unusable: {why}; rebuilding it", CacheWarning, stacklevel=2)
                log.warning("pool5 cache %s unusable (%s): recomputing", manifest, why)
                manifest.unlink(missing_ok=True)
            cache_dir.mkdir(parents=True, exist_ok=True)
            expected_bytes = int(np.prod(shape)) * dtype.itemsize
            try:
                done = json.loads(progress.read_text())
                if done.get("key_hash") == h and partial.stat().st_size == expected_bytes:
                    start = int(done["images"])
            except (OSError, ValueError, KeyError, TypeError):
                start = 0
            arr = np.memmap(partial, dtype=dtype, mode="r+" if start else "w+", shape=shape)
            if start:
                log.info("rcnn: pool5 of %s resumes at image %d of %d (%s)", data.name, start, len(data), partial)
        else:
            path = partial = None
            arr = np.zeros(shape, dtype)
        self.stats[f"feature_cache_{data.name}"] = "miss" if not start else "resumed"
        self.eval()
        every = max(1, len(data) // 20)  # progress points: a kill loses at most ~5% of the extraction
        for i in range(start, len(data)):
            arr[data.rows(i)] = self.image_pool5(data.images[i], data.boxes[i], mean, std)
            self.stats[f"pool5_images_computed_{data.name}"] += 1
            if partial is not None and ((i + 1) % every == 0) and i + 1 < len(data):
                arr.flush()  # the rows reach the file before the progress file says they are there
                atomic_write_json(progress, {"key_hash": h, "images": i + 1})
        if path is None:
            return arr
        arr.flush()
        del arr
        partial.replace(path)
        progress.unlink(missing_ok=True)
        atomic_write_json(manifest, {"version": CACHE_VERSION, "key": key, "key_hash": h, "shape": list(shape),
                                     "dtype": dtype.name, "bytes": path.stat().st_size})
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)

    @torch.inference_mode()
    def from_pool5(self, pool5: np.ndarray, layer: str) -> np.ndarray:
        """fc6 / fc7 (eval mode: no dropout) computed from cached pool5 rows."""
        x = torch.from_numpy(np.asarray(pool5, np.float32))
        if layer == "pool5":
            return x.numpy()
        self.backbone.eval()
        outs = []
        for s in range(0, len(x), 4096):
            y = self.backbone.stages["fc6"](x[s:s + 4096].to(self.device))
            if layer == "fc7":
                y = self.backbone.stages["fc7"](y)
            outs.append(y.float().cpu())
        return torch.cat(outs).numpy() if outs else np.zeros((0, self.backbone.feature_dim(layer)), np.float32)

    @torch.inference_mode()
    def softmax_scores(self, pool5: np.ndarray) -> np.ndarray:
        fc7 = torch.from_numpy(self.from_pool5(pool5, "fc7")).to(self.device)
        return self.head(fc7).softmax(1)[:, 1:].cpu().numpy()

    # -- SVMs and box regression ----------------------------------------------------------------------
    def svm_store(self, output_dir: Path | None):
        """Per-class SVMs of this run on disk (``<output_dir>/svms``, one entry + manifest per class and layer,
        written atomically as each class finishes): a rerun in the same directory reuses the finished classes."""
        from transferrable.feature_cache import FeatureCache

        return None if output_dir is None else FeatureCache(Path(output_dir) / "svms")

    def svm_key(self, data: ImageSet, layer: str, scale: float, c: int) -> dict:
        return {"features": self.feature_key(data), "layer": layer, "scale": float(scale), "svm": self.svm_cfg,
                "class": int(c), "num_classes": self.num_classes}

    def train_svms(self, data: ImageSet, feats: np.ndarray, scale: float, layer: str = "fc7",
                   store=None) -> HardNegativeMiner:
        c = self.svm_cfg
        stat_names = ("positives", "cache", "peak_cache", "retrains")

        def save(k: int) -> None:
            key = self.svm_key(data, layer, scale, k)
            store.save(f"svm-{layer}-class{k:03d}", key, np.append(miner.W[k], miner.b[k]).astype(np.float32))
            st = miner.class_stats(k)
            store.save(f"svm-{layer}-class{k:03d}-stats", key, np.array([st[n] for n in stat_names], np.int64))
            self.stats["svm_classes_trained"] = self.stats.get("svm_classes_trained", 0) + 1

        miner = HardNegativeMiner(self.num_classes, feats.shape[1], C=c["C"], bias_multiplier=c["bias_multiplier"],
                                  pos_weight=c["pos_weight"], hard_threshold=c["hard_threshold"],
                                  easy_threshold=c["easy_threshold"], retrain_limit=c["retrain_limit"],
                                  max_cache=c["max_cache"], max_iter=c["max_iter"],
                                  on_finished=None if store is None else save)
        if store is not None:
            for k in range(self.num_classes):
                key = self.svm_key(data, layer, scale, k)
                wb = store.load(f"svm-{layer}-class{k:03d}", key)
                st = store.load(f"svm-{layer}-class{k:03d}-stats", key)
                if wb is not None and st is not None and wb.shape == (feats.shape[1] + 1,):
                    miner.restore(k, wb[:-1], float(wb[-1]), dict(zip(stat_names, st.tolist(), strict=True)))
            self.stats["svm_classes_reused"] = self.stats.get("svm_classes_reused", 0) + int(miner.restored.sum())
            if miner.restored.any():
                log.info("rcnn: %s SVMs of %d classes reused from %s", layer, int(miner.restored.sum()), store.root)
        pos = defaultdict(list)
        for i in range(len(data)):
            g = data.gt[i]
            rows = np.arange(data.rows(i).start, data.rows(i).stop)[data.is_gt[i]]
            for r, lab, d in zip(rows, g["labels"], g["difficult"], strict=True):
                if not d:
                    pos[int(lab)].append(feats[r])
        for k, v in pos.items():
            miner.set_positives(k, np.stack(v) * scale)
        if not miner.restored[miner.has_model].all():  # every class restored: no pass over the features
            for i in range(len(data)):
                g = data.gt[i]
                X = feats[data.rows(i)] * scale
                neg = class_max_iou(data.boxes[i], g["boxes"], g["labels"], self.num_classes) < c["neg_threshold"]
                miner.add_image(X, neg)
        miner.finish()
        return miner

    def train_box_regressor(self, data: ImageSet, pool5: np.ndarray, scale: float) -> BoxRegressor:
        X, P, G, C, ious = [], [], [], [], []
        for i in range(len(data)):
            g = data.gt[i]
            if len(g["boxes"]) == 0:
                continue
            _, iou, arg = assign_labels(data.boxes[i], g["boxes"], g["labels"], 0.0)
            keep = iou > self.bb_cfg["min_iou"]
            rows = np.arange(data.rows(i).start, data.rows(i).stop)[keep]
            X.append(np.asarray(pool5[rows], np.float32) * scale)
            P.append(data.boxes[i][keep])
            G.append(g["boxes"][arg[keep]])
            C.append(g["labels"][arg[keep]])
            ious.append(iou[keep])
        reg = BoxRegressor(self.num_classes, self.bb_cfg["lam"], self.bb_cfg["min_iou"])
        if X:
            reg.fit(np.concatenate(X), np.concatenate(P), np.concatenate(G), np.concatenate(C), np.concatenate(ious))
        return reg

    # -- detection --------------------------------------------------------------------------------------
    def detect(self, boxes: np.ndarray, scores: np.ndarray, reg_boxes: list[np.ndarray] | None,
               image_size: tuple[int, int]) -> dict:
        return detect_boxes(boxes, scores, reg_boxes, image_size, self.hparams.nms_threshold, self.hparams.max_per_image)

    # -- analysis figures (thesis Figures 3.4 and 3.5) -------------------------------------------------
    def analysis_figures(self, test: ImageSet, pool5_test: np.ndarray, detections: list[dict],
                         class_names: list[str], output_dir: Path, info: dict) -> dict:
        """``pool5_units.png``: the top regions of six pool5 units over the test proposals (Figure 3.4);
        ``fp_breakdown.png``: the false positives of the headline detector by type (Figure 3.5)."""
        from callbacks.image_grid import save_image_grid
        from transferrable.detection_analysis import (
            FP_TYPES,
            SCENE_GROUPS,
            false_positive_types,
            plot_false_positive_breakdown,
            top_regions_per_unit,
        )

        out = {}
        grid = self.pool5_grid
        units = [int(u) for u in self.hparams.pool5_units] if self.hparams.pool5_units else \
            choose_pool5_units(pool5_test, grid)
        image_index = np.concatenate([np.full(len(b), i) for i, b in enumerate(test.boxes)]).astype(np.int64)
        boxes = np.concatenate(test.boxes).astype(np.float32)
        top = int(self.hparams.draw_top_regions)
        rows = top_regions_per_unit(pool5_test, image_index, boxes, units, top=top)
        tiles, titles = [], []
        side = 64
        for u, picks in zip(units, rows, strict=True):
            c, cell = divmod(u, grid * grid)
            for r in picks:
                img = test.images[image_index[r]]
                x1, y1, x2, y2 = np.round(boxes[r]).astype(int)
                crop = img[max(0, y1):max(y1 + 1, y2), max(0, x1):max(x1 + 1, x2)]
                tiles.append(cv2_resize(crop, side))
                titles.append(f"c{c} {float(pool5_test[r, u]):.1f}")  # the cell is the same for the row
            tiles += [np.full((side, side, 3), 255, np.uint8)] * (top - len(picks))
            titles += [""] * (top - len(picks))
        path = save_image_grid(np.stack(tiles), output_dir / "pool5_units.png", nrow=top, titles=titles)
        out["rcnn/pool5_units"] = path
        info["pool5_units"] = {"units": units, "grid": grid,
                               "channel_cell": [[u // (grid * grid), list(divmod(u % (grid * grid), grid))] for u in units]}
        # false-positive breakdown
        groups = SCENE_GROUPS if set(sum(SCENE_GROUPS.values(), [])) <= set(class_names) else {"all": class_names}
        similar = [[class_names.index(n) for n in g if n in class_names] for g in groups.values()]
        types = false_positive_types(detections, test.gt, self.num_classes, similar)
        npos = [int(sum(int(((np.asarray(g["labels"]) == c) & ~np.asarray(g["difficult"], bool)).sum())
                        for g in test.gt)) for c in range(self.num_classes)]
        # as Hoiem et al.: the top-ranked false positives, up to as many as the class has objects
        within = [t[: max(n, 1)] for t, n in zip(types, npos, strict=True)]
        flat = [t for ts in within for t in ts]
        info["false_positives_top_npos"] = {t: flat.count(t) for t in FP_TYPES}
        out["rcnn/fp_breakdown"] = plot_false_positive_breakdown(
            types, class_names, groups, output_dir / "fp_breakdown.png",
            title=f"false positives of {self.backbone.arch} R-CNN by type (Loc / Sim / Oth / BG)")
        return out

    # -- the whole task ------------------------------------------------------------------------------
    def run_task(self, trainer: L.Trainer, datamodule, output_dir: str | Path) -> dict:
        self.use_bf16 = inference_bf16(self.hparams.bf16, trainer.precision)
        from transferrable.atomic import atomic_write_json
        from transferrable.voc_eval import evaluate_detections

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        hp = self.hparams
        datamodule.setup("fit")
        class_names = list(getattr(datamodule, "class_names", None) or [str(i) for i in range(self.num_classes)])
        mean, std = datamodule.mean, datamodule.std
        cache_root = Path(hp.cache_dir) if (hp.cache and hp.cache_dir) else None
        root_tag = hashlib.sha256(str(getattr(datamodule, "root", "")).encode()).hexdigest()[:10]
        pc = ProposalCache(None if cache_root is None else cache_root / "proposals" / root_tag, **self.proposal_cfg)
        self._proposal_tag = pc.tag
        self.pool5_dim = self.backbone.feature_dim("pool5")

        def load(split_keys, limit, with_gt, name, timed=False):
            items = []
            for key in split_keys:
                ds = datamodule.datasets.get(key)
                if ds is None:
                    raise ValueError(f"rcnn: the data module has no '{key}' split")
                items += [ds[i] for i in range(len(ds))]
            if limit:
                items = items[: int(limit)]
            props = []
            for it in items:
                t = time.perf_counter()
                props.append(pc.get(it["image_id"], it["image"]))
                if timed:
                    self.timing["proposals"] += time.perf_counter() - t
            return ImageSet(name, items, props, with_gt)

        t_all = time.perf_counter()
        log.info("rcnn: proposals (%s) for train/test images", pc.tag)
        train = load(["train"], hp.max_train_images, True, "train")
        svm_keys = _as_list(hp.svm_splits)
        svm_data = train if svm_keys == ["train"] else load(svm_keys, hp.max_train_images, True, "+".join(svm_keys))
        self.timing.clear()
        test = load(["test"], hp.max_test_images, False, "test", timed=True)
        metrics: dict[str, Any] = {}
        info: dict[str, Any] = {"proposal_cache": dict(pc.stats), "dataset_summary": getattr(datamodule, "summary", {}),
                                "proposals_per_image": {"train": float(np.mean([len(p) for p in train.proposals])),
                                                        "test": float(np.mean([len(p) for p in test.proposals]))}}
        recall = []
        for p, g in zip(test.proposals, test.gt, strict=True):
            m = ~g["difficult"]
            if m.any():
                from transferrable.voc_eval import box_iou
                recall += list(box_iou(g["boxes"][m], p).max(1) >= 0.5) if len(p) else [False] * int(m.sum())
        metrics["rcnn/proposal_recall"] = float(np.mean(recall)) if recall else float("nan")

        # 2. fine-tuning
        if hp.grayscale_source:
            info["conv1_colour_removed"] = fold_conv1_colour(self.backbone)
            log.info("rcnn: grayscale source: conv1 folded to colour-blind filters (%.0f%% of its weight norm "
                     "was untrained colour noise)", 100 * info["conv1_colour_removed"])
        finetuned = self.backbone_trainable()
        log.info("rcnn: %d train images (%.0f proposals each), %d test; proposal recall@0.5 %.3f; fine-tuning: %s",
                 len(train), info["proposals_per_image"]["train"], len(test), metrics["rcnn/proposal_recall"],
                 finetuned or "softmax" in self.scorings)
        if finetuned or "softmax" in self.scorings:
            # fine-tuning sees every training image (as the thesis fine-tunes on all of trainval); only the
            # SVMs' hard-negative mining, the slow part on a CPU, is limited by max_train_images
            ft_limit = self.ft.get("max_images")
            ft_data = train if ft_limit == hp.max_train_images else load(["train"], ft_limit, True, "finetune")
            info["finetune"] = {"images": len(ft_data), **self.finetune(trainer, ft_data, mean, std)}
            if int(hp.finetune_eval_batches) > 0 and not info["finetune"].get("skipped"):
                # is the (N+1)-way head recognising objects, or only the training windows?
                held = {"train": train}
                if datamodule.datasets.get("val") is not None:
                    held["val"] = load(["val"], hp.max_test_images, True, "val")
                for split, data in held.items():
                    acc = self.window_accuracy(data, mean, std, int(hp.finetune_eval_batches))
                    info["finetune"][f"{split}_windows"] = acc
                    for k in ("acc", "fg_acc", "bg_acc", "fg_class_acc"):
                        if k in acc:
                            metrics[f"rcnn/finetune/{split}_{k}"] = acc[k]
                log.info("rcnn: fine-tuned head accuracy %s", {k: round(v, 3) for k, v in metrics.items()
                                                               if k.startswith("rcnn/finetune/")})
        self.eval()
        self._digest = state_digest(self)
        # 3. pool5 for all regions
        feat_dir = None if cache_root is None else cache_root / "rcnn_features"
        t = time.perf_counter()
        log.info("rcnn: pool5 of %d train and %d test regions (%s)", svm_data.num_regions, test.num_regions,
                 self.hparams.feature_mode)
        pool5_train = self.pool5_features(svm_data, mean, std, feat_dir)
        info["train_feature_seconds"] = time.perf_counter() - t
        test_timing_before = dict(self.timing)
        pool5_test = self.pool5_features(test, mean, std, feat_dir)
        if self.stats.get("feature_cache_test") == "hit":
            self.timing = defaultdict(float, test_timing_before)
        # 4. classifiers per variant
        variants: dict[str, dict] = {}
        scale5 = norm_scale(pool5_train[: min(len(pool5_train), 20000)], self.svm_cfg["feature_norm"])
        regressor = None
        if self.bb_cfg["enabled"]:
            regressor = self.train_box_regressor(svm_data, pool5_train, scale5)
            info["bbox_reg_pairs"] = regressor.pairs
        t_score = 0.0
        for scoring in self.scorings:
            layers = self.layers if scoring == "svm" else ["fc7"]
            for layer in layers:
                name = f"{scoring}/{layer}"
                t0 = time.perf_counter()
                log.info("rcnn: %s", name)
                if scoring == "svm":
                    # read chunk by chunk (fc6/fc7 computed per chunk): memory stays bounded as the cache grows
                    ftr = ChunkedRows(pool5_train, None if layer == "pool5" else partial(self.from_pool5, layer=layer))
                    scale = norm_scale(ftr[: min(len(ftr), 20000)], self.svm_cfg["feature_norm"])
                    miner = self.train_svms(svm_data, ftr, scale, layer, self.svm_store(output_dir))
                    info[f"svm/{layer}"] = {"seconds": time.perf_counter() - t0, "feature_scale": scale, **miner.summary()}
                    del ftr
                t1 = time.perf_counter()
                if scoring == "svm":
                    fte = self.from_pool5(pool5_test, layer) if layer != "pool5" else np.asarray(pool5_test, np.float32)
                    S = miner.scores(fte * scale)
                    S[:, ~miner.has_model] = -np.inf
                else:
                    S = self.softmax_scores(pool5_test)
                t_feat = time.perf_counter() - t1
                do_bb = [False] + ([True] if regressor is not None and layer == layers[-1] else [])
                for bb in do_bb:
                    t2 = time.perf_counter()
                    dets = []
                    for i in range(len(test)):
                        rows = test.rows(i)
                        boxes = test.boxes[i]
                        reg = None
                        if bb:
                            X5 = np.asarray(pool5_test[rows], np.float32) * scale5
                            reg = [regressor.predict(X5, boxes, c) for c in range(self.num_classes)]
                        h, w = test.images[i].shape[:2]
                        dets.append(self.detect(boxes, S[rows], reg, (w, h)))
                    key = name + ("+bb" if bb else "")
                    variants[key] = {"detections": dets, "seconds": time.perf_counter() - t2 + t_feat}
                if scoring == self.scorings[0] and layer == layers[-1]:
                    t_score = variants[key]["seconds"]
        # 5. evaluation
        results = {}
        for key, v in variants.items():
            ev = evaluate_detections(v["detections"], test.gt, self.num_classes)
            results[key] = {"ap": ev["ap"], "ap07": ev["ap07"], "mAP": ev["mAP"], "mAP_07": ev["mAP_07"], "npos": ev["npos"]}
            metrics[f"test/{key}/mAP"] = ev["mAP"]
            metrics[f"test/{key}/mAP_07"] = ev["mAP_07"]
        firsts = [k for k in variants if k.startswith(self.scorings[0] + "/")]
        main = firsts[-1]
        metrics["test/mAP"] = results[main]["mAP"]
        metrics["test/mAP_07"] = results[main]["mAP_07"]
        metrics["rcnn/main"] = main
        metrics["rcnn/finetuned"] = bool(finetuned)
        n = max(len(test), 1)
        for k in ("proposals", "warp", "cnn"):
            metrics[f"rcnn/time/{k}"] = self.timing.get(k, 0.0) / n
        metrics["rcnn/time/scoring_nms"] = t_score / n
        metrics["rcnn/seconds_per_image"] = sum(metrics[f"rcnn/time/{k}"] for k in ("proposals", "warp", "cnn", "scoring_nms"))
        metrics["rcnn/total_seconds"] = time.perf_counter() - t_all
        for k in ("feature_cache_train", "feature_cache_test"):
            if k in self.stats:
                info[k] = self.stats[k]
        info["proposal_cache"] = dict(pc.stats)
        tag = "FT " if finetuned else ""
        table = {
            "title": f"Detection AP (%) on {getattr(datamodule, 'name', 'dataset')} test (VOC2010+ area; "
                     f"mAP_07 = 11-point), backbone {self.backbone.arch}, feature_mode={hp.feature_mode}",
            "corner": "variant", "columns": [*class_names, "mAP", "mAP_07"],
            "rows": [{"label": f"R-CNN {tag}{k.replace('svm/', '').replace('+bb', ' BB')}",
                      "cells": [None if not math.isfinite(a) else [100 * a] for a in r["ap"]]
                      + [[100 * r["mAP"]], [100 * r["mAP_07"]]]} for k, r in results.items()],
        }
        atomic_write_json(output_dir / "tables.json", [table])
        atomic_write_json(output_dir / "rcnn_results.json", {
            "classes": class_names, "main": main, "results": results, "metrics": metrics, "info": info,
            "config": {"feature_mode": hp.feature_mode, "layers": self.layers, "scoring": self.scorings,
                       "input_size": self.size, "context_pad": self.pad, "proposals": self.proposal_cfg,
                       "finetune": self.ft, "svm": self.svm_cfg, "bbox_reg": self.bb_cfg}})
        print(render_ap_table(table), flush=True)
        images = {}
        if hp.draw_images:
            try:
                images["rcnn/detections"] = draw_detections(test, variants[main]["detections"], class_names,
                                                            output_dir / "detections.png", hp.draw_images, hp.draw_top)
            except Exception as err:  # noqa: BLE001 - a drawing failure must not lose the results
                log.warning("could not draw detections: %s", err)
        if hp.analysis:
            try:
                images.update(self.analysis_figures(test, pool5_test, variants[main]["detections"], class_names,
                                                    output_dir, info))
            except Exception as err:  # noqa: BLE001 - a figure failure must not lose the results
                log.warning("could not draw the analysis figures: %s", err)
            atomic_write_json(output_dir / "rcnn_results.json", {
                **json.loads((output_dir / "rcnn_results.json").read_text()), "info": info})
        log_results(trainer, metrics, images)
        return metrics


def pool5_unit_index(channel: int, y: int, x: int, grid: int) -> int:
    """Column of a pool5 row (flattened C x grid x grid) for channel ``channel`` at cell (y, x)."""
    return int(channel) * grid * grid + int(y) * grid + int(x)


def choose_pool5_units(pool5: np.ndarray, grid: int, count: int = 6) -> list[int]:
    """``count`` units at the centre cell of the pool5 grid (as the thesis shows units at (3, 3) of 6 x 6),
    the channels whose activation varies most over the regions (dead or constant units show nothing)."""
    channels = pool5.shape[1] // (grid * grid)
    cols = [pool5_unit_index(c, grid // 2, grid // 2, grid) for c in range(channels)]
    sample = np.asarray(pool5[: min(len(pool5), 50000)][:, cols], np.float32)
    best = np.argsort(-sample.std(0), kind="stable")[:count]
    return [cols[int(b)] for b in best]


def detect_boxes(boxes: np.ndarray, scores: np.ndarray, reg_boxes: list[np.ndarray] | None,
                 image_size: tuple[int, int], nms_threshold: float = 0.3, max_per_image: int = 100) -> dict:
        """Per-class NMS (``nms_threshold``) over one image's scored proposals, then the top
        ``max_per_image`` overall. ``scores`` R x C; ``reg_boxes`` per class R x 4 (box regression) or None."""
        from torchvision.ops import batched_nms

        R, C = scores.shape
        if R == 0:
            return {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}
        w, h = image_size
        all_boxes = np.stack(reg_boxes, 0) if reg_boxes is not None else np.broadcast_to(boxes, (C, R, 4))
        all_boxes = all_boxes.reshape(-1, 4).copy()
        all_boxes[:, [0, 2]] = all_boxes[:, [0, 2]].clip(0, w)
        all_boxes[:, [1, 3]] = all_boxes[:, [1, 3]].clip(0, h)
        labels = np.repeat(np.arange(C), R)
        s = scores.T.reshape(-1)
        ok = np.isfinite(s) & (all_boxes[:, 2] > all_boxes[:, 0]) & (all_boxes[:, 3] > all_boxes[:, 1])
        b, s, lab = torch.from_numpy(all_boxes[ok]), torch.from_numpy(s[ok].astype(np.float32)), torch.from_numpy(labels[ok])
        keep = batched_nms(b, s, lab, float(nms_threshold))[: int(max_per_image)]
        return {"boxes": b[keep].numpy(), "scores": s[keep].numpy(), "labels": lab[keep].numpy()}


def cv2_resize(image: np.ndarray, side: int) -> np.ndarray:
    import cv2

    return cv2.resize(np.ascontiguousarray(image), (side, side), interpolation=cv2.INTER_LINEAR)


def render_ap_table(table: dict) -> str:
    lines = [table["title"], " | ".join([table["corner"], *table["columns"]])]
    for r in table["rows"]:
        lines.append(" | ".join([r["label"], *("-" if c is None else f"{c[0]:.1f}" for c in r["cells"])]))
    return "\n".join(lines)


def draw_detections(data: ImageSet, dets: list[dict], class_names: list[str], path: Path, n: int = 8,
                    top: int = 5) -> Path:
    """The first ``n`` test images with ground truth (green) and the ``top`` highest-scoring detections (red,
    class and score), as one PNG grid."""
    from PIL import Image, ImageDraw

    from callbacks.image_grid import save_image_grid

    n = min(n, len(data))
    W = max(data.images[i].shape[1] for i in range(n))
    H = max(data.images[i].shape[0] for i in range(n))
    up = max(1, int(round(240 / W)))
    tiles, titles = [], []
    for i in range(n):
        img = Image.fromarray(data.images[i]).convert("RGB")
        sx, sy = W * up / img.width, H * up / img.height
        img = img.resize((W * up, H * up), Image.NEAREST)
        d = ImageDraw.Draw(img)

        def box(b, sx=sx, sy=sy):
            return [float(b[0]) * sx, float(b[1]) * sy, float(b[2]) * sx, float(b[3]) * sy]

        for b in data.gt[i]["boxes"]:
            d.rectangle(box(b), outline=(0, 200, 0), width=1)
        det = dets[i]
        for j in np.argsort(-det["scores"])[:top]:
            b = box(det["boxes"][j])
            d.rectangle(b, outline=(230, 0, 0), width=2)
            d.text((b[0] + 2, b[1] + 1), f"{class_names[int(det['labels'][j])]} {det['scores'][j]:.2f}", fill=(255, 255, 0))
        tiles.append(np.asarray(img))
        titles.append(data.ids[i])
    return save_image_grid(np.stack(tiles), path, nrow=4, titles=titles)
