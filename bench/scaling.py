"""``scaling``: how the cost of each method's main step grows with its work, as the fitted exponent ``k`` of
``cost ~ work^k`` over three sizes (``bench.growth``; 1 = linear, below 1 = fixed overhead amortised).

* DeCAF: ``engine.decaf.protocol.FeatureExtractor.extract`` (loader + transform + ``trainer.predict``, fc6+fc7, bf16)
  seconds vs images;
* R-CNN: ``RCNNModule.image_pool5`` (warping + CNN to pool5, ``feature_mode=warp``) seconds per image vs
  proposals per image, on a 160x120 photo crop with random boxes;
* BiGAN: seconds per training step (D, G, E updated together; MLP 1024x1024) vs batch size, and the
  seconds of a whole ``Trainer.fit`` vs its number of steps (start-up included, so k < 1 is expected).

LRCN clip length and caption length add their own figures with ``bench.growth`` in their entries.
Shapes: ``caffenet_mini`` at 32 px with random weights (weights do not change the speed).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.growth import growth_figure, measure_growth
from bench.registry import Context, Figure, benchmark
from bench.suite import CONF_DIR, quiet


def _backbone():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF_DIR / "backbone" / "caffenet_mini.yaml")
    cfg.weights = None
    torch.manual_seed(0)
    return instantiate(cfg).eval()


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decaf_images(ctx: Context) -> Figure:
    import lightning as L

    from bench.decaf import TAPS, _pool, decaf_module
    from engine.decaf.protocol import FeatureExtractor

    sizes = (64, 128, 256) if ctx.quick else (1024, 2048, 4096)
    backbone = _backbone()
    extractor = FeatureExtractor(decaf_module(backbone, channels_last=True, bf16=True))  # no cache
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    pools = {n: _pool(n, int(backbone.input_size)) for n in sizes}
    runs = {n: (lambda p=pools[n]: _seconds(lambda: extractor.extract(trainer, p, TAPS, 512))) for n in sizes}
    slopes, costs = measure_growth(runs, ctx.repeats)
    return growth_figure("DeCAF extraction (fc6+fc7, bf16, b512) vs images", costs, slopes, "images")


def rcnn_proposals(ctx: Context) -> Figure:
    import cv2
    from skimage import data

    from lightning_modules.rcnn import RCNNModule

    sizes = (16, 32, 64) if ctx.quick else (100, 200, 400)
    module = RCNNModule(_backbone(), 10, cache=False).eval()
    image = cv2.resize(data.astronaut(), (160, 120), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, [150, 110], (max(sizes), 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, 80, (max(sizes), 2))], 1).clip(0, [160, 120, 160, 120])
    boxes = boxes.astype(np.float32)
    mean, std = (0.286,) * 3, (0.353,) * 3
    with torch.inference_mode():
        runs = {n: (lambda n=n: _seconds(lambda: module.image_pool5(image, boxes[:n], mean, std))) for n in sizes}
        slopes, costs = measure_growth(runs, ctx.repeats)
    return growth_figure("R-CNN pool5 per image (warp + CNN, bf16) vs proposals", costs, slopes, "proposals")


def _bigan_fit(batch: int, steps: int, hidden: list[int]) -> float:
    """Seconds of one ``Trainer.fit`` of the MLP BiGAN for ``steps`` steps of ``batch`` (start-up included)."""
    import lightning as L

    from bench.bigan import bigan_module
    from datamodules.in_memory import SplitTensors, batch_sampler_loader

    torch.manual_seed(0)
    module = bigan_module({"objective": "bigan", "hidden": hidden, "grids": False})
    n = steps * batch
    gen = torch.Generator().manual_seed(0)
    split = SplitTensors(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen),
                         torch.zeros(n, dtype=torch.long))
    loader = batch_sampler_loader(split, batch, shuffle=True, seed=0, drop_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    return _seconds(lambda: trainer.fit(module, train_dataloaders=loader))


def bigan_batch(ctx: Context) -> Figure:
    from bench.bigan import _fit_rate

    sizes, hidden, skip, steps = ((8, 16, 32), [64, 64], 1, 4) if ctx.quick else ((32, 64, 128), [1024, 1024], 3, 15)
    runs = {b: (lambda b=b: b / _fit_rate("bigan", "32-true", b, hidden, skip, steps)) for b in sizes}
    slopes, costs = measure_growth(runs, ctx.repeats)
    return growth_figure(f"BiGAN MLP {'x'.join(map(str, hidden))} seconds per step (fp32) vs batch", costs, slopes,
                         "batch", note="k < 1: larger batches use the cores better")


def bigan_steps(ctx: Context) -> Figure:
    sizes, hidden, batch = ((2, 4, 8), [64, 64], 16) if ctx.quick else ((10, 20, 40), [1024, 1024], 128)
    runs = {s: (lambda s=s: _bigan_fit(batch, s, hidden)) for s in sizes}
    slopes, costs = measure_growth(runs, ctx.repeats)
    return growth_figure(f"BiGAN MLP {'x'.join(map(str, hidden))} Trainer.fit seconds (b{batch}) vs steps", costs,
                         slopes, "steps", note="includes Trainer start-up, so k < 1 at few steps")


@benchmark("scaling")
def scaling(ctx: Context) -> list[Figure]:
    figures = []
    with quiet():
        for part in (decaf_images, rcnn_proposals, bigan_batch, bigan_steps):
            figures.append(part(ctx))
            ctx.log(f"{figures[-1].figure}: k = {figures[-1].value.median:.2f} ({figures[-1].note})")
    return figures
