"""What a BiGAN run trains (thesis ch. 5): the objectives, the ``bigan:`` settings, and the optimisers' parts.

``bigan.objective`` picks the losses; the architecture is the same for all (Table 5.1):

    objective                D        G gets                          E gets                           features
    bigan                    D(x, z)  inverse joint loss (with E)     inverse joint loss (with G)      E
    gan_discriminator        D(x)     inverse GAN loss                -                                D (last hidden)
    latent_regressor         D(x)     inverse GAN loss                LR(z, E(G(z))), G(z) detached    E
    joint_latent_regressor   D(x)     GAN + 0.25 LR                   0.25 LR (through G as well)      E
    autoencoder_l2 / _l1     -        |G(E(x)) - x|^2 or |.|          the same                         E

Optimisation (``model.optimizer`` / ``model.scheduler`` in ``conf/task/bigan.yaml``, from ``bigan.lr``, ``betas``,
``weight_decay``, ``final_lr``, ``decay_start``): three Adam optimisers (D, G, E), L2 weight decay on
multiplicative weights only (:func:`decay_param_groups`), the learning rate constant for the first part of
training then decayed exponentially to ``final_lr`` per step (:func:`halfway_exponential_decay`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from models.bigan import reestimate_batchnorm
from transferrable.core.errors import ConfigError


@dataclass(frozen=True)
class Objective:
    joint: bool = False  # D(x, z): the BiGAN discriminator
    discriminator: bool = False  # plain GAN D(x)
    regression_weight: float = 0.0  # latent regressor loss weight
    regression_into_generator: bool = False  # joint LR: the LR loss also trains G
    reconstruction: str | None = None  # autoencoders: l1 | l2
    trains: frozenset[str] = frozenset()
    features: str = "encoder"


OBJECTIVES: dict[str, Objective] = {
    "bigan": Objective(joint=True, trains=frozenset("DGE")),
    "gan_discriminator": Objective(discriminator=True, trains=frozenset("DG"), features="discriminator"),
    "latent_regressor": Objective(discriminator=True, regression_weight=1.0, trains=frozenset("DGE")),
    "joint_latent_regressor": Objective(discriminator=True, regression_weight=0.25, regression_into_generator=True,
                                        trains=frozenset("DGE")),
    "autoencoder_l2": Objective(reconstruction="l2", trains=frozenset("GE")),
    "autoencoder_l1": Objective(reconstruction="l1", trains=frozenset("GE")),
}

# ``bigan.*`` keys that the optimiser and scheduler configs read (``model.optimizer`` / ``model.scheduler``)
OPTIMISATION_KEYS = ("lr", "final_lr", "decay_start", "betas", "weight_decay")


@dataclass
class BiGANSettings:
    """The ``bigan:`` config node; its defaults and what each knob means are in ``conf/task/bigan.yaml``."""

    arch: str
    objective: str
    update: str
    latent: str
    latent_dim: int
    categories: int
    alpha: float
    straight_through: bool
    image_size: int
    channels: int
    pixel_range: str
    hidden: list[int]
    gan_width: int
    leak: float
    jlr_weight: float
    features: str
    knn_metric: str
    bn_batches: int
    raw_knn: bool
    linear_probe: bool
    probe_C: float
    probe_max_train: int | None
    grids: bool
    grid_upscale: int
    in_memory: bool

    def __post_init__(self):
        def check(name: str, choices):
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"bigan.{name}={value!r}: expected one of {sorted(choices, key=str)}")

        check("arch", {"mlp", "conv"})
        check("objective", set(OBJECTIVES))
        check("update", {"simultaneous", "alternating"})
        check("latent", {"continuous", "discrete"})
        check("pixel_range", {"auto", "unit", "symmetric"})
        check("features", {"auto", "encoder", "encoder_hidden", "discriminator"})
        check("knn_metric", {"euclidean", "cosine"})
        check("channels", {1, 3})
        if self.pixel_range == "auto":  # the original code: MNIST in [0, 1] (sigmoid G), ImageNet in [-1, 1]
            self.pixel_range = "unit" if self.arch == "mlp" else "symmetric"
        self.hidden = [int(h) for h in self.hidden]

    @classmethod
    def from_dict(cls, d: dict) -> BiGANSettings:
        """The settings from the ``bigan:`` node (the optimisation keys are the optimiser configs' business)."""
        d = {k: v for k, v in dict(d).items() if k not in OPTIMISATION_KEYS}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(d) - known), sorted(known - set(d))
        if unknown:
            raise ConfigError(f"unknown bigan.* setting(s) {unknown}; known: {sorted(known | set(OPTIMISATION_KEYS))}")
        if missing:
            raise ConfigError(f"missing bigan.* setting(s) {missing} (conf/task/bigan.yaml sets every one)")
        return cls(**d)


