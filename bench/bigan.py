"""``bigan``: MLP BiGAN training throughput (samples/s through ``Trainer.fit`` with manual optimisation:
D, G and E updated simultaneously per batch), fp32 and bf16 autocast, and what that means for one
Fashion-MNIST epoch (54,000 training images at batch 128 = 421 steps).

The time to the reported 1-NN accuracy is the sweep's own ``train_seconds`` in each run's metrics.json
(``experiment=bigan_mlp``, README "BiGAN"); this entry measures the steady-state rate behind it."""

from __future__ import annotations

import lightning as L
import torch

from bench.registry import Context, Figure, Stats, benchmark
from bench.suite import quiet
from bench.timing import interleave
from bench.training_loop import StepTimer

FASHION_MNIST_TRAIN = 54000  # 60k minus the 10% validation split


def _fit_rate(objective: str, precision: str, batch: int, hidden: list[int], skip: int, steps: int) -> float:
    from lightning_modules.bigan import BiGANModule, SplitTensors, _batch_sampler_loader

    torch.manual_seed(0)
    module = BiGANModule(None, 10, {"objective": objective, "hidden": hidden, "grids": False})
    n = (skip + steps) * batch
    gen = torch.Generator().manual_seed(0)
    split = SplitTensors(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen), torch.zeros(n, dtype=torch.long))
    loader = _batch_sampler_loader(split, batch, shuffle=True, seed=0, drop_last=True)
    timer = StepTimer(skip)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, train_dataloaders=loader)
    return timer.rate() * batch


@benchmark("bigan")
def bigan(ctx: Context) -> list[Figure]:
    batch, hidden, skip, steps = (16, [64, 64], 1, 4) if ctx.quick else (128, [1024, 1024], 3, 25)
    figures = []
    with quiet():
        for objective in ["bigan"] if ctx.quick else ["bigan", "autoencoder_l2"]:
            runs = {p: (lambda p=p, o=objective: _fit_rate(o, p, batch, hidden, skip, steps)) for p in ("32-true", "bf16-mixed")}
            rates = interleave(runs, ctx.repeats)
            fp32, bf16 = Stats(rates["32-true"]), Stats(rates["bf16-mixed"])
            epoch = FASHION_MNIST_TRAIN // batch * batch
            figures.append(Figure(
                f"{objective} MLP {'x'.join(map(str, hidden))} training samples/s, b{batch} fp32",
                fp32, "samples/s",
                note=f"one Fashion-MNIST epoch ~{epoch / fp32.median:.0f} s",
            ))
            figures.append(Figure(
                f"{objective} MLP {'x'.join(map(str, hidden))} training samples/s, b{batch} bf16-mixed",
                bf16, "samples/s", reference=fp32, reference_name="fp32, same run",
                note=f"one Fashion-MNIST epoch ~{epoch / bf16.median:.0f} s",
            ))
    return figures
