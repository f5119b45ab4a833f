"""Send a ``run_task`` method's final numbers and figures to every attached logger (W&B also gets the PNGs)."""

from __future__ import annotations

import math
from pathlib import Path


def log_results(trainer, metrics: dict, images: dict[str, Path]) -> None:
    numeric = {k: float(v) for k, v in metrics.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}
    for lg in trainer.loggers:
        lg.log_metrics(numeric)
        if type(lg).__name__ == "WandbLogger":
            for key, p in images.items():
                lg.log_image(key=key, images=[str(p)])
        lg.save()
