"""BiGAN sample grids (Figures 5.2 and 6.1): G(z) for 100 fixed z, 50 fixed validation images x, their
reconstructions G(E(x)) and, for a discrete latent, the category x style grid, as PNGs under
``<run dir>/samples/`` (and to W&B when it is the logger).

``BiGANSampleGrids`` draws them after every validation (``epoch<NNN>_*.png``, configured in
``conf/task/bigan.yaml``); ``engine/bigan.py`` draws the ``final_*`` ones after the evaluation.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from callbacks.image_grid import save_image_grid
from callbacks.tsne import _wandb_loggers

PANEL_FILES = {"G(z)": "samples", "x": "data", "G(E(x))": "reconstructions", "categories": "categories"}


@torch.no_grad()
def save_bigan_grids(module, out_dir: Path, tag: str, upscale: int, trainer=None) -> list[Path]:
    """The grids of ``module`` (a ``BiGANModule`` with its splits in memory) as ``<out_dir>/<tag>_<panel>.png``."""
    s = module.s
    for m in (module.E, module.G):
        m.eval()
    split = module.data.get("val") or module.data["train"]
    x01 = split.images[:50].float().to(module.device) / 255.0
    x_e, x_g = module.inputs(x01)
    shape = (-1, s.channels, s.image_size, s.image_size)
    panels = {
        "G(z)": module.to_unit_range(module.G(module.fixed_z)).reshape(shape),
        "x": module.to_unit_range(x_g).reshape(shape),
        "G(E(x))": module.to_unit_range(module.G(module.encode(x_e)[1])).reshape(shape),
    }
    if module.prior.categories:
        panels["categories"] = module.to_unit_range(module.G(module.fixed_grid_z)).reshape(shape)
    paths = [save_image_grid(imgs.float().cpu(), out_dir / f"{tag}_{PANEL_FILES[name]}.png", nrow=10, upscale=upscale)
             for name, imgs in panels.items()]
    module.E.train(module.training)
    module.G.train(module.training)
    if trainer is not None:
        for lg in _wandb_loggers(trainer):
            lg.log_image(key="bigan_grids", images=[str(p) for p in paths], caption=list(panels))
    return paths


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
