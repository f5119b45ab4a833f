"""``cpu_efficiency``: frozen-feature extraction (up to fc7) per backbone, fp32 vs channels_last + bf16
autocast under ``torch.inference_mode``, and the achieved GFLOP/s against this machine's matmul peak
measured in the same run."""

from __future__ import annotations

import copy

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from bench.registry import Context, Figure, Stats, Target, benchmark
from bench.suite import CONF_DIR, quiet
from bench.timing import interleave, per_second

# REFERENCE.md section 1: matmul peak of these machines, 2 threads (documented, not measured here).
DOCUMENTED_PEAK_GFLOPS = {"fp32": 370.0, "bf16": 2280.0}
TAP = "fc7"


def backbones(quick: bool) -> dict[str, int]:
    """name -> input size (px)."""
    if quick:
        return {"caffenet_mini": 32, "alexnet": 64, "resnet18": 64}
    return {"caffenet_mini": 32, "alexnet": 112, "resnet18": 112, "vgg16": 112}


def build_backbone(name: str, size: int) -> torch.nn.Module:
    """The backbone as ``conf/backbone/<name>.yaml`` builds it (random weights), in eval mode."""
    cfg = OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml")
    cfg.input_size, cfg.weights = size, None
    return instantiate(cfg).eval()


def gflop_per_image(model, size: int) -> float:
    """FLOPs of one image up to the tap (convolutions and matmuls, as FlopCounterMode counts them)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.forward_taps(torch.zeros(1, 3, size, size), TAP)
    return counter.get_total_flops() / 1e9


def extractor(model, batch: int, size: int, iters: int, bf16: bool):
    """A callable timing ``iters`` batches of feature extraction; returns images/s."""
    x = torch.randn(batch, 3, size, size)
    if bf16:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run_once():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for _ in range(iters):
                model.forward_taps(x, TAP)

    return lambda: per_second(batch * iters, run_once)


def matmul(n: int, dtype: torch.dtype, iters: int):
    """A callable timing ``iters`` n x n matmuls; returns GFLOP/s (2 n^3 per product)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)

    def run_once():
        for _ in range(iters):
            torch.mm(a, b)

    return lambda: per_second(2 * n**3 * iters / 1e9, run_once)


@benchmark("cpu_efficiency")
def cpu_efficiency(ctx: Context) -> list[Figure]:
    batch, work = (2, 0.5) if ctx.quick else (32, 100.0)  # work: GFLOP per timed sample
    n, mm_iters = (256, 2) if ctx.quick else (2048, 5)
    runs = {"matmul fp32": matmul(n, torch.float32, mm_iters), "matmul bf16": matmul(n, torch.bfloat16, mm_iters)}
    flops: dict[str, float] = {}
    with quiet():
        for name, size in backbones(ctx.quick).items():
            model = build_backbone(name, size)
            flops[name] = gflop_per_image(model, size)
            iters = max(1, round(work / (batch * flops[name])))
            for kind, bf16 in (("fp32", False), ("bf16", True)):
                runs[f"{name} {kind}"] = extractor(model, batch, size, iters, bf16)
            ctx.log(f"{name} @ {size}px: {flops[name]:.3g} GFLOP/image to {TAP}, {iters} x b{batch} per sample")
    for run in runs.values():  # warm-up: oneDNN builds its bf16/channels_last kernels on first use
        run()
    rates = interleave(runs, ctx.repeats)

    peak = {k: Stats(rates[f"matmul {k}"]) for k in ("fp32", "bf16")}
    figures = [
        Figure(
            f"matmul peak {k} ({n}x{n})",
            peak[k],
            "GFLOP/s",
            reference=Stats([DOCUMENTED_PEAK_GFLOPS[k]]),
            reference_name="REFERENCE.md §1 (documented, idle machine)",
            note="how much of the documented peak this machine gives right now",
        )
        for k in ("fp32", "bf16")
    ]
    for name, size in backbones(ctx.quick).items():
        fp32, bf16 = Stats(rates[f"{name} fp32"]), Stats(rates[f"{name} bf16"])
        shape = f"{name} {size}px b{batch} to {TAP}"
        figures.append(
            Figure(
                f"{shape}: channels_last+bf16",
                bf16,
                "img/s",
                reference=fp32,
                reference_name="fp32 contiguous",
                target=Target(">=", 1.0),
                note="speed-up of the configured fast path for frozen features",
            )
        )
        for kind, stats in (("fp32", fp32), ("bf16", bf16)):
            figures.append(
                Figure(
                    f"{shape}: {kind} GFLOP/s",
                    Stats([r * flops[name] for r in stats.samples]),
                    "GFLOP/s",
                    reference=peak[kind],
                    reference_name=f"matmul peak {kind}",
                    note=f"{flops[name]:.4g} GFLOP/image (FlopCounterMode)",
                )
            )
    return figures
