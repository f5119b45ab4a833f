"""task=bigan: Bidirectional GANs and their baselines (thesis ch. 5), one LightningModule, manual optimisation.

``bigan.objective`` picks the losses; the architecture is the same for all (Table 5.1):

    objective                D        G gets                          E gets                           features
    bigan                    D(x, z)  inverse joint loss (with E)     inverse joint loss (with G)      E
    gan_discriminator        D(x)     inverse GAN loss                -                                D (last hidden)
    latent_regressor         D(x)     inverse GAN loss                LR(z, E(G(z))), G(z) detached    E
    joint_latent_regressor   D(x)     GAN + 0.25 LR                   0.25 LR (through G as well)      E
    autoencoder_l2 / _l1     -        |G(E(x)) - x|^2 or |.|          the same                         E

(the loss weights of the original code: ``--encode_gen_weight``/``--encode_weight``/``--discrim_weight``/
``--joint_discrim_weight``). LR is the sigmoid cross-entropy between ``(z + 1) / 2`` and ``E(G(z))``'s
logits, averaged over the code's dimensions. The "inverse" objective (labels swapped) trains G and E
(appendix 5.5.2): D minimises ``-log D(x, E(x)) - log(1 - D(G(z), z))``, G and E minimise
``-log(1 - D(x, E(x))) - log D(G(z), z)``. By default D, G and E are all updated at once from one
forward pass (``bigan.update=simultaneous``); ``alternating`` steps D first, then G/E against the new D.

Three Adam optimisers (D, G, E; lr 2e-4, beta1 0.5), weight decay on multiplicative weights only, the
learning rate constant for the first half of training then decayed exponentially to 2e-6 (per step).
Checkpoints hold all three optimisers and schedules; ``ckpt_path=<last.ckpt>`` resumes them.

Evaluation (BN statistics re-estimated on training data first, like the original "deploy" pass):
``val/knn1_acc`` after every validation (val queries, train gallery) and, at the end, ``test/knn1_acc``
(test queries, train+val gallery; Euclidean distance in the feature space), ``test/knn1_raw_acc`` (the
same on raw pixels), ``test/linear_probe_acc`` and, for ``bigan.latent=discrete``, ``test/cluster_purity``
/ ``test/cluster_nmi`` of E's category against the labels. Sample grids (G(z), x, G(E(x)), and Figure
6.1's category x style grid) go to ``<run dir>/samples/`` and to W&B when it is the logger.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.bigan import (
    BiGANAlexNet,
    ConvEncoder,
    DCGANDiscriminator,
    DCGANGenerator,
    LatentPrior,
    MLPDiscriminator,
    MLPEncoder,
    MLPGenerator,
    reestimate_batchnorm,
)
from transferrable.errors import ConfigError, NonFiniteLossError, last_checkpoint_note

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder_backbone.pt"


# -- objectives -------------------------------------------------------------------------------------
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


@dataclass
class BiGANSettings:
    """The ``bigan:`` config node (see ``conf/task/bigan.yaml`` for what each knob means)."""

    arch: str = "mlp"
    objective: str = "bigan"
    update: str = "simultaneous"
    latent: str = "continuous"
    latent_dim: int = 50
    categories: int = 10
    alpha: float = 3.0
    straight_through: bool = True
    image_size: int = 28
    channels: int = 1
    pixel_range: str = "auto"
    hidden: list[int] = field(default_factory=lambda: [1024, 1024])
    gan_width: int = 32
    leak: float = 0.2
    lr: float = 2e-4
    final_lr: float = 2e-6
    decay_start: float = 0.5
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    weight_decay: float = 2.5e-5
    jlr_weight: float = 0.25
    features: str = "auto"
    knn_metric: str = "euclidean"
    bn_batches: int = 50
    raw_knn: bool = True
    linear_probe: bool = True
    probe_C: float = 1.0
    probe_max_train: int | None = 10000
    grids: bool = True
    grid_upscale: int = 2
    in_memory: bool = True

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
        self.betas = [float(b) for b in self.betas]

    @classmethod
    def from_dict(cls, d: dict | None) -> BiGANSettings:
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown bigan.* setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


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


def adam_with_weight_decay(module: nn.Module, lr: float, betas, weight_decay: float) -> torch.optim.Adam:
    """Adam; L2 weight decay on multiplicative weights (matrices, kernels) only, not biases or BN."""
    decay, plain = [], []
    for p in module.parameters():
        (decay if p.ndim > 1 else plain).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return torch.optim.Adam(groups, lr=lr, betas=tuple(betas))


# -- data held in memory --------------------------------------------------------------------------
class SplitTensors:
    """One split as uint8 ``(N, C, H, W)`` images in [0, 255] plus labels (pixels at the encoder's size)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, limit: int | None = None):
        n = len(self) if limit is None else min(len(self), limit)
        for start in range(0, n, batch_size):
            yield self.images[start : min(start + batch_size, n)].float() / 255.0, self.labels[start : start + batch_size]


def materialise_split(dataset, size: int, channels: int, batch_size: int = 512, mean=None, std=None) -> SplitTensors:
    """Every image of a suite ``ImageDataset`` as uint8 at ``size`` x ``size`` with ``channels`` channels.

    Fast path: grayscale uint8 arrays already at ``size`` (Fashion-MNIST/MNIST IDX at 28 px) are taken as
    they are (the eval transform would only normalise them). Otherwise every image goes through the
    dataset's transform and the normalisation is undone (``x * std + mean``).
    """
    images = getattr(dataset, "images", None)
    labels = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.long)
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 3 and images.shape[1:] == (size, size):
        x = torch.from_numpy(np.array(images, copy=True))[:, None]
        return SplitTensors(x.expand(-1, channels, -1, -1).contiguous(), labels)
    from torch.utils.data import DataLoader

    m = torch.tensor(mean if mean is not None else (0.0, 0.0, 0.0)).reshape(1, -1, 1, 1)
    s = torch.tensor(std if std is not None else (1.0, 1.0, 1.0)).reshape(1, -1, 1, 1)
    out = []
    for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        x01 = (x.float() * s + m).clamp(0, 1)[:, :channels]
        out.append((x01 * 255).round().to(torch.uint8))
    return SplitTensors(torch.cat(out), labels)


