"""task=lrcn_video_description: build the decoder for the data's vocabulary, fit it, decode the test videos.

Stages: the tuple features of every split (``prob``: the recogniser's probabilities; ``max``/``encoder_max``: the
one-hot maximum tuple), fit with teacher forcing (the checkpoint with the lowest ``val/loss`` is decoded), beam
search (``video.beam``, at most ``video.max_len`` words) on the test videos, then BLEU-4 (plus BLEU-1, ROUGE-L,
CIDEr-D) against the references, the "most frequent training sentence" baseline and the recogniser's max accuracy
per slot. Writes ``tables.json`` (Table 4.9 layout) and ``sentences.json``. ``train=false ckpt_path=<checkpoint>``
decodes a checkpoint of this task without fitting (its vocabulary must be the data's).

Under DDP the fit is sharded by Lightning and every rank validates the whole val split (the same ``val/loss``, so
the same best checkpoint, on every rank); the tuples are generated before the first trainer call, by rank 0 alone
(the other ranks start there and find them). Every rank then beam-decodes the whole test split with that checkpoint
(deterministic: the one-process result on each rank, no collective); only rank 0 writes the files.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from datamodules.coco_captions import CaptionPairs, pad_captions
from datamodules.video_tuples import SLOTS, tuple_features
from engine.lrcn.caption_report import video_description_tables
from models.video_description import INPUTS
from transferrable.core.atomic import atomic_write_json
from transferrable.core.distributed import output_dir_of, rank_aware, whole_split_loader
from transferrable.core.errors import ConfigError
from transferrable.core.vocabulary import Vocabulary, VocabularyMismatchError
from transferrable.metrics.caption_eval import caption_metrics


@rank_aware
def run(cfg: DictConfig, trainer, datamodule, model) -> dict:
    video = cfg.video
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    datamodule.setup("fit")
    vocab = datamodule.vocab
    model.build(vocab, [len(c) for c in SLOTS.values()])
    kind = "prob" if model.cfg["input"] == "prob" else "max"
    feats = {s: tuple_features(datamodule.splits[s], kind) for s in ("train", "val", "test")}

    def loader(split: str, shuffle: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(int(cfg.seed))
        return DataLoader(CaptionPairs(datamodule.pairs(split), feats[split], vocab),
                          batch_size=datamodule.batch_size, shuffle=shuffle, generator=gen if shuffle else None,
                          collate_fn=lambda b: pad_captions(b, vocab))

    metrics: dict = {}
    if cfg.get("train", True):
        val = whole_split_loader(loader("val", False), trainer.world_size) if datamodule.splits["val"] else None
        trainer.fit(model, train_dataloaders=loader("train", True), val_dataloaders=val)
        cb = trainer.checkpoint_callback
        if cb is not None and cb.best_model_path:
            model.load_state_dict(torch.load(cb.best_model_path, map_location="cpu", weights_only=True)["state_dict"])
            metrics["test_checkpoint"] = cb.best_model_path
    else:
        load_checkpoint(model, vocab, cfg.get("ckpt_path"))
    model.eval()
    generated = beam_decode(model.decoder, vocab, feats["test"], int(video.beam), int(video.max_len))
    refs = datamodule.references("test")
    m = caption_metrics(refs, dict(enumerate(generated)), java=video.java, meteor=False)
    freq = Counter(c for r in datamodule.splits["train"] for c in r["sentences"]).most_common(1)[0][0]
    base = caption_metrics(refs, dict.fromkeys(refs, freq), java=video.java, meteor=False)
    metrics.update({f"test/{k}": v for k, v in m.items() if k != "METEOR" and k != "meteor_available"})
    metrics.update({f"test/baseline_frequent/{k}": base[k] for k in ("BLEU-4", "CIDEr-D")})
    metrics.update({f"data/max_accuracy/{s}": v for s, v in datamodule.summary["max_accuracy"].items()})
    with output_dir_of(trainer, output_dir) as where:  # rank 0 keeps them
        atomic_write_json(where / "tables.json", video_description_tables(INPUTS[model.cfg["input"]], m, base))
        atomic_write_json(where / "sentences.json", {"generated": generated, "references": refs,
                                                     "tuples": [r["tuple"] for r in datamodule.splits["test"]]})
    return metrics


def load_checkpoint(model, vocab: Vocabulary, ckpt: str | None) -> None:
    """``train=false``: the weights of ``ckpt_path``, a checkpoint of this task over the same vocabulary."""
    if not ckpt:
        raise ConfigError("task=lrcn_video_description train=false: pass the checkpoint to decode, ckpt_path=<file>")
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    stored = Vocabulary.from_dict(blob["vocabulary"]) if "vocabulary" in blob else None
    if stored != vocab:
        raise VocabularyMismatchError(
            f"ckpt_path={ckpt}: " + ("no vocabulary stored (not an lrcn_video_description checkpoint)"
                                     if stored is None else f"its vocabulary differs ({stored.difference(vocab)})"))
    model.load_state_dict(blob["state_dict"])


@torch.no_grad()
def beam_decode(decoder, vocab, features: torch.Tensor, width: int, max_len: int, batch: int = 256) -> list[str]:
    out = []
    for i in range(0, len(features), batch):
        d = decoder.beam(features[i : i + batch], width=width, max_len=max_len)
        out += [vocab.decode(r) for r in d.tokens.tolist()]
    return out
