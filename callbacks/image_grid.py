"""``SampleGridCallback``: a few validation inputs titled ``pred/true`` after each validation (drawn with
``transferrable/viz/image_grid.py``)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import torch

from transferrable.core.log_results import wandb_loggers
from transferrable.viz.image_grid import RIGHT_COLOR, WRONG_COLOR, save_image_grid

log = logging.getLogger(__name__)


class SampleGridCallback(L.Callback):
    """After each validation, save a grid of the first ``num_samples`` validation inputs titled ``pred/true``.

    Predictions come from ``pl_module(x).argmax(1)`` on those inputs; wrong ones are titled in red.
    Images are denormalised with the datamodule's ``mean``/``std`` and upscaled (nearest) so each cell
    is at least ``min_cell_px`` wide and the titles fit. Written to
    ``<default_root_dir>/samples_epoch<N>.png`` and logged to W&B when a WandbLogger is attached.
    Sanity-check validation is skipped; rank 0 only.
    """

    def __init__(self, num_samples: int = 16, nrow: int = 8, every_n_epochs: int = 1, min_cell_px: int = 96):
        super().__init__()
        self.num_samples, self.nrow = int(num_samples), int(nrow)
        self.every_n_epochs, self.min_cell_px = max(1, int(every_n_epochs)), int(min_cell_px)
        self._x: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []
        self._pred: list[torch.Tensor] = []
        self.last_path: Path | None = None

    def _active(self, trainer) -> bool:
        return (
            not trainer.sanity_checking
            and trainer.is_global_zero
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._x, self._y, self._pred = [], [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        have = sum(len(v) for v in self._x)
        if have >= self.num_samples or dataloader_idx != 0 or not self._active(trainer):
            return
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            return
        x, y = batch[0][: self.num_samples - have], batch[1][: self.num_samples - have]
        with torch.inference_mode():
            out = pl_module(x)
        pred = out.argmax(1) if isinstance(out, torch.Tensor) and out.ndim == 2 else None
        self._x.append(x.detach().float().cpu())
        self._y.append(torch.as_tensor(y).cpu())
        if pred is not None:
            self._pred.append(pred.cpu())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._x or not self._active(trainer):
            return
        x, y = torch.cat(self._x), torch.cat(self._y)
        pred = torch.cat(self._pred) if len(self._pred) == len(self._x) else None
        dm = trainer.datamodule
        names = getattr(dm, "class_names", None) if dm is not None else None
        mean, std = getattr(dm, "mean", None), getattr(dm, "std", None)

        def name(i: int) -> str:
            return str(names[i]) if names is not None and 0 <= i < len(names) else str(i)

        if pred is not None:
            titles = [f"{name(int(p))}/{name(int(t))}" for p, t in zip(pred, y, strict=True)]
            colors = [RIGHT_COLOR if int(p) == int(t) else WRONG_COLOR for p, t in zip(pred, y, strict=True)]
        else:
            titles, colors = [name(int(t)) for t in y], None
        upscale = max(1, math.ceil(self.min_cell_px / x.shape[-1]))
        path = Path(trainer.default_root_dir) / f"samples_epoch{trainer.current_epoch}.png"
        save_image_grid(x, path, nrow=self.nrow, titles=titles, title_colors=colors, upscale=upscale,
                        denormalize=(mean, std) if mean is not None and std is not None else None)
        self.last_path = path
        for lg in wandb_loggers(trainer):
            lg.log_image(key="samples", images=[str(path)], caption=["pred/true"])
        self._x, self._y, self._pred = [], [], []
