"""task=lrcn_activity: LRCN activity recognition (thesis 4.2-4.3) and its single-frame baseline.

Training: random ``clip_length``-frame clips; the network predicts the video's class at every step and the loss
is the cross-entropy averaged over steps. Evaluation (validation and test): each whole video is run through
the CNN once, cut into clips of ``clip_length`` frames every ``test_stride`` frames, each clip's prediction is
its per-step softmax averaged over time, and the video's is the average over its clips. The single-frame
baseline (``sequence_model=none``) is scored the same way, so the two differ only in the LSTM.

At test end the run writes ``video_scores.npz`` (per-video softmax scores, labels, video and class names,
modality and sequence model: what late fusion and the per-class tables of ``eval.py report=`` read) and
``confusion.png`` into its output directory (the plot also goes to W&B as ``lrcn/confusion`` when a W&B logger
is attached).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn

from models.backbones import TapBackbone
from models.lrcn import LRCN, clip_starts
from transferrable.log_results import log_images

log = logging.getLogger(__name__)

SCORES_FILE = "video_scores.npz"
CONFUSION_FILE = "confusion.png"


class LRCNActivityModule(L.LightningModule):
    REQUIRES_DATA = ("videos", "labels")  # checked against the dataset before any work (transferrable/compat.py)

    def __init__(
        self,
        backbone: TapBackbone,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        sequence_model: str = "lstm",
        modality: str = "rgb",
        tap: str = "fc6",
        hidden_rgb: int = 256,
        hidden_flow: int = 1024,
        feature_dropout: float = 0.9,
        output_dropout: float = 0.5,
        clip_length: int = 16,
        test_stride: int = 8,
        frame_batch: int = 256,
        channels_last: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])
        hidden = hidden_flow if modality == "flow" else hidden_rgb
        self.net = LRCN(backbone, num_classes, tap, sequence_model, hidden, feature_dropout, output_dropout)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.criterion = nn.CrossEntropyLoss()
        self._scores: dict[str, dict[int, torch.Tensor]] = {}
        if channels_last:
            self.net.backbone.to(memory_format=torch.channels_last)

    # -- steps ----------------------------------------------------------------------------------
    def _frames(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

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
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("train/clip_acc", acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    @torch.no_grad()
    def video_scores(self, video: torch.Tensor) -> torch.Tensor:
        """T x C x H x W frames -> K class probabilities: per-step softmax averaged over each clip, then over
        the clips (``clip_length`` frames every ``test_stride``)."""
        fb = self.hparams.frame_batch
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

    def _collect(self, split: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
        ds = self.trainer.datamodule.splits[split]
        order = sorted(self._scores.get(split, {}))
        scores = torch.stack([self._scores[split][i] for i in order]).numpy() if order else np.zeros((0, 0))
        return scores, ds.labels[order], order

    def on_validation_epoch_end(self):
        scores, labels, _ = self._collect("val")
        if len(labels):
            self.log("val/acc", float((scores.argmax(1) == labels).mean()), prog_bar=True)

    def on_test_epoch_end(self):
        scores, labels, order = self._collect("test")
        if not len(labels):
            return
        dm = self.trainer.datamodule
        pred = scores.argmax(1)
        k = self.hparams.num_classes
        per_class = per_class_accuracy(labels, pred, k)
        self.log("test/acc", float((pred == labels).mean()))
        self.log("test/mean_class_acc", float(np.nanmean(per_class)))
        out = Path(self.trainer.default_root_dir)
        save_video_scores(out / SCORES_FILE, scores, labels, [dm.splits["test"].names[i] for i in order],
                          dm.class_names, self.hparams.modality, self.hparams.sequence_model)
        title = f"{'LRCN' if self.hparams.sequence_model == 'lstm' else 'single frame'} {self.hparams.modality}"
        plot_confusion(out / CONFUSION_FILE, labels, pred, dm.class_names, title)
        log_images(self.trainer, {"lrcn/confusion": out / CONFUSION_FILE})

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


# -------------------------------------------------------------------------------------------------
# per-video scores on disk, per-class accuracy, confusion matrix
# -------------------------------------------------------------------------------------------------
def per_class_accuracy(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy of each class over its videos (NaN for a class without test videos)."""
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            out[c] = float((pred[mask] == c).mean())
    return out


def save_video_scores(path: Path, scores: np.ndarray, labels: np.ndarray, videos: list[str], classes: list[str],
                      modality: str, sequence_model: str) -> None:
    import io

    from transferrable.atomic import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, scores=scores.astype(np.float32), labels=np.asarray(labels, np.int64), videos=np.array(videos),
             classes=np.array(classes), modality=np.array(modality), sequence_model=np.array(sequence_model))
    atomic_write_bytes(path, buf.getvalue())


def load_video_scores(path: str | Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {
            "scores": z["scores"], "labels": z["labels"], "videos": [str(v) for v in z["videos"]],
            "classes": [str(c) for c in z["classes"]], "modality": str(z["modality"]),
            "sequence_model": str(z["sequence_model"]),
        }


def plot_confusion(path: Path, labels: np.ndarray, pred: np.ndarray, classes: list[str], title: str) -> None:
    """Row-normalised confusion matrix as a PNG (written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from transferrable.atomic import atomic_write_bytes

    k = len(classes)
    cm = np.zeros((k, k))
    np.add.at(cm, (labels, pred), 1)
    cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(k), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}: accuracy {(labels == pred).mean() * 100:.1f}%")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j] >= 0.005:
                    ax.text(j, i, f"{cm[i, j] * 100:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if cm[i, j] > 0.5 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
