"""task=lrcn_video_description: sentences from a video's semantic tuple (thesis 4.5, Table 4.9).

``video.input`` picks the architecture (``models/video_description.py``): (a) ``encoder_max`` LSTM
encoder-decoder over the maximum tuple, (b) ``max`` the decoder fed the maximum tuple at every step, (c) ``prob``
the decoder fed the recogniser's class probabilities at every step; all with the two-layer unfactored LRCN
decoder (``2u``), as in the thesis. The decoder is built once the vocabulary is known (:meth:`build`); the
stages (fit, beam-search decoding, BLEU-4 and the tables) are ``engine/lrcn/video_description.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from omegaconf import OmegaConf

from models.lrcn_caption import LRCNCaptioner
from models.video_description import INPUTS, tuple_decoder
from transferrable.core.errors import ConfigError


class VideoDescriptionModule(L.LightningModule):
    REQUIRES_DATA = ("tuples", "sentences")  # checked against the dataset before any work (transferrable/run/compat.py)

    def __init__(self, backbone, num_classes, cfg, optimizer: Callable[..., torch.optim.Optimizer]):
        """``cfg``: the ``video:`` node of ``conf/task/lrcn_video_description.yaml`` (no backbone: tuples in)."""
        super().__init__()
        cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        if cfg["input"] not in INPUTS:
            raise ConfigError(f"video.input={cfg['input']!r}: expected one of {list(INPUTS)}")
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        self.optimizer_factory = optimizer
        self.decoder: LRCNCaptioner | None = None

    def build(self, vocab, slot_sizes: list[int]) -> None:
        c = self.cfg
        self.decoder = tuple_decoder(vocab, slot_sizes, c["input"], c["hidden"], c["embed"], c["dropout"])
        self.vocab = vocab

    def training_step(self, batch, batch_idx):
        x, tokens, _ = batch
        loss = self.decoder.loss(x, tokens)
        self.log("train/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(tokens), sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, tokens, _ = batch
        # under DDP every rank validates the whole split (transferrable/core/distributed.py whole_split_loader): the same value on each
        self.log("val/loss", self.decoder.loss(x, tokens), on_epoch=True, prog_bar=True, batch_size=len(tokens),
                 sync_dist=True)

    def configure_optimizers(self):
        return self.optimizer_factory(params=self.decoder.parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vocabulary"] = self.vocab.to_dict()