class _EpochPermutation(torch.utils.data.Sampler):
    """A shuffle that is a function of ``(seed, epoch)`` alone (Lightning calls ``set_epoch``): a run resumed from a
    mid-training checkpoint sees the same batches in its next epochs as an uninterrupted run. (A ``RandomSampler``
    with a generator seeded once would replay epoch 0's order after a resume.)"""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        epoch_seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0] >> 1)
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed)).tolist())


class _EpochBatchSampler(torch.utils.data.BatchSampler):
    def set_epoch(self, epoch: int) -> None:  # the DataLoader's sampler is this one: pass the epoch on
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def _batch_sampler_loader(split: SplitTensors, batch_size: int, shuffle: bool, seed: int, drop_last: bool):
    """A DataLoader that indexes whole batches out of the in-memory tensors (no per-sample collation)."""
    from torch.utils.data import DataLoader, SequentialSampler, TensorDataset

    data = TensorDataset(split.images, split.labels)
    base = _EpochPermutation(len(data), seed) if shuffle else SequentialSampler(data)
    # a private generator: creating an iterator draws a base seed, and a resumed run creates its first one at
    # another point of the global RNG stream than an uninterrupted run does
    return DataLoader(data, batch_size=None, sampler=_EpochBatchSampler(base, batch_size, drop_last=drop_last),
                      generator=torch.Generator().manual_seed(seed))


