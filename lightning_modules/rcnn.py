"""task=rcnn: the R-CNN network (thesis 3.1): a backbone with named taps plus a fresh (N+1)-way head on fc7.

The stages (proposals, fine-tuning, the pool5 cache, SVMs, box regression, NMS, VOC AP) are ``engine/rcnn/pipeline.py``;
this module is what they run on the network:

- fine-tuning steps (``training_step``, ``configure_optimizers``): cross-entropy of the (N+1)-way head over a
  minibatch of warped windows ``(x, y)`` or of whole images whose regions are RoI-pooled from one conv5 map
  ``(images, boxes, y)`` (``rcnn.finetune.windows``); the head learns at ``finetune.head_lr_mult`` x the lr;
- region features: ``image_pool5`` (every region of one image, ``feature_mode=warp`` -- each region warped with
  context padding to ``input_size`` -- or ``roi_pool`` -- conv1..conv5 once per image, resized by ``roi_scale``,
  each region max-pooled onto the pool5 grid, the SPP / Fast R-CNN idea of thesis 3.1.7.6), ``from_pool5``
  (fc6/fc7 from cached pool5 rows, eval mode) and ``softmax_scores`` (the head as the detector).

The module takes the ``rcnn:`` config node (``conf/task/rcnn.yaml``, the only place its defaults are written) and
the ``_partial_`` optimiser and scheduler of ``model:``; built without them (tests, benchmarks) it reads the same
YAML, with keyword overrides of the node's keys. ``stats`` and ``timing`` collect what the pipeline reports.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from models.backbones import TapBackbone
from models.rcnn.regions import image_tensor, scaled_pad, warp_regions
from transferrable.core.precision import inference_bf16
from transferrable.core.task_defaults import plain, task_config

FEATURE_LAYERS = ("pool5", "fc6", "fc7")
SCORINGS = ("svm", "softmax")
FEATURE_MODES = ("warp", "roi_pool")


def as_list(v) -> list:
    if v is None:
        return []
    return [v] if isinstance(v, str) else list(v)


def _check_choices(cfg: dict) -> None:
    checks = ((as_list(cfg["layers"]), FEATURE_LAYERS, "rcnn.layers"), (as_list(cfg["scoring"]), SCORINGS, "rcnn.scoring"),
              ([cfg["feature_mode"]], FEATURE_MODES, "rcnn.feature_mode"))
    for v, ok, what in checks:
        bad = [x for x in v if x not in ok]
        if bad or not v:
            raise ValueError(f"{what}={v}: expected values from {list(ok)}")
    if cfg["finetune"]["windows"] not in FEATURE_MODES:
        raise ValueError(f"rcnn.finetune.windows={cfg['finetune']['windows']}: expected one of {list(FEATURE_MODES)}")


class RCNNModule(L.LightningModule):
    REQUIRES_DATA = ("images", "boxes")  # checked against the dataset before any work (transferrable/run/compat.py)

    def __init__(self, backbone: TapBackbone, num_classes: int, cfg: Mapping | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None, **overrides: Any):
        super().__init__()
        root = task_config("rcnn", "rcnn", cfg, overrides)
        self.cfg: dict = plain(root.rcnn)
        _check_choices(self.cfg)
        if optimizer is None or scheduler is None:  # built outside Hydra: conf/task/rcnn.yaml's model.optimizer etc.
            from hydra.utils import instantiate

            optimizer = optimizer or instantiate(plain(root.model.optimizer))
            scheduler = scheduler or instantiate(plain(root.model.scheduler))
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        # hparams: plain containers only, so that a checkpoint loads with torch.load(weights_only=True)
        self.save_hyperparameters({"num_classes": int(num_classes), "cfg": self.cfg})
        # bf16 autocast of this task's own inference paths; null follows trainer.precision (set by the pipeline)
        self.use_bf16 = inference_bf16(self.cfg["bf16"], None)
        self.backbone = backbone
        self.num_classes = int(num_classes)
        backbone.check_taps(["pool5", "fc6", "fc7"])
        self.head = nn.Linear(backbone.feature_dim("fc7"), self.num_classes + 1)
        self.layers, self.scorings = as_list(self.cfg["layers"]), as_list(self.cfg["scoring"])
        self.pool5_dim = backbone.feature_dim("pool5")
        self.size = int(backbone.input_size)
        self.pad = scaled_pad(self.size, self.cfg["context_pad"])
        self.timing: dict[str, float] = defaultdict(float)
        self.stats: dict[str, Any] = {}
        self.predict_job: Callable[[int], Any] | None = None  # set around engine/rcnn/pipeline.py's sharded trainer.predict

    # -- fine-tuning ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone.forward_taps(x, "fc7")["fc7"])

    def roi_pool5(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """pool5 rows (R x D) of ``boxes`` (image pixels) pooled from one image's shared conv5 map (resized by
        ``roi_scale``): torchvision's RoI max pooling onto the pool5 grid. Differentiable, so fine-tuning
        through it (``finetune.windows=roi_pool``) trains the network the way roi_pool features use it."""
        from torchvision.ops import roi_pool

        scale = float(self.cfg["roi_scale"])
        if scale != 1.0:
            image = nn.functional.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)
        image = image.to(self.device)
        if self.cfg["channels_last"]:
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

    def training_step(self, batch, batch_idx):
        logits, y = self.window_logits(batch)
        loss = nn.functional.cross_entropy(logits, y)
        # sync_dist: under DDP the epoch values are over every rank's windows (one process: no-op)
        self.log("finetune/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log("finetune/acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True,
                 batch_size=len(y), sync_dist=True)
        return loss

    def predict_step(self, batch, batch_idx):
        """A pipeline's per-image job run by ``trainer.predict`` over image indices (engine/rcnn/pipeline.py ``sharded_map``:
        under DDP each rank takes its share of the images): ``[(i, predict_job(i)), ...]``."""
        return [(int(i), self.predict_job(int(i))) for i in batch]

    def configure_optimizers(self):
        # the fresh (N+1)-way layer learns faster than the pretrained ones (the original's fc8: lr x10)
        head = [p for p in self.head.parameters() if p.requires_grad]
        body = [p for p in self.backbone.parameters() if p.requires_grad]
        lr = float(getattr(self.optimizer_factory, "keywords", {}).get("lr", self.cfg["finetune"]["lr"]))
        groups = [{"params": head, "lr": lr * float(self.cfg["finetune"]["head_lr_mult"])}]
        groups += [{"params": body, "lr": lr}] if body else []
        opt = self.optimizer_factory(params=groups)
        sched = self.scheduler_factory(optimizer=opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # -- region features ------------------------------------------------------------------------------
    def _autocast(self):
        if self.use_bf16 and self.device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    @property
    def pool5_grid(self) -> int:
        shape = self.backbone.tap_shapes(["conv5"])["conv5"]
        return int(round(math.sqrt(self.pool5_dim / shape[0])))

    @torch.inference_mode()
    def image_pool5(self, image: np.ndarray, boxes: np.ndarray, mean, std) -> np.ndarray:
        """pool5 (R x D) of the regions of one image, in the configured feature mode (seconds in ``timing``)."""
        dev, bs = self.device, int(self.cfg["feature_batch"])
        out = []
        if self.cfg["feature_mode"] == "warp":
            t = time.perf_counter()
            x = image_tensor(image, mean, std)
            self.timing["warp"] += time.perf_counter() - t
            for s in range(0, len(boxes), bs):
                t = time.perf_counter()
                w = warp_regions(x, boxes[s:s + bs], self.size, self.pad).to(dev)
                if self.cfg["channels_last"]:
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
