"""task=lrcn_video_description: sentences from a video's semantic tuple (thesis 4.5, Table 4.9).

``video.input`` picks the architecture (all with the two-layer unfactored LRCN decoder, ``2u``, as in the
thesis):

* ``encoder_max`` -- (a) LSTM encoder-decoder: an LSTM reads the maximum tuple as a word sequence
  (object, action, direction, place); its final state enters the decoder with ``<BOS>`` only, so the
  decoder must remember it;
* ``max`` -- (b) the decoder fed the maximum tuple (one-hot per slot) at every step;
* ``prob`` -- (c) the decoder fed the recogniser's class probabilities at every step.

Data: ``dataset=video_tuples`` (``datamodules/video_tuples.py``; a simulated recogniser until an activity
recogniser lands). Metric: BLEU-4 (plus BLEU-1, ROUGE-L, CIDEr-D) of the beam-search sentence against the
references, the "most frequent training sentence" baseline, and the recogniser's max accuracy per slot.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from torch import nn

from models.lrcn_caption import LRCNCaptioner
from models.recurrent import LSTM
from transferrable.caption_eval import caption_metrics
from transferrable.errors import ConfigError

INPUTS = {"encoder_max": "(a) LSTM encoder-decoder, tuple max", "max": "(b) LSTM decoder, tuple max",
          "prob": "(c) LSTM decoder, tuple probabilities"}


class TupleEncoder(nn.Module):
    """Reads the max tuple as a sequence of slot words and returns the LSTM's last hidden state."""

    def __init__(self, slot_sizes: list[int], embed: int, hidden: int):
        super().__init__()
        self.slot_sizes = list(slot_sizes)
        self.embed = nn.Embedding(sum(slot_sizes), embed)
        self.lstm = LSTM(embed, hidden, batch_first=True)
        self.register_buffer("offsets", torch.tensor([0, *torch.tensor(slot_sizes).cumsum(0)[:-1].tolist()]))

    def forward(self, onehots: torch.Tensor) -> torch.Tensor:
        ids = torch.stack([b.argmax(1) for b in onehots.split(self.slot_sizes, 1)], 1) + self.offsets
        _, (h, _) = self.lstm(self.embed(ids))
        return h[-1]


class VideoDescriptionModule(L.LightningModule):
    REQUIRES_DATA = ("tuples", "sentences")  # checked against the dataset before any work (transferrable/compat.py)

    def __init__(self, backbone=None, num_classes=None, input: str = "prob", hidden: int = 256, embed: int = 128,
                 dropout: float = 0.3, lr: float = 2e-3, beam: int = 3, max_len: int = 20, java: str = "auto",
                 seed: int = 0):
        super().__init__()
        if input not in INPUTS:
            raise ConfigError(f"video.input={input!r}: expected one of {list(INPUTS)}")
        self.save_hyperparameters(ignore=["backbone"])
        self.decoder: LRCNCaptioner | None = None

    def build(self, vocab, slot_sizes: list[int]) -> None:
        h = self.hparams
        first = h.input == "encoder_max"
        self.decoder = LRCNCaptioner(len(vocab), sum(slot_sizes), hidden=h.hidden, embed=h.embed, image_embed=h.hidden,
                                     variant="2u", image_input="first_step" if first else "every_step",
                                     dropout=h.dropout, pad=vocab.pad, bos=vocab.bos, eos=vocab.eos)
        if first:
            self.decoder.image_proj = TupleEncoder(slot_sizes, h.embed, h.hidden)
        self.vocab = vocab

    def training_step(self, batch, batch_idx):
        x, tokens, _ = batch
        loss = self.decoder.loss(x, tokens)
        self.log("train/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(tokens))
        return loss

    def validation_step(self, batch, batch_idx):
        x, tokens, _ = batch
        self.log("val/loss", self.decoder.loss(x, tokens), on_epoch=True, prog_bar=True, batch_size=len(tokens))

    def configure_optimizers(self):
        return torch.optim.Adam(self.decoder.parameters(), lr=self.hparams.lr)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vocabulary"] = self.vocab.to_dict()

    def run_task(self, trainer: L.Trainer, datamodule, output_dir: str | Path) -> dict:
        from torch.utils.data import DataLoader

        from datamodules.coco_captions import CaptionPairs, pad_captions
        from datamodules.video_tuples import SLOTS, tuple_features
        from transferrable.atomic import atomic_write_json

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        datamodule.setup("fit")
        vocab = datamodule.vocab
        self.build(vocab, [len(c) for c in SLOTS.values()])
        kind = "prob" if self.hparams.input == "prob" else "max"
        feats = {s: tuple_features(datamodule.splits[s], kind) for s in ("train", "val", "test")}

        def loader(split: str, shuffle: bool) -> DataLoader:
            gen = torch.Generator().manual_seed(int(self.hparams.seed))
            return DataLoader(CaptionPairs(datamodule.pairs(split), feats[split], vocab),
                              batch_size=datamodule.batch_size, shuffle=shuffle, generator=gen if shuffle else None,
                              collate_fn=lambda b: pad_captions(b, vocab))

        trainer.fit(self, train_dataloaders=loader("train", True),
                    val_dataloaders=loader("val", False) if datamodule.splits["val"] else None)
        cb = trainer.checkpoint_callback
        if cb is not None and cb.best_model_path:
            self.load_state_dict(torch.load(cb.best_model_path, map_location="cpu", weights_only=True)["state_dict"])
        self.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(feats["test"]), 256):
                d = self.decoder.beam(feats["test"][i : i + 256], width=int(self.hparams.beam),
                                      max_len=int(self.hparams.max_len))
                out += [vocab.decode(r) for r in d.tokens.tolist()]
        refs = datamodule.references("test")
        m = caption_metrics(refs, dict(enumerate(out)), java=self.hparams.java, meteor=False)
        freq = Counter(c for r in datamodule.splits["train"] for c in r["sentences"]).most_common(1)[0][0]
        base = caption_metrics(refs, dict.fromkeys(refs, freq), java=self.hparams.java, meteor=False)
        metrics = {f"test/{k}": v for k, v in m.items() if k != "METEOR" and k != "meteor_available"}
        metrics.update({f"test/baseline_frequent/{k}": base[k] for k in ("BLEU-4", "CIDEr-D")})
        metrics.update({f"data/max_accuracy/{s}": v for s, v in datamodule.summary["max_accuracy"].items()})
        label = INPUTS[self.hparams.input]

        def cells(x):
            return [[100 * x[k]] if math.isfinite(x[k]) else None for k in ("BLEU-4", "BLEU-1", "ROUGE-L", "CIDEr-D")]

        tables = [{"title": "Video description (Table 4.9 layout): scores x100 on the test videos",
                   "corner": "architecture, input", "columns": ["BLEU-4", "BLEU-1", "ROUGE-L", "CIDEr-D"],
                   "rows": [{"label": label, "cells": cells(m)}], "merge_runs": True},
                  {"title": "Baseline: the most frequent training sentence for every video", "corner": "",
                   "columns": ["BLEU-4", "BLEU-1", "ROUGE-L", "CIDEr-D"],
                   "rows": [{"label": "most frequent sentence", "cells": cells(base)}]}]
        atomic_write_json(output_dir / "tables.json", tables)
        atomic_write_json(output_dir / "sentences.json", {"generated": out, "references": refs,
                                                          "tuples": [r["tuple"] for r in datamodule.splits["test"]]})
        return metrics
