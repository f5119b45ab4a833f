"""task=rcnn_segmentation: region features for R-CNN's region-based semantic segmentation (thesis 3.2).

The stages (segment proposals, the optional detection fine-tuning, the feature cache, per-class SVRs, thresholds,
pasted label maps, mean IoU) are ``engine/rcnn/segmentation.py``; this module holds the backbone and computes what
they need of it: ``image_features``, the fc6/fc7 features of one image's masked regions, as the warped
context-padded box (*full*) and the same warp with the background replaced by the mean (*fg*). The module has no
training steps of its own (``finetune: detection`` fine-tunes the backbone through task=rcnn's ``RCNNModule``).

It takes the ``rcnn_segmentation:`` config node (``conf/task/rcnn_segmentation.yaml``, the only place its defaults
are written); built without one (tests, benchmarks) it reads the same YAML, with keyword overrides of its keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch

from lightning_modules.rcnn import as_list
from models.backbones import TapBackbone
from models.rcnn.regions import scaled_pad
from models.rcnn.seg_regions import warp_full_and_fg
from transferrable.core.errors import ConfigError
from transferrable.core.precision import inference_bf16
from transferrable.core.task_defaults import plain, task_config

FEATURE_KINDS = ("full", "fg", "full+fg")
# pool5 for a backbone whose fc6/fc7 are added at random (EfficientNet-Lite: its pretrained representation)
LAYERS = ("pool5", "fc6", "fc7")
REGRESSORS = ("svr", "ridge")
FINETUNE = ("none", "detection")


class RCNNSegmentationModule(L.LightningModule):
    REQUIRES_DATA = ("images", "masks")  # checked against the dataset before any work (transferrable/run/compat.py)

    def __init__(self, backbone: TapBackbone, num_classes: int, cfg: Mapping | None = None, **overrides: Any):
        super().__init__()
        self.cfg: dict = plain(task_config("rcnn_segmentation", "rcnn_segmentation", cfg, overrides).rcnn_segmentation)
        c = self.cfg
        self.kinds, self.layers = as_list(c["features"]), as_list(c["layers"])
        for v, ok, what in ((self.kinds, FEATURE_KINDS, "rcnn_segmentation.features"),
                            (self.layers, LAYERS, "rcnn_segmentation.layers"),
                            ([c["regressor"]], REGRESSORS, "rcnn_segmentation.regressor"),
                            ([c["finetune"]], FINETUNE, "rcnn_segmentation.finetune"),
                            ([c["quality"]], ("instance", "class"), "rcnn_segmentation.quality")):
            bad = [x for x in v if x not in ok]
            if bad or not v:
                raise ConfigError(f"{what}={v}: expected values from {list(ok)}")
        # hparams: plain containers only, so that a checkpoint loads with torch.load(weights_only=True)
        self.save_hyperparameters({"num_classes": int(num_classes), "cfg": self.cfg})
        # bf16 autocast of this task's own inference paths; null follows trainer.precision (set by the pipeline)
        self.use_bf16 = inference_bf16(c["bf16"], None)
        self.backbone = backbone
        self.num_classes = int(num_classes)
        backbone.check_taps(self.layers)
        if c["finetune"] == "none":  # the region features are read as they come
            backbone.warn_untrained(self.layers, "rcnn_segmentation.layers")
        self.size = int(backbone.input_size)
        self.pad = scaled_pad(self.size, c["context_pad"])
        self.stats: dict[str, Any] = {}
        # set around engine/rcnn/segmentation.py's sharded trainer.predict (engine/rcnn/pipeline.py ``sharded_map_on``)
        self.predict_job: Callable[[int], Any] | None = None

    def predict_step(self, batch, batch_idx):
        """A pipeline's per-image job run by ``trainer.predict`` over image indices (under DDP each rank takes its
        share of the images): ``[(i, predict_job(i)), ...]``."""
        return [(int(i), self.predict_job(int(i))) for i in batch]

    def _autocast(self):
        if self.use_bf16 and self.device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    @torch.inference_mode()
    def image_features(self, image: np.ndarray, masks: np.ndarray, boxes: np.ndarray, mean, std,
                       kinds: list[str]) -> dict[tuple[str, str], np.ndarray]:
        """{(full|fg, pool5|fc6|fc7): R x D} of one image's regions."""
        full, fg = warp_full_and_fg(image, masks, boxes, self.size, self.pad, mean, std)
        inputs = {"full": full, "fg": fg}
        out: dict[tuple[str, str], list] = {}
        bs = int(self.cfg["feature_batch"])
        for kind in kinds:
            x = inputs[kind]
            for s in range(0, len(x), bs):
                xb = x[s:s + bs].to(self.device)
                if self.cfg["channels_last"]:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with self._autocast():
                    taps = self.backbone.forward_taps(xb, self.layers)
                for layer in self.layers:
                    out.setdefault((kind, layer), []).append(taps[layer].float().cpu())
        return {k: torch.cat(v).numpy() for k, v in out.items()}
