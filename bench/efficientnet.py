"""``efficientnet``: the real ImageNet network (EfficientNet-Lite0, the package weights) on this CPU (issue 27).

* **suite / bare**: frozen pool5 features through the suite's ``TapBackbone.forward_taps`` (the stages
  ``models/efficientnet.py`` cuts timm's network into) against a bare ``torch.inference_mode`` forward of timm's own
  ``efficientnet_lite0`` with the same weights (``forward_features`` + its global pool: the same 1280-D vector), on
  the same pre-collated batches, same memory format and precision. Target >= 0.9.
* **DeCAF path / bare**: the same, with the suite's side being ``engine.decaf.protocol.FeatureExtractor.extract`` as
  ``task=decaf`` calls it (DataLoader + transform + ``trainer.predict`` + numpy; bench/decaf.py's harness).
* **precision**: images/s of the bare forward in fp32 (contiguous), fp32 channels_last and bf16 autocast
  (channels_last); the ratio says which is faster on this CPU kind (AVX2-only CPUs emulate bf16).

Shape: 224 px (the weights' native size; ``--param size=``), batch 32 (``--param batch=``) x 2 batches
(``--param batches=``), pool5. ``--param rows=suite,decaf,precision`` picks rows, ``--param bf16=0`` drops the
bf16 suite row (bf16 is emulated, ~30x slower than fp32, on AVX2-only CPUs).
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from bench.registry import Context, Figure, Stats, Target, benchmark
from bench.suite import quiet
from bench.timing import interleave, per_second

ARCH = "efficientnet_lite0"


def _bare_net():
    """timm's network with the package weights, as a user would run it without the suite."""
    import timm

    from models.efficientnet import load_package_weights

    net = timm.create_model(ARCH, pretrained=False)
    load_package_weights(net, ARCH)
    return net.eval()


def _bare_pool5(net, x: torch.Tensor) -> torch.Tensor:
    return net.forward_head(net.forward_features(x), pre_logits=True)


def _rate(n: int, fn, batches, channels_last: bool, bf16: bool) -> float:
    def go():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for x in batches:
                fn(x.contiguous(memory_format=torch.channels_last) if channels_last else x)

    return per_second(n, go)


