"""``training_loop``: what Lightning costs. task=classify steps/s through ``Trainer.fit`` on the
Hydra-composed train config vs a plain PyTorch loop on the same model, data, DataLoader and batch size."""

from __future__ import annotations

import copy
import inspect
import time

import lightning as L
import torch

from bench.registry import Context, Figure, Stats, Target, benchmark
from bench.suite import quiet, train_config
from bench.timing import interleave, steady_rate

TARGET = Target(">=", 0.95)


class StepTimer(L.Callback):
    """Times a fit from the end of batch ``skip - 1`` to the end of the last batch, the same span that
    :func:`bench.timing.steady_rate` times for the plain loop."""

    def __init__(self, skip: int):
        if skip < 1:
            raise ValueError("StepTimer needs skip >= 1")
        self.skip, self.t0, self.t1, self.last = skip, 0.0, 0.0, -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.t1, self.last = time.perf_counter(), batch_idx
        if batch_idx == self.skip - 1:
            self.t0 = self.t1

    def rate(self) -> float:
        return (self.last - self.skip + 1) / (self.t1 - self.t0)


def _plain_loop(model, loader, cfg, skip: int) -> float:
    """The loop Lightning replaces: zero_grad, forward (autocast as the precision says), backward, step."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = model.optimizer_factory(params=params)
    scheduler = None
    if model.scheduler_factory is not None:
        kwargs = {}
        if "total_steps" in inspect.signature(model.scheduler_factory).parameters:
            kwargs["total_steps"] = len(loader)
        scheduler = model.scheduler_factory(optimizer=optimizer, **kwargs)
    bf16 = str(cfg.trainer.precision).startswith("bf16")
    clip = cfg.trainer.get("gradient_clip_val")

    def step(batch):
        x, y = batch
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.criterion(model(x), y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()

    return steady_rate(loader, step, skip)


def _lightning_loop(model, loader, cfg, skip: int) -> float:
    from transferrable.run.runner import build_trainer

    timer = StepTimer(skip)
    trainer = build_trainer(cfg, loggers=[])
    trainer.callbacks.append(timer)
    trainer.fit(model, train_dataloaders=loader)
    return timer.rate()


def measure(ctx: Context, precision: str) -> Figure:
    from torch.utils.data import DataLoader, TensorDataset

    from transferrable.run.runner import build_model

    batch, skip, steps = (8, 1, 5) if ctx.quick else (None, 5, 30)
    overrides = [
        f"trainer.precision={precision}",
        "trainer.max_epochs=1",
        "++trainer.limit_val_batches=0",
        "++trainer.num_sanity_val_steps=0",
    ]
    if batch is not None:
        overrides.append(f"dataset.batch_size={batch}")
    with quiet(), train_config(overrides) as cfg:
        batch = int(cfg.dataset.batch_size)
        n, size = (skip + steps) * batch, int(cfg.backbone.input_size)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(n, 3, size, size, generator=generator)
        data = TensorDataset(images, torch.randint(0, 10, (n,), generator=generator))
        loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=0, drop_last=True)
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=10)
        initial = copy.deepcopy(model.state_dict())

        def fresh():  # every run starts from the same weights, so repeats measure the same work
            model.load_state_dict(initial)
            return model

        runs = {
            "lightning": lambda: _lightning_loop(fresh(), loader, cfg, skip),
            "plain": lambda: _plain_loop(fresh(), loader, cfg, skip),
        }
        for run in runs.values():  # warm-up: allocator, oneDNN kernels, Lightning's first-fit imports
            run()
        rates = interleave(runs, ctx.repeats)
    return Figure(
        f"Lightning steps/s, {cfg.hydra.runtime.choices.backbone} b{batch} {size}px {precision}",
        Stats(rates["lightning"]),
        "steps/s",
        reference=Stats(rates["plain"]),
        reference_name="plain PyTorch loop, same model/DataLoader",
        target=TARGET,
        note=f"steady state: steps {skip}..{skip + steps - 1} of one epoch",
    )


@benchmark("training_loop")
def training_loop(ctx: Context) -> list[Figure]:
    precisions = ["32-true"] if ctx.quick else ["32-true", "bf16-mixed"]
    return [measure(ctx, p) for p in precisions]
