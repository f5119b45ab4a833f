"""``input_pipeline``: is the loader the bottleneck? FashionMNISTDataModule train batches/s at the
configured ``num_workers`` vs how fast the default model (caffenet_mini) consumes batches of that size."""

from __future__ import annotations

import copy
import itertools
import tempfile
from pathlib import Path

import torch
from hydra.utils import instantiate

from bench.registry import Context, Figure, Stats, Target, benchmark
from bench.suite import FASHION_MNIST_DIR, fashion_mnist_fixture, quiet, train_config
from bench.timing import interleave, steady_rate
from datamodules.idx import find_idx


def loader_rate(loader, batches: int, skip: int):
    """A callable returning train batches/s over ``batches`` batches of a fresh epoch (``skip`` more untimed)."""
    return lambda: steady_rate(itertools.islice(loader, skip + batches), lambda batch: None, skip)


def model_rate(cfg, batches: list):
    """A callable returning training steps/s of the configured model over pre-loaded batches (no loader).

    Every call starts again from the same weights, so repeats measure the same work."""
    from transferrable.run.runner import build_model

    torch.manual_seed(0)
    model = build_model(cfg, num_classes=10).train()
    initial = copy.deepcopy(model.state_dict())
    bf16 = str(cfg.trainer.precision).startswith("bf16")

    def run() -> float:
        model.load_state_dict(initial)
        optimizer = model.optimizer_factory(params=[p for p in model.parameters() if p.requires_grad])

        def step(batch):
            x, y = batch
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model.criterion(model(x), y)
            loss.backward()
            optimizer.step()

        return steady_rate(batches, step, skip=0)

    return run


@benchmark("input_pipeline")
def input_pipeline(ctx: Context) -> list[Figure]:
    batches, steps = (3, 2) if ctx.quick else (40, 10)
    with tempfile.TemporaryDirectory(prefix="bench-fmnist-") as tmp, quiet():
        data_dir, source = FASHION_MNIST_DIR, "Fashion-MNIST"
        if find_idx(data_dir, "train-images-idx3-ubyte") is None:
            data_dir, source = fashion_mnist_fixture(Path(tmp), 60000, 10000), "same-shape IDX fixture"
        overrides = [f"dataset.data_dir={data_dir}", "backbone=caffenet_mini"]
        if ctx.quick:
            overrides += ["dataset.batch_size=16", "dataset.max_train_samples=256"]
        with train_config(overrides) as cfg:
            dm = instantiate(cfg.dataset)
            dm.setup("fit")
            loader = dm.train_dataloader()
            preloaded = list(itertools.islice(loader, steps))  # real batches for the model's rate
            batch, workers = int(cfg.dataset.batch_size), int(cfg.dataset.num_workers)
            skip = 1 if workers > 0 else 0  # worker start-up is a one-off, not a rate
            runs = {"loader": loader_rate(loader, batches, skip), "model": model_rate(cfg, preloaded)}
            for run in runs.values():  # warm-up
                run()
            rates = interleave(runs, ctx.repeats)
            precision = cfg.trainer.precision
    return [
        Figure(
            f"FashionMNISTDataModule train batches/s, b{batch} {workers} workers, {cfg.dataset.augment}",
            Stats(rates["loader"]),
            "batches/s",
            reference=Stats(rates["model"]),
            reference_name=f"caffenet_mini training steps/s ({precision}, pre-loaded batches)",
            reference_unit="steps/s",
            target=Target(">=", 1.0),
            note=f"data: {source}; ratio >= 1 means the loader keeps up with the model",
        )
    ]