# -- the module -------------------------------------------------------------------------------------
class BiGANModule(L.LightningModule):
    REQUIRES_DATA = ("images", "labels")  # 1-NN / linear-probe evaluation (transferrable/compat.py)

    def __init__(
        self,
        backbone: nn.Module | None = None,
        num_classes: int | None = None,
        bigan: dict | None = None,
        ckpt_path: str | None = None,
        train: bool = True,
        seed: int | None = 0,
        cache_dir: str | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.save_hyperparameters(ignore=["backbone"])
        self.s = s = BiGANSettings.from_dict(bigan)
        self.objective = OBJECTIVES[s.objective]
        self.prior = LatentPrior(s.latent, s.latent_dim, s.categories, s.alpha)
        code = self.prior.code_dim
        g_out = "sigmoid" if s.pixel_range == "unit" else "tanh"
        shape = (s.channels, s.image_size, s.image_size)
        if s.arch == "mlp":
            self.enc_size = int(getattr(backbone, "input_size", s.image_size) or s.image_size)
            self.E = MLPEncoder(s.channels * self.enc_size**2, code, s.hidden, s.leak)
            self.G = MLPGenerator(code, shape, s.hidden, g_out)
            self.D = MLPDiscriminator(math.prod(shape), code if self.objective.joint else None, s.hidden, s.leak)
        else:
            if not isinstance(backbone, BiGANAlexNet):
                raise ConfigError("bigan.arch=conv needs backbone=bigan_alexnet (task=bigan selects it)")
            if backbone.in_channels != s.channels:
                raise ConfigError(f"backbone.in_channels={backbone.in_channels} but bigan.channels={s.channels}")
            self.enc_size = backbone.input_size
            self.E = ConvEncoder(backbone, code)
            self.G = DCGANGenerator(code, s.image_size, s.channels, s.gan_width, g_out)
            self.D = DCGANDiscriminator(s.image_size, s.channels, code if self.objective.joint else None, s.gan_width, s.leak)
        if self.enc_size < s.image_size:
            raise ConfigError(f"encoder input {self.enc_size}px (backbone.input_size) is smaller than "
                              f"bigan.image_size={s.image_size}")
        gen = torch.Generator().manual_seed(int(seed or 0))
        self.register_buffer("fixed_z", self.prior.sample(100, generator=gen)[0], persistent=True)
        if self.prior.categories:
            self.register_buffer("fixed_grid_z", self.prior.grid(10, generator=gen), persistent=True)
        self.train_enabled, self.resume_from = bool(train), ckpt_path
        self.seed, self.cache_dir = int(seed or 0), cache_dir
        self.output_dir: Path | None = None
        self.data: dict[str, SplitTensors] = {}
        self.eval_batch_size = 512
        self.last_eval: dict[str, float] = {}
        self._train_t0: float | None = None

    # -- pixels and codes ---------------------------------------------------------------------------
    def to_model_range(self, x01: torch.Tensor) -> torch.Tensor:
        return x01 if self.s.pixel_range == "unit" else x01 * 2 - 1

    def to_unit_range(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.s.pixel_range == "unit" else (x + 1) / 2

    def inputs(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E's input at the encoder's resolution, D/G-space x at ``image_size``: g_X = resize)."""
        x01 = x01[:, : self.s.channels]
        x_e = self.to_model_range(x01)
        if x01.shape[-1] == self.s.image_size:
            return x_e, x_e
        x_g = F.interpolate(x01, size=(self.s.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return x_e, self.to_model_range(x_g)

    def encode(self, x_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(code logits, code in the prior's support)."""
        logits = self.E(x_e)
        return logits, self.prior.logits_to_code(logits, self.s.straight_through)

    def sample_z(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.prior.sample(n, device=self.device)

    # -- losses -------------------------------------------------------------------------------------
    def compute_losses(self, x01: torch.Tensor, z: torch.Tensor | None = None, category: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``D``: the discriminator's loss; ``GE``: the loss whose gradients train G and E; plus parts."""
        obj = self.objective
        x_e, x_g = self.inputs(x01)
        if z is None:
            z, category = self.sample_z(len(x01))
        out: dict[str, torch.Tensor] = {}
        bce = F.binary_cross_entropy_with_logits
        if obj.reconstruction:
            _, code = self.encode(x_e)
            rec = self.G(code)
            err = (rec - x_g).abs() if obj.reconstruction == "l1" else (rec - x_g) ** 2
            out["recon"] = err.flatten(1).mean(1).mean()
            out["GE"] = out["recon"]
            return out
        gx = self.G(z)
        if obj.joint:
            _, code = self.encode(x_e)
            d_real, d_fake = self.D(x_g, code), self.D(gx, z)
        else:
            d_real, d_fake = self.D(x_g), self.D(gx)
        ones, zeros = torch.ones_like(d_real), torch.zeros_like(d_real)
        out["D"] = 0.5 * (bce(d_real, ones) + bce(d_fake, zeros))
        if obj.joint:  # inverse objective for G and E: swap the labels
            out["GE"] = 0.5 * (bce(d_real, zeros) + bce(d_fake, ones))
        else:
            out["G_gan"] = bce(d_fake, torch.ones_like(d_fake))
            out["GE"] = out["G_gan"]
        if obj.regression_weight:
            weight = self.s.jlr_weight if obj.regression_into_generator else obj.regression_weight
            e_in = gx if obj.regression_into_generator else gx.detach()
            logits = self.E(e_in) if e_in.shape[-1] == self.enc_size else self.E(_resize(e_in, self.enc_size))
            out["latent_regression"] = self.prior.regression_loss(logits, z, category).mean()
            out["GE"] = out["GE"] + weight * out["latent_regression"]
        with torch.no_grad():
            out["D_acc"] = 0.5 * ((d_real > 0).float().mean() + (d_fake < 0).float().mean())
        return out

    def _params(self, names) -> list[nn.Parameter]:
        mods = {"D": self.D, "G": self.G, "E": self.E}
        return [p for n in "DGE" if n in names for p in mods[n].parameters() if p.requires_grad]

    def _check_finite(self, losses: dict[str, torch.Tensor], batch_idx: int) -> None:
        bad = {k: float(v) for k, v in losses.items() if k in ("D", "GE") and not torch.isfinite(v).all()}
        if not bad:
            return
        where = f"epoch {self.current_epoch}, batch {batch_idx}"
        keep = last_checkpoint_note(self)
        raise NonFiniteLossError(
            f"bigan: non-finite loss {bad} at {where} (objective={self.s.objective}); stopped before the update, "
            f"{keep}. Try a lower bigan.lr or trainer.precision=32-true."
        )

    def _set_grads(self, loss: torch.Tensor, names: str, retain: bool) -> None:
        params = self._params(names)
        grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.detach()

    def training_step(self, batch, batch_idx):
        if self._train_t0 is None:
            self._train_t0 = time.perf_counter()
        x01 = batch[0].float() / 255.0 if batch[0].dtype == torch.uint8 else batch[0]
        opts = dict(zip("DGE", self.optimizers(), strict=True))
        scheds = dict(zip("DGE", self.lr_schedulers(), strict=True))
        trains = self.objective.trains
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        z, category = self.sample_z(len(x01))
        losses = self.compute_losses(x01, z, category)
        self._check_finite(losses, batch_idx)
        if self.s.update == "alternating" and "D" in losses:
            self._set_grads(losses["D"], "D", retain=False)
            opts["D"].step()
            losses = self.compute_losses(x01, z, category)  # G and E against the updated D
            self._check_finite(losses, batch_idx)
            self._set_grads(losses["GE"], trains & set("GE"), retain=False)
        else:
            if "D" in trains and "D" in losses:
                self._set_grads(losses["D"], "D", retain=True)
            self._set_grads(losses["GE"], trains & set("GE"), retain=False)
            if "D" in trains and "D" in losses:
                opts["D"].step()
        for name in "GE":
            if name in trains:
                opts[name].step()
        for name in trains:
            scheds[name].step()
        n = len(x01)
        self.log("train/loss_ge", losses["GE"].detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        for key in ("D", "D_acc", "latent_regression", "recon"):
            if key in losses:
                name = {"D": "loss_d", "D_acc": "d_acc"}.get(key, key)
                self.log(f"train/{name}", losses[key].detach(), on_step=key == "D", on_epoch=True,
                         prog_bar=key == "D", batch_size=n)

    def configure_optimizers(self):
        s = self.s
        opts = [adam_with_weight_decay(m, s.lr, s.betas, s.weight_decay) for m in (self.D, self.G, self.E)]
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        if not math.isfinite(total) or total <= 0:
            total = 1
        scheds = [
            {"scheduler": torch.optim.lr_scheduler.LambdaLR(o, HalfwayExponentialDecay(total, s.final_lr / s.lr, s.decay_start)),
             "interval": "step"}
            for o in opts
        ]
        return opts, scheds

    # -- validation ---------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking and self.data:
            self.reestimate_bn()

    def validation_step(self, batch, batch_idx):
        if self.objective.features == "discriminator":
            return
        x01 = batch[0].float() / 255.0 if batch[0].dtype == torch.uint8 else batch[0]
        x_e, x_g = self.inputs(x01)
        rec = self.G(self.encode(x_e)[1])
        self.log("val/recon_mse", F.mse_loss(self.to_unit_range(rec), self.to_unit_range(x_g)), batch_size=len(x01))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self.data or "val" not in self.data:
            return
        t0 = time.perf_counter()
        acc = self.knn1("train", ["val"])
        self.log("val/knn1_acc", acc, prog_bar=True)
        if self._train_t0 is not None:
            self.log("val/train_seconds", time.perf_counter() - self._train_t0)
        if self.s.grids:
            self.save_grids(f"epoch{self.current_epoch:03d}")
        log.info("epoch %d: val/knn1_acc=%.4f (%.1fs)", self.current_epoch, acc, time.perf_counter() - t0)

    # -- evaluation ---------------------------------------------------------------------------------
    def _train_batches(self, n_batches: int, batch_size: int = 128):
        split = self.data["train"]
        gen = torch.Generator().manual_seed(self.seed + 1)
        idx = torch.randperm(len(split), generator=gen)
        for b in range(min(n_batches, max(1, len(split) // batch_size))):
            take = idx[b * batch_size : (b + 1) * batch_size]
            if len(take) < 2:
                break
            yield split.images[take].float().to(self.device) / 255.0

    @torch.no_grad()
    def reestimate_bn(self) -> None:
        """Population BN statistics for E, G and D from ``bigan.bn_batches`` training batches (and as many
        prior samples for G), instead of the running averages seen during training."""
        n = self.s.bn_batches
        reestimate_batchnorm(self.E, self._train_batches(n), lambda x: self.E(self.inputs(x)[0]))
        # prior samples from a private generator: evaluation must not move the training's global RNG stream (a
        # run resumed from an epoch-end checkpoint would otherwise draw other z than an uninterrupted one)
        gen = torch.Generator(device=self.device).manual_seed(self.seed + 2)
        reestimate_batchnorm(self.G, (self.prior.sample(128, generator=gen, device=self.device)[0] for _ in range(n)),
                             self.G)

        def d_forward(x01):
            x_e, x_g = self.inputs(x01)
            if self.D.joint:
                self.D(x_g, self.encode(x_e)[1])
            else:
                self.D(x_g)

        was_e = self.E.training
        self.E.eval()
        reestimate_batchnorm(self.D, self._train_batches(n), d_forward)
        self.E.train(was_e)

    @torch.no_grad()
    def features(self, split: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, labels) of one or more in-memory splits, modules in eval mode, fp32."""
        kind = self.s.features if self.s.features != "auto" else self.objective.features
        was = {m: m.training for m in (self.E, self.G, self.D)}
        for m in was:
            m.eval()
        feats, labels = [], []
        try:
            with torch.autocast(self.device.type, enabled=False):
                for name in [split] if isinstance(split, str) else split:
                    for x01, y in self.data[name].batches(self.eval_batch_size):
                        x_e, x_g = self.inputs(x01.to(self.device))
                        if kind == "discriminator":
                            z = self.encode(x_e)[1] if self.D.joint else None
                            f = self.D.forward_features(x_g, z)[0]
                        elif kind == "encoder_hidden":
                            f = self.E.forward_features(x_e)[0]
                        else:
                            f = self.E(x_e)
                        feats.append(f.float().cpu())
                        labels.append(y)
        finally:
            for m, t in was.items():
                m.train(t)
        return torch.cat(feats), torch.cat(labels)

    def knn1(self, gallery: str | list[str], queries: list[str]) -> float:
        from transferrable.unsupervised_eval import knn1_predict

        g, gy = self.features(gallery)
        q, qy = self.features(queries)
        pred, _ = knn1_predict(g, gy, q, self.s.knn_metric)
        return float((pred == qy).double().mean())

    def raw_knn1(self, gallery: list[str], query: str) -> float:
        """1-NN on raw pixels in [0, 1] (the reference line of Table 5.1), cached by the data's hash."""
        from transferrable.unsupervised_eval import knn1_predict

        g = torch.cat([self.data[s].images for s in gallery])
        gy = torch.cat([self.data[s].labels for s in gallery])
        q, qy = self.data[query].images, self.data[query].labels
        h = hashlib.sha1()
        for t in (g, gy, q):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        h.update(self.s.knn_metric.encode())
        cache = Path(self.cache_dir) / "bigan" / f"raw_knn1_{h.hexdigest()[:16]}.json" if self.cache_dir else None
        if cache is not None and cache.is_file():
            acc = _cached_acc(cache, qy)
            if acc is not None:
                return acc
        pred, _ = knn1_predict(g.float() / 255.0, gy, q.float() / 255.0, self.s.knn_metric)
        if cache is not None:
            from transferrable.atomic import atomic_write_json

            atomic_write_json(cache, {"predictions": pred.tolist(), "metric": self.s.knn_metric})
        return float((pred == qy).double().mean())

    def evaluate(self, split: str = "test") -> dict[str, float]:
        """The end-of-training numbers: 1-NN (features, raw pixels), linear probe, discrete clustering."""
        t0 = time.perf_counter()
        self.reestimate_bn()
        gallery = [s for s in ("train", "val") if s in self.data]
        metrics: dict[str, float] = {}
        g, gy = self.features(gallery)
        q, qy = self.features(split)
        from transferrable.unsupervised_eval import (
            cluster_nmi,
            cluster_purity,
            knn1_predict,
            linear_probe_accuracy,
        )

        pred, _ = knn1_predict(g, gy, q, self.s.knn_metric)
        metrics[f"{split}/knn1_acc"] = float((pred == qy).double().mean())
        if self.s.raw_knn:
            metrics[f"{split}/knn1_raw_acc"] = self.raw_knn1(gallery, split)
        if self.s.linear_probe:
            metrics[f"{split}/linear_probe_acc"] = linear_probe_accuracy(
                g.numpy(), gy.numpy(), q.numpy(), qy.numpy(), C=self.s.probe_C, max_train=self.s.probe_max_train,
                seed=self.seed)
        if self.prior.categories and "E" in self.objective.trains:
            clusters = self.encoder_categories(split)
            metrics[f"{split}/cluster_purity"] = cluster_purity(clusters.numpy(), qy.numpy())
            metrics[f"{split}/cluster_nmi"] = cluster_nmi(clusters.numpy(), qy.numpy())
        metrics[f"{split}/feature_dim"] = float(g.shape[1])
        metrics["eval_seconds"] = time.perf_counter() - t0
        self.last_eval = metrics
        return metrics

    @torch.no_grad()
    def encoder_categories(self, split: str) -> torch.Tensor:
        """argmax of E's category logits (``bigan.latent=discrete``) for every image of ``split``."""
        self.E.eval()
        out = []
        for x01, _ in self.data[split].batches(self.eval_batch_size):
            logits = self.E(self.inputs(x01.to(self.device))[0]).float()
            out.append(self.prior.split(logits)[0].argmax(1).cpu())
        return torch.cat(out)

    # -- grids --------------------------------------------------------------------------------------
    @torch.no_grad()
    def save_grids(self, tag: str) -> list[Path]:
        """G(z) for 100 fixed z, 50 fixed validation images x, their reconstructions G(E(x)) (Figure 5.2),
        and for a discrete latent the category x style grid (Figure 6.1)."""
        from callbacks.image_grid import save_image_grid

        if self.output_dir is None:
            return []
        out_dir = self.output_dir / "samples"
        for m in (self.E, self.G):
            m.eval()
        split = self.data.get("val") or self.data["train"]
        x01 = split.images[:50].float().to(self.device) / 255.0
        x_e, x_g = self.inputs(x01)
        shape = (-1, self.s.channels, self.s.image_size, self.s.image_size)
        panels = {
            "G(z)": self.to_unit_range(self.G(self.fixed_z)).reshape(shape),
            "x": self.to_unit_range(x_g).reshape(shape),
            "G(E(x))": self.to_unit_range(self.G(self.encode(x_e)[1])).reshape(shape),
        }
        if self.prior.categories:
            panels["categories"] = self.to_unit_range(self.G(self.fixed_grid_z)).reshape(shape)
        paths = []
        for name, imgs in panels.items():
            fname = {"G(z)": "samples", "x": "data", "G(E(x))": "reconstructions", "categories": "categories"}[name]
            paths.append(save_image_grid(imgs.float().cpu(), out_dir / f"{tag}_{fname}.png", nrow=10,
                                         upscale=self.s.grid_upscale))
        self.E.train(self.training)
        self.G.train(self.training)
        if self._trainer is not None:
            from callbacks.tsne import _wandb_loggers

            for lg in _wandb_loggers(self.trainer):
                lg.log_image(key="bigan_grids", images=[str(p) for p in paths], caption=list(panels))
        return paths

    # -- the run ------------------------------------------------------------------------------------
    def attach_data(self, datamodule) -> None:
        """Load every split into memory at the encoder's resolution (uint8)."""
        datamodule.setup("fit")
        self.eval_batch_size = int(getattr(datamodule, "eval_batch_size", 512))
        if getattr(datamodule, "augment", "none") != "none":
            log.warning("bigan.in_memory: dataset.augment=%s is applied once, not per epoch", datamodule.augment)
        t0 = time.perf_counter()
        for name, ds in datamodule.splits.items():
            self.data[name] = materialise_split(ds, self.enc_size, self.s.channels, mean=datamodule.mean, std=datamodule.std)
        log.info("bigan: %s in memory (%.1fs)", ", ".join(f"{k} {len(v)}" for k, v in self.data.items()),
                 time.perf_counter() - t0)

    def run_task(self, trainer: L.Trainer, datamodule, output_dir) -> dict:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if not self.s.in_memory:
            raise ConfigError("bigan.in_memory=false is not supported yet: the BiGAN task keeps its splits in memory "
                             "(use dataset.max_train_samples to bound them)")
        self.attach_data(datamodule)
        batch = int(getattr(datamodule, "batch_size", 128))
        train_loader = _batch_sampler_loader(self.data["train"], batch, True, self.seed, drop_last=len(self.data["train"]) > batch)
        val_loader = _batch_sampler_loader(self.data["val"], self.eval_batch_size, False, 0, drop_last=False)
        t0 = time.perf_counter()
        if self.train_enabled:
            trainer.fit(self, train_dataloaders=train_loader, val_dataloaders=val_loader,
                        ckpt_path=self.resume_from, weights_only=True)
        elif self.resume_from:
            blob = torch.load(self.resume_from, map_location="cpu", weights_only=True)
            self.load_state_dict(blob["state_dict"])
        train_seconds = time.perf_counter() - t0
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if _is_number(v)}
        metrics["train_seconds"] = train_seconds
        metrics["epochs"] = float(trainer.current_epoch)
        steps = trainer.fit_loop.epoch_loop._batches_that_stepped if self.train_enabled else 0
        if steps and train_seconds > 0:
            metrics["train_samples_per_s"] = steps * batch / train_seconds
        metrics.update(self.evaluate("test"))
        if self.s.grids:
            self.save_grids("final")
        if self.s.arch == "conv":
            metrics["encoder_checkpoint"] = str(self.export_encoder(self.output_dir / ENCODER_FILE))  # type: ignore[assignment]
        for lg in trainer.loggers:
            lg.log_metrics({k: v for k, v in metrics.items() if k.startswith("test/")}, step=trainer.global_step)
            lg.save()
        return metrics

    def export_encoder(self, path: Path) -> Path:
        """E's trunk as a suite backbone checkpoint, BN folded into the convolutions (``batch_norm=False``
        layout), for ``task=classify backbone=bigan_alexnet backbone.weights=<path>``."""
        from transferrable.atomic import atomic_torch_save

        trunk: BiGANAlexNet = self.E.trunk
        atomic_torch_save(path, {
            "arch": trunk.arch,
            "state_dict": trunk.folded_state_dict(),
            "bn_folded": True,
            "objective": self.s.objective,
            "metrics": {k: float(v) for k, v in self.last_eval.items()},
        })
        log.info("bigan: encoder backbone (BN folded) -> %s", path)
        return path

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if getattr(self, "run_config_yaml", None):
            checkpoint["run_config_yaml"] = self.run_config_yaml


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _cached_acc(cache: Path, query_labels: torch.Tensor) -> float | None:
    """The cached raw-pixel 1-NN accuracy, or None (with a ``CacheWarning``) when the file is damaged."""
    from transferrable.manifest import warn_rebuild

    try:
        pred = torch.as_tensor(json.loads(cache.read_text())["predictions"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        warn_rebuild("raw 1-NN cache", cache, f"it does not parse ({type(err).__name__})")
        return None
    if pred.shape != query_labels.shape:
        warn_rebuild("raw 1-NN cache", cache, f"{len(pred)} predictions for {len(query_labels)} queries")
        return None
    return float((pred == query_labels).double().mean())
