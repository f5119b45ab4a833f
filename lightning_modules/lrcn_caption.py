"""task=lrcn_caption: LRCN image captioning (thesis 4.4): the decoder's training and validation steps.

The decoder (``models/lrcn_caption.py``: variant 1u/2u/2f, unit lstm/rnn, image every step or first step) is built
once the vocabulary is known (:meth:`LRCNCaptionModule.build`); it reads the backbone's tap (``lrcn.tap``), or
cached feature rows of a frozen backbone. Teacher forcing, cross-entropy over the words and ``<EOS>``; with
``backbone.freeze=none`` (or a tap) the CNN is fine-tuned through the captioning loss at ``lrcn.backbone_lr_scale``
x the decoder's learning rate. The stages (vocabulary, feature cache, fit, decoding, metrics, retrieval, tables)
are ``engine/lrcn/caption.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from models.backbones import TapBackbone
from models.lrcn_caption import LRCNCaptioner
from transferrable.core.errors import ConfigError
from transferrable.core.vocabulary import Vocabulary, VocabularyMismatchError


class LRCNCaptionModule(L.LightningModule):
    REQUIRES_DATA = ("images", "captions")  # checked against the dataset before any work (transferrable/run/compat.py)

    def __init__(self, backbone: TapBackbone, num_classes, cfg, optimizer: Callable[..., torch.optim.Optimizer]):
        """``cfg``: the ``lrcn:`` node of ``conf/task/lrcn_caption.yaml`` (tap, variant, unit, image_input, hidden,
        embed, dropout, backbone_lr_scale; the rest is the pipeline's)."""
        super().__init__()
        cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        self.optimizer_factory = optimizer
        self.backbone = backbone
        backbone.check_taps([cfg["tap"]])
        self.frozen = backbone.freeze_spec == "all"
        self.feature_dim = backbone.feature_dim(cfg["tap"])
        self.vocab: Vocabulary | None = None
        self.decoder: LRCNCaptioner | None = None
        if self.frozen:
            backbone.requires_grad_(False)
            backbone.eval()
        else:  # the stages after the tap never run: no gradients for them (DDP refuses parameters without one)
            for name in backbone.tap_names[backbone.tap_names.index(cfg["tap"]) + 1:]:
                backbone.stages[name].requires_grad_(False)

    # -- model ----------------------------------------------------------------------------------
    def build(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        c = self.cfg
        self.decoder = LRCNCaptioner(len(vocab), self.feature_dim, hidden=c["hidden"], embed=c["embed"],
                                     variant=c["variant"], unit=c["unit"], image_input=c["image_input"],
                                     dropout=c["dropout"], pad=vocab.pad, bos=vocab.bos, eos=vocab.eos)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Cached feature rows pass through; images go through the backbone to the tap."""
        if x.ndim == 2:
            return x
        tap = self.cfg["tap"]
        return self.backbone.forward_taps(x, [tap])[tap].flatten(1)

    def training_step(self, batch, batch_idx):
        x, tokens, _ = batch
        loss = self.decoder.loss(self.image_features(x), tokens)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(tokens),
                 sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, tokens, _ = batch
        loss = self.decoder.loss(self.image_features(x), tokens)
        # under DDP every rank validates the whole split (transferrable/core/distributed.py whole_split_loader): the same value on
        # each, so the mean over ranks is that value and every rank picks the same best checkpoint
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(tokens), sync_dist=True)

    _EVAL_HINT = ("task=lrcn_caption evaluates inside its own run: use `python train.py task=lrcn_caption "
                  "train=false ckpt_path=<checkpoint>` (with the run's overrides)")

    def setup(self, stage: str) -> None:
        if stage == "test" and self.decoder is None:  # eval.py ckpt_path=... goes through trainer.test
            raise ConfigError(self._EVAL_HINT)

    def test_step(self, batch, batch_idx):
        raise ConfigError(self._EVAL_HINT)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=list(self.decoder.parameters()))
        trainable = [p for p in self.backbone.parameters() if p.requires_grad]
        if trainable and not self.frozen:  # the fine-tuned CNN learns at backbone_lr_scale x the decoder's rate
            optimizer.add_param_group({"params": trainable,
                                       "lr": optimizer.defaults["lr"] * self.cfg["backbone_lr_scale"]})
        return optimizer

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vocabulary"] = self.vocab.to_dict()
        checkpoint["backbone_arch"] = self.backbone.arch
        if getattr(self, "run_config_yaml", None):
            checkpoint["run_config_yaml"] = self.run_config_yaml

    def load_weights(self, path: str | Path) -> None:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        state = blob.get("state_dict", blob)
        vocab = Vocabulary.from_dict(blob["vocabulary"]) if "vocabulary" in blob else self.vocab
        emb = state.get("decoder.embed.weight")
        if emb is not None and emb.shape[0] != len(vocab):
            raise VocabularyMismatchError(f"ckpt_path={path}: its vocabulary has {len(vocab)} words but its "
                                          f"embedding {emb.shape[0]} rows")
        if self.decoder is None or vocab != self.vocab:
            self.build(vocab)
        self.load_state_dict(state)
