"""BiGAN sample grids (Figures 5.2 and 6.1) after every validation, as PNGs under ``<run dir>/samples/``
(``epoch<NNN>_*.png``, configured in ``conf/task/bigan.yaml``; and to W&B when it is the logger). What the grids
show is ``models/bigan_training.grid_panels``; ``engine/bigan/pipeline.py`` draws the ``final_*`` ones after the
evaluation.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from models.bigan_training import save_bigan_grids


class BiGANSampleGrids(L.Callback):
    """The grids after every validation epoch (not the sanity check), tagged ``epoch<NNN>``; by rank 0 alone
    under DDP (every rank holds the same weights and data)."""

    def __init__(self, output_dir: str | Path, enabled: bool, upscale: int):
        self.out_dir, self.enabled, self.upscale = Path(output_dir) / "samples", bool(enabled), int(upscale)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if (not self.enabled or trainer.sanity_checking or not trainer.is_global_zero
                or "val" not in getattr(pl_module, "data", {})):
            return
        save_bigan_grids(pl_module, self.out_dir, f"epoch{pl_module.current_epoch:03d}", self.upscale, trainer)
