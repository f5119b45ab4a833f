"""task=classify: supervised training / fine-tuning of a backbone with a fresh N-way head.

This is the thesis's "supervised pre-training" stage (on Fashion-MNIST offline, standing in for
ImageNet), and the fine-tuning baseline every transfer experiment compares against.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from models.backbones import TapBackbone
from transferrable.core.errors import NonFiniteLossError, last_checkpoint_note


class ClassifyModule(L.LightningModule):
    REQUIRES_DATA = ("images", "labels")  # checked against the dataset before any work (transferrable/run/compat.py)

    def __init__(
        self,
        backbone: TapBackbone,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        scheduler_interval: str = "step",
        head_tap: str = "fc7",
        label_smoothing: float = 0.0,
        channels_last: bool = True,
    ):
        super().__init__()
        # The backbone is an nn.Module (saved in state_dict); hparams keep only plain values so that
        # checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])
        self.backbone = backbone
        backbone.check_taps([head_tap])
        self.head = nn.Linear(backbone.feature_dim(head_tap), num_classes)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{kind}": MulticlassAccuracy(num_classes, average=avg)
                for split in ("train", "val", "test")
                for kind, avg in (("acc", "micro"), ("mean_class_acc", "macro"))
            }
        )
        # the test split's counts (synced over the ranks; not in checkpoints), read after the test: test_confusion_counts
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.test_confusion_counts = None
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.backbone.forward_taps(x, [self.hparams.head_tap])[self.hparams.head_tap]
        return self.head(feats.flatten(1))

    def _step(self, batch, split: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        preds = logits.argmax(1)
        on_step = split == "train"
        # sync_dist: under DDP the epoch loss is the mean over every rank's batches (torchmetrics sync themselves)
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(y),
                 sync_dist=True)
        for kind in ("acc", "mean_class_acc"):
            metric = self.metrics[f"{split}_{kind}"]
            metric(preds, y)
            self.log(f"{split}/{kind}", metric, on_step=False, on_epoch=True, prog_bar=kind == "acc")
        if split == "test":
            self.test_confusion.update(preds, y)
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        if not torch.isfinite(loss):  # raising here: no backward, the bad step is never applied
            raise NonFiniteLossError(
                f"classify: non-finite loss {float(loss)} at epoch {self.current_epoch}, batch {batch_idx}; stopped "
                f"before the update, {last_checkpoint_note(self)}. Try a lower optimizer.lr or "
                "trainer.precision=32-true.")
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_test_epoch_start(self):
        self.test_confusion.reset()

    def on_test_epoch_end(self):
        self.test_confusion_counts = self.test_confusion.compute().cpu().numpy().astype("int64")

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).softmax(1)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        if "total_steps" in inspect.signature(self.scheduler_factory).parameters:  # e.g. OneCycleLR
            # OneCycleLR divides by (pct_start * total_steps - 1): tiny debug runs need a floor
            kwargs["total_steps"] = max(int(self.trainer.estimated_stepping_batches), 10)
        scheduler = self.scheduler_factory(optimizer=optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain strings only: eval.py rebuilds the run from these with torch.load(weights_only=True).
        checkpoint["backbone_arch"] = self.backbone.arch
        if getattr(self, "run_config_yaml", None):
            checkpoint["run_config_yaml"] = self.run_config_yaml
