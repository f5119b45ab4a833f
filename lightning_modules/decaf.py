"""task=decaf and task=decaf_domain (thesis ch. 2): DeCAF's LightningModule -- a frozen pretrained backbone whose
``predict_step`` returns the requested features of a batch.

A feature is

* a backbone tap: ``pool5``, ``fc6``, ``fc7`` (= DeCAF5/6/7), or any other tap (``conv3``, ...), flattened;
* ``random:<tap>``: the same tap of the same architecture with random weights (``random_backbone``, built by the
  pipeline as ``backbone.weights=null`` with ``seed`` would be; thesis footnote 3);
* ``raw``: the normalised input pixels (one channel for grayscale datasets);
* ``hog``: scikit-image HOG of the grayscale input (``decaf.hog`` parameters).

``predict_step`` runs under ``torch.inference_mode``; ``decaf.channels_last`` and bf16 autocast (``use_bf16``,
from ``decaf.bf16``; the pipeline resolves ``null`` against ``trainer.precision``) are switches. Everything else --
the image pool, the feature cache, the linear classifiers over splits, few-shot curves, the domain settings,
t-SNE and the tables -- is the pipeline's: ``engine/decaf/pipeline.py`` and ``engine/decaf/domain.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from models.backbones import TapBackbone, UnknownTapError
from transferrable.core.precision import inference_bf16

BASELINES = ("raw", "hog")
RANDOM_PREFIX = "random:"
HOG_DEFAULTS = {"orientations": 9, "pixels_per_cell": 4, "cells_per_block": 2}  # scikit-image's own, for hog: null


def raw_pixels(x: torch.Tensor, gray: bool) -> np.ndarray:
    x = x.float()
    if gray:
        x = x.mean(1)
    return x.flatten(1).cpu().numpy()


def hog_features(x: torch.Tensor, orientations: int, pixels_per_cell: int, cells_per_block: int) -> np.ndarray:
    from skimage.feature import hog

    gray = x.float().mean(1).cpu().numpy()
    return np.stack([
        hog(img, orientations=orientations, pixels_per_cell=(pixels_per_cell,) * 2,
            cells_per_block=(cells_per_block,) * 2, block_norm="L2-Hys", feature_vector=True)
        for img in gray
    ]).astype(np.float32)


class DecafModule(L.LightningModule):
    """``cfg`` is the ``decaf:`` node (conf/task/decaf.yaml); the module reads ``channels_last``, ``bf16`` and
    ``hog`` from it. Which features ``predict_step`` returns is set per pass with :meth:`request`."""

    REQUIRES_DATA = ("images", "labels")  # checked against the dataset before any work (transferrable/run/compat.py)

    def __init__(self, backbone: TapBackbone, cfg: DictConfig | dict, num_classes: int | None = None):
        super().__init__()
        cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
        # plain containers only, so that a checkpoint would load with torch.load(weights_only=True)
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True), "num_classes": num_classes})
        self.channels_last = bool(cfg.channels_last)
        self.use_bf16 = inference_bf16(cfg.bf16, None)  # bf16 autocast of predict_step; see engine.decaf.pipeline.run
        self.hog_params = {**HOG_DEFAULTS, **(OmegaConf.to_container(cfg.hog) if cfg.get("hog") else {})}
        self.backbone = backbone
        self.random_backbone: TapBackbone | None = None  # random:<tap> features: set by the pipeline
        self.wanted: list[str] = []
        self.gray = False
        backbone.requires_grad_(False)
        backbone.eval()

    def check_features(self, names: Sequence[str], what: str = "decaf.features") -> None:
        """Every name is a baseline or a tap of this backbone (``random:<tap>`` included), else a one-line error."""
        for name in names:
            if name in BASELINES:
                continue
            tap = name[len(RANDOM_PREFIX):] if name.startswith(RANDOM_PREFIX) else name
            if tap not in self.backbone.tap_names:
                raise UnknownTapError(
                    f"{what}: backbone '{self.backbone.arch}' has no tap '{tap}'; available taps: "
                    f"{list(self.backbone.tap_names)} (also: raw, hog, random:<tap>)"
                )
            if not name.startswith(RANDOM_PREFIX):  # random:<tap> is random on purpose
                self.backbone.warn_untrained([tap], what)

    def request(self, names: Sequence[str], gray: bool = False) -> None:
        """The features the next ``predict_step`` calls return; ``gray``: raw pixels as one channel."""
        self.wanted, self.gray = list(names), bool(gray)

    def on_predict_start(self) -> None:
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
            if self.random_backbone is not None:
                self.random_backbone.to(memory_format=torch.channels_last)

    def predict_step(self, batch, batch_idx: int = 0) -> dict[str, np.ndarray]:
        x = batch[0]
        out: dict[str, np.ndarray] = {}
        nets = [(self.backbone, "", [n for n in self.wanted if n not in BASELINES and not n.startswith(RANDOM_PREFIX)])]
        if self.random_backbone is not None:
            nets.append((self.random_backbone, RANDOM_PREFIX,
                         [n[len(RANDOM_PREFIX):] for n in self.wanted if n.startswith(RANDOM_PREFIX)]))
        with torch.inference_mode():
            xin = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                for net, prefix, taps in nets:
                    if taps:
                        for tap, act in net.forward_taps(xin, taps).items():
                            out[prefix + tap] = act.flatten(1).float().cpu().numpy()
            if "raw" in self.wanted:
                out["raw"] = raw_pixels(x, self.gray)
            if "hog" in self.wanted:
                out["hog"] = hog_features(x, **self.hog_params)
        return out
