"""task=bigan: Bidirectional GANs and their baselines (thesis ch. 5), one LightningModule, manual optimisation.

``bigan.objective`` picks the losses (``models/bigan_training.py`` has the table); LR is the sigmoid
cross-entropy between ``(z + 1) / 2`` and ``E(G(z))``'s logits, averaged over the code's dimensions (the loss
weights of the original code: ``--encode_gen_weight``/``--encode_weight``/``--discrim_weight``/
``--joint_discrim_weight``). The "inverse" objective (labels swapped) trains G and E (appendix 5.5.2): D minimises
``-log D(x, E(x)) - log(1 - D(G(z), z))``, G and E minimise ``-log(1 - D(x, E(x))) - log D(G(z), z)``. By default
D, G and E are all updated at once from one forward pass (``bigan.update=simultaneous``); ``alternating`` steps D
first, then G/E against the new D.

Three optimisers and schedules (D, G, E) from ``model.optimizer`` / ``model.scheduler`` (Adam 2e-4, beta1 0.5,
constant then exponential decay to 2e-6); checkpoints hold all three, ``ckpt_path=<last.ckpt>`` resumes them.

Validation: BN statistics re-estimated on training data first (like the original "deploy" pass), then
``val/knn1_acc`` (val queries, train gallery; Euclidean distance in the feature space). The splits live in memory
(``self.data``, filled by ``engine/bigan/pipeline.py``, which also runs the end-of-training evaluation: test 1-NN, raw-pixel
1-NN, linear probe, clustering, the final sample grids and the encoder export).

Under DDP each rank trains on its shard of every epoch with its own rows of the shared prior stream; gradients
from ``torch.autograd.grad`` (unseen by DDP's reducer) are averaged over the ranks in :meth:`_set_grads`, and
evaluation embeds the same batches as one process, shared over the ranks (``transferrable/core/distributed.py``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from datamodules.in_memory import SplitTensors
from models.bigan import (
    BiGANAlexNet,
    ConvEncoder,
    DCGANDiscriminator,
    DCGANGenerator,
    LatentPrior,
    MLPDiscriminator,
    MLPEncoder,
    MLPGenerator,
)
from models.bigan_training import OBJECTIVES, BiGANSettings, decay_param_groups, reestimate_bigan_bn
from transferrable.core.distributed import any_rank, average_over_ranks, map_shards, rank_and_world
from transferrable.core.errors import ConfigError, NonFiniteLossError, last_checkpoint_note
from transferrable.metrics import unsupervised_eval  # looked up per call (tests spy on knn1_predict)

log = logging.getLogger(__name__)


class BiGANModule(L.LightningModule):
    REQUIRES_DATA = ("images", "labels")  # 1-NN / linear-probe evaluation (transferrable/run/compat.py)

    def __init__(
        self,
        backbone: nn.Module | None,
        num_classes: int | None,
        cfg,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler],
        seed: int | None,
    ):
        """``cfg``: the ``bigan:`` node of ``conf/task/bigan.yaml``; ``optimizer``/``scheduler``: partials, one
        of each is built for D, G and E (the scheduler also gets ``total_steps``)."""
        super().__init__()
        self.automatic_optimization = False
        cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        self.save_hyperparameters({"cfg": cfg, "seed": seed})
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.s = s = BiGANSettings.from_dict(cfg)
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
        self.seed = int(seed or 0)
        self.data: dict[str, SplitTensors] = {}  # the splits in memory (engine/bigan/pipeline.py)
        self.eval_batch_size = 512
        self.batches_trained = 0  # training batches of this process (each steps up to three optimisers)
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

    def sample_train_z(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's ``n`` prior samples: every rank draws the ``W * n`` of the global batch from the same RNG
        stream (seeded alike) and keeps its own rows, so the ranks' streams stay in step and their z differ."""
        rank, world = rank_and_world()
        if world == 1:
            return self.sample_z(n)
        z, category = self.sample_z(n * world)
        rows = slice(rank * n, (rank + 1) * n)
        return z[rows], None if category is None else category[rows]

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
        if not any_rank(bool(bad)):  # every rank stops, or none
            return
        if not bad:
            bad = {"on another rank": float("nan")}
        where = f"epoch {self.current_epoch}, batch {batch_idx}"
        keep = last_checkpoint_note(self)
        raise NonFiniteLossError(
            f"bigan: non-finite loss {bad} at {where} (objective={self.s.objective}); stopped before the update, "
            f"{keep}. Try a lower bigan.lr or trainer.precision=32-true."
        )

    def _set_grads(self, loss: torch.Tensor, names: str, retain: bool) -> None:
        params = self._params(names)
        grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
        grads = average_over_ranks(grads)
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.detach()

    def training_step(self, batch, batch_idx):
        if self._train_t0 is None:
            self._train_t0 = time.perf_counter()
        self.batches_trained += 1
        x01 = batch[0].float() / 255.0 if batch[0].dtype == torch.uint8 else batch[0]
        opts = dict(zip("DGE", self.optimizers(), strict=True))
        scheds = dict(zip("DGE", self.lr_schedulers(), strict=True))
        trains = self.objective.trains
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        z, category = self.sample_train_z(len(x01))
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
        sync = self.trainer.world_size > 1  # the ranks' means, averaged (each rank has its own batches)
        self.log("train/loss_ge", losses["GE"].detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=n,
                 sync_dist=sync)
        for key in ("D", "D_acc", "latent_regression", "recon"):
            if key in losses:
                name = {"D": "loss_d", "D_acc": "d_acc"}.get(key, key)
                self.log(f"train/{name}", losses[key].detach(), on_step=key == "D", on_epoch=True,
                         prog_bar=key == "D", batch_size=n, sync_dist=sync)

    def configure_optimizers(self):
        opts = [self.optimizer_factory(params=decay_param_groups(m)) for m in (self.D, self.G, self.E)]
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        if not math.isfinite(total) or total <= 0:
            total = 1
        scheds = [{"scheduler": self.scheduler_factory(optimizer=o, total_steps=total), "interval": "step"}
                  for o in opts]
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
        # every rank validates the whole val split (no sampler sharding): the same value on each
        self.log("val/recon_mse", F.mse_loss(self.to_unit_range(rec), self.to_unit_range(x_g)), batch_size=len(x01),
                 sync_dist=self.trainer.world_size > 1)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self.data or "val" not in self.data:
            return
        t0 = time.perf_counter()
        acc = self.knn1("train", ["val"])
        self.log("val/knn1_acc", acc, prog_bar=True)  # the same on every rank (the whole split, gathered)
        if self._train_t0 is not None:
            self.log("val/train_seconds", time.perf_counter() - self._train_t0)
        log.info("epoch %d: val/knn1_acc=%.4f (%.1fs)", self.current_epoch, acc, time.perf_counter() - t0)

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def reestimate_bn(self) -> None:
        """Population BN statistics for E, G and D (``models/bigan_training.py``), before evaluation."""
        reestimate_bigan_bn(self)

    def map_batches(self, split: str | list[str], fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn(x01)`` over the evaluation batches of one or more in-memory splits, concatenated in order (on the
        CPU). Under DDP every rank runs its share (batch ``i`` on rank ``i % W``, the batches one process would
        run) and gets all of them back: every rank must call this at the same point."""
        bs = self.eval_batch_size
        jobs = [(name, start) for name in ([split] if isinstance(split, str) else split)
                for start in range(0, len(self.data[name]), bs)]

        def run(job):
            name, start = job
            return fn((self.data[name].images[start : start + bs].float() / 255.0).to(self.device)).cpu()

        return torch.cat(map_shards(jobs, run))

    @torch.no_grad()
    def features(self, split: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, labels) of one or more in-memory splits, modules in eval mode, fp32 (sharded over the
        ranks under DDP, :meth:`map_batches`)."""
        kind = self.s.features if self.s.features != "auto" else self.objective.features
        names = [split] if isinstance(split, str) else list(split)

        def embed(x01: torch.Tensor) -> torch.Tensor:
            x_e, x_g = self.inputs(x01)
            if kind == "discriminator":
                z = self.encode(x_e)[1] if self.D.joint else None
                f = self.D.forward_features(x_g, z)[0]
            elif kind == "encoder_hidden":
                f = self.E.forward_features(x_e)[0]
            else:
                f = self.E(x_e)
            return f.float()

        was = {m: m.training for m in (self.E, self.G, self.D)}
        for m in was:
            m.eval()
        try:
            with torch.autocast(self.device.type, enabled=False):
                feats = self.map_batches(names, embed)
        finally:
            for m, t in was.items():
                m.train(t)
        return feats, torch.cat([self.data[name].labels for name in names])

    def knn1(self, gallery: str | list[str], queries: list[str]) -> float:
        g, gy = self.features(gallery)
        q, qy = self.features(queries)
        pred = unsupervised_eval.knn1_predict_sharded(g, gy, q, self.s.knn_metric)
        return float((pred == qy).double().mean())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if getattr(self, "run_config_yaml", None):
            checkpoint["run_config_yaml"] = self.run_config_yaml


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