@benchmark("efficientnet")
def efficientnet(ctx: Context) -> list[Figure]:
    from models.efficientnet import EfficientNetLite

    size = ctx.param("size", 32 if ctx.quick else 224)  # quick: bf16 is emulated (~30x fp32) on AVX2 CPUs
    batch = ctx.param("batch", 2 if ctx.quick else 32)
    n = batch * ctx.param("batches", 1 if ctx.quick else 2)
    torch.manual_seed(0)
    batches = [torch.randn(batch, 3, size, size) for _ in range(n // batch)]
    suite = EfficientNetLite(ARCH, input_size=size, weights="hub").eval()
    bare = _bare_net()
    with torch.inference_mode():  # the same weights: the same features, else the comparison is void
        torch.testing.assert_close(suite.forward_taps(batches[0], "pool5")["pool5"], _bare_pool5(bare, batches[0]))
    rows = set(ctx.param("rows", "suite,decaf,precision").split(","))
    figures = []
    variants = (("fp32", False, False), ("channels_last+bf16", True, True))[: 2 if ctx.param("bf16", 1) else 1]
    for label, channels_last, bf16 in variants if "suite" in rows else ():
        if channels_last:
            suite, bare = suite.to(memory_format=torch.channels_last), bare.to(memory_format=torch.channels_last)
        runs = {
            "suite": lambda cl=channels_last, b=bf16, s=suite: _rate(n, lambda x: s.forward_taps(x, "pool5"), batches,
                                                                      cl, b),
            "bare": lambda cl=channels_last, b=bf16, m=bare: _rate(n, lambda x: _bare_pool5(m, x), batches, cl, b),
        }
        for run in runs.values():  # warm-up: oneDNN kernels
            run()
        rates = interleave(runs, ctx.repeats)
        path, ref = Stats(rates["suite"]), Stats(rates["bare"])
        shape = f"{ARCH} {size}px b{batch} pool5 {label}"
        ctx.log(f"{shape}: TapBackbone {path.median:.1f} img/s, bare timm {ref.median:.1f}")
        figures.append(Figure(f"Lite0 features via TapBackbone {shape}", path, "img/s", reference=ref,
                              reference_name="bare timm forward_features + global pool, inference_mode",
                              target=Target(">=", 0.9), note="same weights, batches, memory format, precision"))
    if "decaf" in rows:
        figures.append(_decaf_path(ctx, size, batch, n, bare))
    if "precision" in rows:
        figures += _precision(ctx, size, batch, n, batches)
    return figures


def _decaf_path(ctx: Context, size: int, batch: int, n: int, bare) -> Figure:
    """FeatureExtractor.extract (task=decaf's path, fp32 as this CPU's auto policy runs it) vs the bare forward."""
    from bench.decaf import _pool, decaf_module
    from datamodules.base import ImageDataset
    from engine.decaf.protocol import FeatureExtractor
    from models.efficientnet import EfficientNetLite

    with quiet():
        backbone = EfficientNetLite(ARCH, input_size=size, weights="hub").eval()
        extractor = FeatureExtractor(decaf_module(backbone, channels_last=True, bf16=False))  # no cache
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False)
        pool = _pool(n, size)
        loader = DataLoader(ImageDataset(pool.images, pool.labels, pool.transform), batch_size=batch, shuffle=False)
        batches = [x for x, _ in loader]
        bare = bare.to(memory_format=torch.channels_last)
        runs = {
            "path": lambda: per_second(n, lambda: extractor.extract(trainer, pool, ["pool5"], batch)),
            "bare": lambda: _rate(n, lambda x: _bare_pool5(bare, x), batches, True, False),
        }
        for run in runs.values():
            run()
        rates = interleave(runs, ctx.repeats)
    path, ref = Stats(rates["path"]), Stats(rates["bare"])
    ctx.log(f"DeCAF path {ARCH} {size}px: {path.median:.1f} img/s, bare {ref.median:.1f}")
    return Figure(f"DeCAF extraction {ARCH} {size}px b{batch} pool5 channels_last fp32", path, "img/s",
                  reference=ref, reference_name="bare timm forward, same batches (pre-collated)",
                  target=Target(">=", 0.9), note="FeatureExtractor.extract (loader + transform + predict + numpy)")


def _precision(ctx: Context, size: int, batch: int, n: int, batches) -> list[Figure]:
    """Which precision is faster for this network here: measured, never assumed from the CPU flags."""
    net = _bare_net()
    nets = {"fp32": net, "fp32 channels_last": _bare_net().to(memory_format=torch.channels_last)}
    runs = {
        "fp32": lambda: _rate(n, lambda x: _bare_pool5(nets["fp32"], x), batches, False, False),
        "fp32 channels_last": lambda: _rate(n, lambda x: _bare_pool5(nets["fp32 channels_last"], x), batches,
                                            True, False),
        "bf16 channels_last": lambda: _rate(n, lambda x: _bare_pool5(nets["fp32 channels_last"], x), batches,
                                            True, True),
    }
    for run in runs.values():
        run()
    rates = {k: Stats(v) for k, v in interleave(runs, ctx.repeats).items()}
    ctx.log(", ".join(f"{k} {v.median:.1f} img/s" for k, v in rates.items()))
    shape = f"{ARCH} {size}px b{batch}"
    return [
        Figure(f"{shape} bf16 autocast vs fp32 (channels_last)", rates["bf16 channels_last"], "img/s",
               reference=rates["fp32 channels_last"], reference_name="fp32 channels_last",
               note="ratio > 1: bf16 is faster on this CPU"),
        Figure(f"{shape} fp32 channels_last vs contiguous", rates["fp32 channels_last"], "img/s",
               reference=rates["fp32"], reference_name="fp32 contiguous", note="ratio > 1: channels_last is faster"),
    ]
