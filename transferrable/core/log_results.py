"""Send a pipeline's (``engine/``) final numbers and figures to every attached logger (W&B also gets the PNGs)."""

from __future__ import annotations

import math
from pathlib import Path


def log_results(trainer, metrics: dict, images: dict[str, Path]) -> None:
    numeric = {k: float(v) for k, v in metrics.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}
    for lg in trainer.loggers:
        lg.log_metrics(numeric)
        _wandb_images(lg, images)
        lg.save()


def log_images(trainer, images: dict[str, Path]) -> None:
    """PNGs (key -> path) to every W&B logger attached; the other loggers have no image API."""
    for lg in trainer.loggers:
        _wandb_images(lg, images)


def _wandb_images(lg, images: dict[str, Path]) -> None:
    if type(lg).__name__ == "WandbLogger":
        for key, p in images.items():
            lg.log_image(key=key, images=[str(p)])


def wandb_loggers(trainer) -> list:
    """The trainer's W&B loggers (callbacks and pipelines send their PNGs to these)."""
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
