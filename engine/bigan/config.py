"""The ``bigan:`` keys' rules (task=bigan), registered with the config schema; ``bigan_source_overrides.*`` (the
nested BiGAN pretraining of ``backbone.weights=bigan:<dataset>``) is checked with the rules of the keys below it."""

from __future__ import annotations

from models.bigan_training import OBJECTIVES as OBJECTIVE_TABLE
from transferrable.core.config_rules import COUNT, NONNEG, POSITIVE, Int, ListOf, Num, OneOf, is_int
from transferrable.core.config_schema import register_keys

OBJECTIVES = tuple(OBJECTIVE_TABLE)

RULES = [
    # task=bigan
    ("bigan.arch", OneOf("mlp", "conv")),
    ("bigan.objective", OneOf(*OBJECTIVES)),
    ("bigan.update", OneOf("simultaneous", "alternating")),
    ("bigan.latent", OneOf("continuous", "discrete")),
    ("bigan.latent_dim", COUNT),
    ("bigan.categories", Int(2)),
    ("bigan.alpha", POSITIVE),
    ("bigan.image_size", Int(1)),  # conv: a multiple of 16 (checked below)
    ("bigan.channels", OneOf(1, 3)),
    ("bigan.pixel_range", OneOf("auto", "unit", "symmetric")),
    ("bigan.hidden", ListOf(COUNT)),
    ("bigan.gan_width", COUNT),
    ("bigan.leak", Num(0, 1, hi_open=True)),
    ("bigan.lr", POSITIVE),
    ("bigan.final_lr", POSITIVE),
    ("bigan.decay_start", Num(0, 1)),
    ("bigan.betas", ListOf(Num(0, 1, hi_open=True), length=2)),
    ("bigan.weight_decay", NONNEG),
    ("bigan.jlr_weight", NONNEG),
    ("bigan.features", OneOf("auto", "encoder", "encoder_hidden", "discriminator")),
    ("bigan.knn_metric", OneOf("euclidean", "cosine")),
    ("bigan.bn_batches", Int(0)),
    ("bigan.probe_C", POSITIVE),
    ("bigan.probe_max_train", Int(1, nullable=True)),
    ("bigan.grid_upscale", COUNT),
    ("callbacks.bigan_grids.upscale", COUNT),
]


def cross_check(sel) -> list[str]:
    """The conv BiGAN's four stride-2 layers need an image size divisible by 16."""
    size = sel("bigan.image_size")
    if sel("bigan.arch") == "conv" and is_int(size) and size % 16:
        return [f"bigan.image_size={size}: expected a multiple of 16 with bigan.arch=conv (four stride-2 layers)"]
    return []


register_keys(RULES, cross_check, override_prefixes=("bigan_source_overrides.",))