def decay_param_groups(module: nn.Module) -> list[dict]:
    """Adam parameter groups: multiplicative weights (matrices, kernels) with the optimiser's weight decay, biases
    and BN parameters without."""
    decay, plain = [], []
    for p in module.parameters():
        (decay if p.ndim > 1 else plain).append(p)
    groups: list[dict] = [{"params": decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


class HalfwayExponentialDecay:
    """LambdaLR factor: 1 until ``decay_start * total`` steps, then exponential down to ``final_ratio`` at
    ``total`` (the thesis: 2e-4 decayed to 2e-6 from halfway). A plain object, so the scheduler's state
    dict (and a resumed run) carries it."""

    def __init__(self, total_steps: int, final_ratio: float, decay_start: float = 0.5):
        self.total_steps, self.final_ratio, self.decay_start = int(max(total_steps, 1)), float(final_ratio), float(decay_start)

    def __call__(self, step: int) -> float:
        start = self.decay_start * self.total_steps
        if step < start:
            return 1.0
        span = max(self.total_steps - start, 1.0)
        return float(self.final_ratio ** min((step - start) / span, 1.0))


def halfway_exponential_decay(optimizer: torch.optim.Optimizer, total_steps: int, final_lr: float,
                              decay_start: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule of one optimiser: its learning rate down to ``final_lr`` over ``total_steps``."""
    ratio = float(final_lr) / float(optimizer.defaults["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, HalfwayExponentialDecay(total_steps, ratio, decay_start))


def _train_batches(module, n_batches: int, batch_size: int = 128):
    """Up to ``n_batches`` shuffled training batches of ``module.data["train"]`` in [0, 1] (a private generator)."""
    split = module.data["train"]
    gen = torch.Generator().manual_seed(module.seed + 1)
    idx = torch.randperm(len(split), generator=gen)
    for b in range(min(n_batches, max(1, len(split) // batch_size))):
        take = idx[b * batch_size : (b + 1) * batch_size]
        if len(take) < 2:
            break
        yield split.images[take].float().to(module.device) / 255.0


@torch.no_grad()
def reestimate_bigan_bn(module) -> None:
    """Population BN statistics for a BiGAN module's E, G and D from ``bigan.bn_batches`` training batches (and as
    many prior samples for G), instead of the running averages seen during training."""
    n = module.s.bn_batches
    reestimate_batchnorm(module.E, _train_batches(module, n), lambda x: module.E(module.inputs(x)[0]))
    # prior samples from a private generator: evaluation must not move the training's global RNG stream (a
    # run resumed from an epoch-end checkpoint would otherwise draw other z than an uninterrupted one)
    gen = torch.Generator(device=module.device).manual_seed(module.seed + 2)
    reestimate_batchnorm(module.G, (module.prior.sample(128, generator=gen, device=module.device)[0] for _ in range(n)),
                         module.G)

    def d_forward(x01):
        x_e, x_g = module.inputs(x01)
        if module.D.joint:
            module.D(x_g, module.encode(x_e)[1])
        else:
            module.D(x_g)

    was_e = module.E.training
    module.E.eval()
    reestimate_batchnorm(module.D, _train_batches(module, n), d_forward)
    module.E.train(was_e)


# What the sample grids show (Figures 5.2 and 6.1), file name by panel; drawn by transferrable/viz/image_grid.py.
GRID_FILES = {"G(z)": "samples", "x": "data", "G(E(x))": "reconstructions", "categories": "categories"}


@torch.no_grad()
def grid_panels(module) -> dict[str, torch.Tensor]:
    """G(z) for the module's fixed z, 50 validation images x, their reconstructions G(E(x)) and, for a discrete
    latent, the category x style grid, in [0, 1]; ``module`` is a ``BiGANModule`` with its splits in memory."""
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
    module.E.train(module.training)
    module.G.train(module.training)
    return panels


def save_bigan_grids(module, out_dir, tag: str, upscale: int, trainer=None) -> list:
    """The grids of ``module`` as ``<out_dir>/<tag>_<panel>.png`` (and to W&B when it is attached)."""
    from transferrable.viz.image_grid import save_panel_grids

    return save_panel_grids(grid_panels(module), GRID_FILES, out_dir, tag, upscale, trainer=trainer,
                            key="bigan_grids")
