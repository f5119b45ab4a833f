"""task=lrcn_activity: LRCN activity recognition (thesis 4.2-4.3) and its single-frame baseline.

Training: random ``clip_length``-frame clips; the network predicts the video's class at every step and the loss
is the cross-entropy averaged over steps. Evaluation (validation and test): each whole video is run through
the CNN once, cut into clips of ``clip_length`` frames every ``test_stride`` frames, each clip's prediction is
its per-step softmax averaged over time, and the video's is the average over its clips. The single-frame
baseline (``sequence_model=none``) is scored the same way, so the two differ only in the LSTM.

The module keeps each split's per-video scores (:meth:`LRCNActivityModule.collect_scores`); the pipeline
(``engine/lrcn/activity.py``) writes the test ones to ``video_scores.npz`` with the confusion matrix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from models.backbones import TapBackbone
from models.lrcn import LRCN, clip_starts
from transferrable.core.distributed import gather_dicts
from transferrable.metrics.classification import per_class_accuracy

log = logging.getLogger(__name__)


class LRCNActivityModule(L.LightningModule):
    REQUIRES_DATA = ("videos", "labels")  # checked against the dataset before any work (transferrable/run/compat.py)

    def __init__(
        self,
        backbone: TapBackbone,
        num_classes: int,
        cfg,
        clip_length: int,
        test_stride: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
    ):
        """``cfg``: the ``lrcn:`` node of ``conf/task/lrcn_activity.yaml`` (sequence_model, modality, tap,
        hidden_rgb/hidden_flow, feature/output dropout, frame_batch, channels_last); clip length and test stride
        are the dataset's."""
        super().__init__()
        cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        self.save_hyperparameters({"cfg": cfg, "num_classes": num_classes, "clip_length": clip_length,
                                   "test_stride": test_stride})
        self.cfg = cfg
        hidden = cfg["hidden_flow"] if cfg["modality"] == "flow" else cfg["hidden_rgb"]
        self.net = LRCN(backbone, num_classes, cfg["tap"], cfg["sequence_model"], hidden, cfg["feature_dropout"],
                        cfg["output_dropout"])
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.criterion = nn.CrossEntropyLoss()
        self._scores: dict[str, dict[int, torch.Tensor]] = {}
        if cfg["channels_last"]:
            self.net.backbone.to(memory_format=torch.channels_last)

    # -- steps ----------------------------------------------------------------------------------
    def _frames(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg["channels_last"] else x

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        b, t = clips.shape[:2]
        feats = self.net.frame_features(self._frames(clips.flatten(0, 1))).view(b, t, -1)
        return self.net.sequence_scores(feats)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self(x)  # B x T x K
        t = logits.shape[1]
        loss = self.criterion(logits.flatten(0, 1).float(), y.repeat_interleave(t))
        acc = (logits.float().softmax(-1).mean(1).argmax(1) == y).float().mean()
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log("train/clip_acc", acc, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        return loss

    @torch.no_grad()
    def video_scores(self, video: torch.Tensor) -> torch.Tensor:
        """T x C x H x W frames -> K class probabilities: per-step softmax averaged over each clip, then over
        the clips (``clip_length`` frames every ``test_stride``)."""
        fb = self.cfg["frame_batch"]
        feats = torch.cat([self.net.frame_features(self._frames(video[i:i + fb])) for i in range(0, len(video), fb)])
        length = min(self.hparams.clip_length, len(feats))
        starts = clip_starts(len(feats), length, self.hparams.test_stride)
        clips = torch.stack([feats[s:s + length] for s in starts])  # N x L x D
        probs = self.net.sequence_scores(clips).float().softmax(-1)  # N x L x K
        return probs.mean(1).mean(0)

    def _eval_step(self, batch, split: str) -> None:
        videos, labels, index = batch
        store = self._scores.setdefault(split, {})
        for video, i in zip(videos, index.tolist(), strict=True):
            store[i] = self.video_scores(video).cpu()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self):
        self._scores["val"] = {}

    def on_test_epoch_start(self):
        self._scores["test"] = {}

    def collect_scores(self, split: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(per-video scores, labels, dataset indices) of the videos of ``split`` scored in its last epoch."""
        ds = self.trainer.datamodule.splits[split]
        # under DDP every rank scored its shard: every rank gets them all (keyed by index: padding counts once)
        store = gather_dicts(self._scores.get(split, {}))
        order = sorted(store)
        scores = torch.stack([store[i] for i in order]).numpy() if order else np.zeros((0, 0))
        return scores, ds.labels[order], order

    def on_validation_epoch_end(self):
        scores, labels, _ = self.collect_scores("val")
        if len(labels):
            self.log("val/acc", float((scores.argmax(1) == labels).mean()), prog_bar=True)

    def on_test_epoch_end(self):
        scores, labels, _ = self.collect_scores("test")
        if not len(labels):
            return
        pred = scores.argmax(1)
        per_class = per_class_accuracy(labels, pred, self.hparams.num_classes)
        self.log("test/acc", float((pred == labels).mean()))
        self.log("test/mean_class_acc", float(np.nanmean(per_class)))

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer=optimizer)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["backbone_arch"] = self.net.backbone.arch
        if getattr(self, "run_config_yaml", None):
            checkpoint["run_config_yaml"] = self.run_config_yaml
