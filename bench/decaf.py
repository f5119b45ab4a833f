"""``decaf``: frozen-feature extraction images/s through the DeCAF extraction path against the bare backbone
forward on the same batches, in the same run (issue 3: target >= 0.9 of the bare forward).

* **DeCAF path**: ``engine.decaf.protocol.FeatureExtractor.extract`` exactly as ``task=decaf`` calls it (pool ->
  DataLoader with the evaluation transform -> ``trainer.predict`` -> ``DecafModule.predict_step``:
  ``torch.inference_mode``, channels_last and bf16 autocast as configured -> numpy, concatenated per feature),
  cache disabled so every call extracts.
* **bare forward**: ``backbone.forward_taps`` under ``torch.inference_mode`` with the same memory format and
  autocast, over the very batches the path's DataLoader yields, collated once beforehand (pure compute).
* **bare forward + loader**: the same, but fetching the batches through that DataLoader each time, so the
  second ratio isolates what Lightning's predict loop and the numpy copies add on top of the data loading.

Shape: the task's default backbone (``caffenet_mini`` at 32 px, random weights: weights do not change the
speed) on 28x28 grayscale uint8 images (MNIST's), taps fc6+fc7, the dataset's ``eval_batch_size`` (512).
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from bench.registry import Context, Figure, Stats, Target, benchmark
from bench.suite import CONF_DIR, quiet
from bench.timing import interleave, per_second

TAPS = ["fc6", "fc7"]


def _pool(n: int, size: int):
    from datamodules.base import build_transform
    from datamodules.image_pool import Pool

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 10
    return Pool("bench", images, labels, np.zeros(n, np.int8), [str(i) for i in range(10)],
                {"bench": n}, build_transform(size, [0.5] * 3, [0.5] * 3, "none"), True)


def decaf_module(backbone, **overrides):
    """``DecafModule`` on conf/task/decaf.yaml's ``decaf`` node (what the module reads of it), with ``overrides``."""
    from lightning_modules.decaf import DecafModule

    node = OmegaConf.load(CONF_DIR / "task" / "decaf.yaml").decaf
    cfg = OmegaConf.merge(OmegaConf.masked_copy(node, ["channels_last", "bf16", "hog"]), overrides)
    return DecafModule(backbone, cfg)


@benchmark("decaf")
def decaf(ctx: Context) -> list[Figure]:
    from datamodules.base import ImageDataset
    from engine.decaf.protocol import FeatureExtractor

    n, batch = (64, 32) if ctx.quick else (4096, 512)
    cfg = OmegaConf.load(CONF_DIR / "backbone" / "caffenet_mini.yaml")
    cfg.weights = None
    size = int(cfg.input_size)
    figures = []
    with quiet():
        for bf16 in (True, False):
            torch.manual_seed(0)
            backbone = instantiate(cfg).eval()
            extractor = FeatureExtractor(decaf_module(backbone, channels_last=bf16, bf16=bf16))  # no cache
            trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, enable_checkpointing=False)
            pool = _pool(n, size)
            loader = DataLoader(ImageDataset(pool.images, pool.labels, pool.transform), batch_size=batch,
                                shuffle=False, num_workers=0)
            batches = [x for x, _ in loader]  # the same batches the extraction path's loader yields

            def bare(source, bf16=bf16, backbone=backbone):
                # the module's backbone, already in the memory format extract()'s predict put it in
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    for x in source:
                        if isinstance(x, list | tuple):
                            x = x[0]
                        if bf16:
                            x = x.contiguous(memory_format=torch.channels_last)
                        backbone.forward_taps(x, TAPS)

            runs = {
                "path": lambda e=extractor, t=trainer, p=pool: per_second(n, lambda: e.extract(t, p, TAPS, batch)),
                "bare": lambda b=batches: per_second(n, lambda: bare(b)),
                "bare+loader": lambda ld=loader: per_second(n, lambda: bare(ld)),
            }
            for run in runs.values():  # warm-up: oneDNN kernels, the weights hash of the cache key
                run()
            rates = interleave(runs, ctx.repeats)
            path, ref, ref_loader = Stats(rates["path"]), Stats(rates["bare"]), Stats(rates["bare+loader"])
            shape = f"caffenet_mini {size}px b{batch} {'+'.join(TAPS)} {'channels_last+bf16' if bf16 else 'fp32'}"
            ctx.log(f"{shape}: path {path.median:.0f} img/s, bare {ref.median:.0f}, bare+loader {ref_loader.median:.0f}")
            figures.append(Figure(
                f"DeCAF extraction {shape}", path, "img/s", reference=ref,
                reference_name="bare forward_taps, same batches (pre-collated)", target=Target(">=", 0.9),
                note="FeatureExtractor.extract (loader + transform + trainer.predict + numpy) vs pure compute",
            ))
            figures.append(Figure(
                f"DeCAF extraction {shape} vs forward+loader", path, "img/s", reference=ref_loader,
                reference_name="bare forward_taps fed by the same DataLoader",
                note="what trainer.predict and the numpy copies add on top of data loading",
            ))
    return figures
