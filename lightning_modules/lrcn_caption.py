"""task=lrcn_caption: LRCN image captioning (thesis 4.4) with caption generation metrics and retrieval.

One job (``run_task``): build the vocabulary from the training captions, then

1. image features: with ``backbone.freeze=all`` the tap (``lrcn.tap``, fc6/fc7) is extracted once per image
   and cached (``transferrable/feature_cache.py``), so a sweep over decoders trains on cached rows; with
   ``backbone.freeze=none`` (or a tap) the CNN is fine-tuned through the captioning loss
   (``lrcn.backbone_lr_scale`` x the decoder's learning rate);
2. fit the decoder (``models/lrcn_caption.py``: variant 1u/2u/2f, unit lstm/rnn, image every step or first
   step) with teacher forcing, cross-entropy over the words and ``<EOS>``, gradient clipping (trainer);
   the checkpoint with the lowest ``val/loss`` is evaluated;
3. test: every decoder of ``lrcn.decoders`` (greedy, beam k, sampling N at inverse temperature T; the first
   is the headline) -> BLEU-1..4 / METEOR / ROUGE-L / CIDEr-D (``transferrable/caption_eval.py``), the
   "most frequent training caption" baseline, retrieval in both directions on ``lrcn.retrieval.images``
   test images (R@1/5/10, median rank; length-normalised log-likelihood), captions/s per decoder;
4. ``captions.json`` (every decoder's captions), ``tables.json`` (Table 4.5 / 4.6 / decoding layouts,
   merged across the runs of a sweep by ``eval.py report=``), ``captions.png`` (a few test images with
   their captions; also a W&B table when W&B is the logger).

Bad input never stops the evaluation after training: images without references are left out of the
metrics (counted), METEOR without Java is NaN with a warning, empty generated captions score as empty.
A checkpoint (``ckpt_path``) carries its vocabulary: ``train=false`` evaluates with it; resuming training
on data whose vocabulary differs is refused up front (``VocabularyMismatchError``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf

from models.backbones import TapBackbone
from models.lrcn_caption import LRCNCaptioner
from transferrable.caption_eval import caption_metrics, retrieval_metrics
from transferrable.errors import ConfigError
from transferrable.precision import inference_bf16
from transferrable.vocabulary import Vocabulary, VocabularyMismatchError

log = logging.getLogger(__name__)


def plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def decoder_name(spec: dict) -> str:
    m = spec["method"]
    if m == "greedy":
        return "greedy"
    if m == "beam":
        return f"beam{int(spec['width'])}"
    return f"sample_n{int(spec['n'])}_T{float(spec['inverse_temperature']):g}"


def parse_decoders(specs) -> list[dict]:
    """``lrcn.decoders``: strings (``greedy``, ``beam5``, ``sample:10:1.5``) or dicts with method/width/n/T."""
    out = []
    for s in plain(specs) or ["beam1"]:
        if isinstance(s, str):
            if s == "greedy":
                d = {"method": "beam", "width": 1}
            elif s.startswith("beam") and s[4:].isdigit():
                d = {"method": "beam", "width": int(s[4:])}
            elif s.startswith("sample:") and len(s.split(":")) == 3:
                _, n, t = s.split(":")
                d = {"method": "sample", "n": int(n), "inverse_temperature": float(t)}
            else:
                raise ConfigError(f"lrcn.decoders: {s!r}; expected greedy, beam<k> or sample:<N>:<T>")
        else:
            d = dict(s)
        d.setdefault("width", 1)
        d.setdefault("n", 1)
        d.setdefault("inverse_temperature", 1.0)
        if d["method"] not in ("beam", "sample", "greedy") or int(d["width"]) < 1 or int(d["n"]) < 1:
            raise ConfigError(f"lrcn.decoders: bad decoder {s!r}")
        d["name"] = decoder_name(d)
        out.append(d)
    return out


class LRCNCaptionModule(L.LightningModule):
    REQUIRES_DATA = ("images", "captions")  # checked against the dataset before any work (transferrable/compat.py)

    def __init__(
        self,
        backbone: TapBackbone,
        num_classes: int | None = None,
        tap: str = "fc7",
        variant: str = "2f",
        unit: str = "lstm",
        image_input: str = "every_step",
        hidden: int = 256,
        embed: int = 256,
        dropout: float = 0.5,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        backbone_lr_scale: float = 0.1,
        max_len: int = 20,
        decoders=("beam1",),
        retrieval: dict | None = None,
        metrics: dict | None = None,
        show_images: int = 8,
        feature_cache: bool = True,
        bf16: bool | None = None,
        cache_dir: str | None = None,
        ckpt_path: str | None = None,
        train: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        # bf16 autocast of this task's own inference paths; null follows trainer.precision (run_task)
        self.use_bf16 = inference_bf16(bf16, None)
        self.backbone = backbone
        backbone.check_taps([tap])
        self.frozen = backbone.freeze_spec == "all"
        self.feature_dim = backbone.feature_dim(tap)
        self.decoders = parse_decoders(decoders)
        self.retrieval_cfg = {"images": 1000, "rows_per_batch": 4096, **(plain(retrieval) or {})}
        self.metrics_cfg = {"java": "auto", "meteor": "all", **(plain(metrics) or {})}
        if self.metrics_cfg["meteor"] not in ("all", "main", "none"):
            raise ConfigError(f"lrcn.metrics.meteor={self.metrics_cfg['meteor']!r}: expected all, main or none")
        self.vocab: Vocabulary | None = None
        self.decoder: LRCNCaptioner | None = None
        if self.frozen:
            backbone.requires_grad_(False)
            backbone.eval()

    # -- model ----------------------------------------------------------------------------------
    def build(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        h = self.hparams
        self.decoder = LRCNCaptioner(len(vocab), self.feature_dim, hidden=h.hidden, embed=h.embed, variant=h.variant,
                                     unit=h.unit, image_input=h.image_input, dropout=h.dropout, pad=vocab.pad,
                                     bos=vocab.bos, eos=vocab.eos)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Cached feature rows pass through; images go through the backbone to the tap."""
        if x.ndim == 2:
            return x
        return self.backbone.forward_taps(x, [self.hparams.tap])[self.hparams.tap].flatten(1)

    def training_step(self, batch, batch_idx):
        x, tokens, _ = batch
        loss = self.decoder.loss(self.image_features(x), tokens)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(tokens))
        return loss

    def validation_step(self, batch, batch_idx):
        x, tokens, _ = batch
        loss = self.decoder.loss(self.image_features(x), tokens)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(tokens))

    _EVAL_HINT = ("task=lrcn_caption evaluates inside its own run: use `python train.py task=lrcn_caption "
                  "train=false ckpt_path=<checkpoint>` (with the run's overrides)")

    def setup(self, stage: str) -> None:
        if stage == "test" and self.decoder is None:  # eval.py ckpt_path=... goes through trainer.test
            raise ConfigError(self._EVAL_HINT)

    def test_step(self, batch, batch_idx):
        raise ConfigError(self._EVAL_HINT)

    def configure_optimizers(self):
        groups = [{"params": list(self.decoder.parameters()), "lr": self.hparams.lr}]
        trainable = [p for p in self.backbone.parameters() if p.requires_grad]
        if trainable and not self.frozen:
            groups.append({"params": trainable, "lr": self.hparams.lr * self.hparams.backbone_lr_scale})
        return torch.optim.Adam(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

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

    # -- features -------------------------------------------------------------------------------
    def feature_key(self, datamodule, split: str) -> dict:
        from transferrable.feature_cache import CACHE_VERSION, state_sha256

        if not hasattr(self, "_state_sha"):
            self._state_sha = state_sha256(self.backbone)
        # the state hash names the weights; shapes in it and the input size pin the architecture
        arch = {"arch": self.backbone.arch, "input_size": self.backbone.input_size}
        return {"version": CACHE_VERSION, "task": "lrcn_caption", "data": datamodule.dataset_key(), "split": split,
                "n": len(datamodule.splits[split]), "tap": self.hparams.tap, "backbone": arch,
                "weights_sha256": self._state_sha, "bf16": self.use_bf16}

    @torch.no_grad()
    def extract(self, datamodule, split: str, cache: bool) -> torch.Tensor:
        from tqdm import tqdm

        from transferrable.feature_cache import FeatureCache

        def compute() -> np.ndarray:
            was = self.backbone.training
            self.backbone.eval()
            rows = []
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.use_bf16):
                for x, _ in tqdm(datamodule.image_loader(split), desc=f"features {split}", leave=False):
                    rows.append(self.image_features(x.to(self.device)).float().cpu().numpy())
            self.backbone.train(was)
            return np.concatenate(rows).astype(np.float32)

        if not cache:
            return torch.from_numpy(compute())
        fc = FeatureCache(Path(self.hparams.cache_dir or ".") / "features",
                          enabled=bool(self.hparams.feature_cache and self.hparams.cache_dir))
        arr, _ = fc.get_or_compute(f"lrcn-{self.hparams.tap}-{split}", self.feature_key(datamodule, split), compute)
        return torch.from_numpy(arr)

    # -- the job --------------------------------------------------------------------------------
    def run_task(self, trainer: L.Trainer, datamodule, output_dir: str | Path) -> dict:
        self.use_bf16 = inference_bf16(self.hparams.bf16, trainer.precision)
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if hasattr(datamodule, "prepare_data"):
            datamodule.prepare_data()
        datamodule.setup("fit")
        ckpt = self.hparams.ckpt_path
        if ckpt:
            blob = torch.load(ckpt, map_location="cpu", weights_only=True)
            stored = Vocabulary.from_dict(blob["vocabulary"]) if "vocabulary" in blob else None
            if stored is None:
                raise VocabularyMismatchError(f"ckpt_path={ckpt}: no vocabulary stored (not an lrcn_caption checkpoint)")
            if self.hparams.train and stored != datamodule.vocab:
                raise VocabularyMismatchError(
                    f"ckpt_path={ckpt}: its vocabulary differs from the one built from the data "
                    f"({stored.difference(datamodule.vocab)}); word ids would not line up. Evaluate it with "
                    "train=false, or train without ckpt_path")
            self.load_weights(ckpt)
            if stored != datamodule.vocab:
                log.warning("lrcn: evaluating with the checkpoint's vocabulary (%s)", stored.difference(datamodule.vocab))
        else:
            self.build(datamodule.vocab)
        feats = {s: self.extract(datamodule, s, cache=True) for s in ("train", "val", "test")} if self.frozen else {}
        metrics: dict[str, float] = {f"data/{k}": float(v) for k, v in _flat(datamodule.summary).items()}
        t0 = time.perf_counter()
        if self.hparams.train:
            train_loader = datamodule.pair_loader("train", feats.get("train"), shuffle=True)
            val_loader = datamodule.pair_loader("val", feats.get("val")) if datamodule.val_pairs else None
            trainer.fit(self, train_dataloaders=train_loader, val_dataloaders=val_loader, weights_only=True)
            cb = trainer.checkpoint_callback
            if cb is not None and cb.best_model_path:
                self.load_weights(cb.best_model_path)
                metrics["test_checkpoint"] = cb.best_model_path  # type: ignore[assignment]
        metrics["lrcn/train_seconds"] = time.perf_counter() - t0
        self.eval()
        test_feats = feats["test"] if self.frozen else self.extract(datamodule, "test", cache=False)
        metrics.update(self.evaluate(datamodule, test_feats, output_dir, trainer))
        return metrics

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, features: torch.Tensor, spec: dict, batch: int = 256) -> tuple[list[str], float]:
        """Captions for every feature row with one decoder, and captions/s."""
        gen = torch.Generator().manual_seed(int(self.hparams.seed))
        out = []
        t0 = time.perf_counter()
        per = max(1, batch // max(int(spec["width"]), int(spec["n"]) if spec["method"] == "sample" else 1))
        for i in range(0, len(features), per):
            d = self.decoder.decode(features[i : i + per].to(self.device), method=spec["method"],
                                    width=int(spec["width"]), n=int(spec["n"]),
                                    inverse_temperature=float(spec["inverse_temperature"]),
                                    max_len=int(self.hparams.max_len), generator=gen)
            out += [self.vocab.decode(row) for row in d.tokens.tolist()]
        seconds = time.perf_counter() - t0
        return out, len(features) / max(seconds, 1e-9)

    @torch.no_grad()
    def score_matrix(self, features: torch.Tensor, captions: list[list[int]]) -> np.ndarray:
        """captions x images length-normalised log p(caption | image)."""
        from datamodules.coco_captions import pad_captions

        _, tokens, _ = pad_captions([(torch.zeros(1), torch.tensor(c, dtype=torch.long), 0) for c in captions],
                                    self.vocab)
        M, N = len(captions), len(features)
        per = max(1, int(self.retrieval_cfg["rows_per_batch"]) // max(M, 1))
        scores = np.zeros((M, N), dtype=np.float64)
        for j in range(0, N, per):
            f = features[j : j + per]
            b = len(f)
            s = self.decoder.sequence_logprob(f.repeat_interleave(M, 0), tokens.repeat(b, 1), normalise=True)
            scores[:, j : j + b] = s.view(b, M).T.cpu().numpy()
        return scores

    def evaluate(self, datamodule, features: torch.Tensor, output_dir: Path, trainer=None) -> dict[str, float]:
        from transferrable.atomic import atomic_write_json
        from transferrable.caption_eval import MeteorSession, java_available

        refs = datamodule.references("test")
        java, meteor = self.metrics_cfg["java"], self.metrics_cfg["meteor"]
        out: dict[str, float] = {}
        generated: dict[str, list[str]] = {}
        per_decoder: dict[str, dict] = {}
        session = MeteorSession() if meteor != "none" and java_available(java) else None
        try:
            self._decode_all(features, refs, session, generated, per_decoder, out)
        finally:
            if session is not None:
                session.close()
        # baseline: the most frequent training caption for every image
        freq = Counter(c for im in datamodule.splits["train"] for c in im.captions).most_common(1)[0][0]
        base = caption_metrics(refs, dict.fromkeys(refs, freq), java=java, meteor=False)
        for key in ("BLEU-4", "CIDEr-D", "ROUGE-L"):
            out[f"test/baseline_frequent/{key}"] = base[key]
        out.update(self.retrieval(features, refs))
        main = self.decoders[0]["name"]
        atomic_write_json(output_dir / "captions.json", {
            "decoders": generated, "references": {str(k): v for k, v in refs.items()},
            "images": [im.path for im in datamodule.splits["test"]], "baseline_frequent": freq})
        tables = self.tables(per_decoder, {k[len("test/"):]: v for k, v in out.items() if "_to_" in k}, base)
        atomic_write_json(output_dir / "tables.json", tables)
        png = self.draw(datamodule, generated[main], output_dir / "captions.png")
        if trainer is not None:
            self.log_to_wandb(trainer, datamodule, generated[main], png, out)
        return out

    def _decode_all(self, features, refs, session, generated: dict, per_decoder: dict, out: dict) -> None:
        java, meteor = self.metrics_cfg["java"], self.metrics_cfg["meteor"]
        for k, spec in enumerate(self.decoders):
            caps, rate = self.generate(features, spec)
            generated[spec["name"]] = caps
            m = caption_metrics(refs, dict(enumerate(caps)), java=java, meteor_scorer=session,
                                meteor=meteor == "all" or (meteor == "main" and k == 0))
            m["captions_per_second"] = rate
            per_decoder[spec["name"]] = m
            for key, v in m.items():
                out[f"test/{spec['name']}/{key}"] = v
            if k == 0:
                for key, v in m.items():
                    out[f"test/{key}"] = v
            log.info("lrcn %s: CIDEr-D %.3f BLEU-4 %.3f (%.0f captions/s)", spec["name"], m["CIDEr-D"], m["BLEU-4"], rate)

    def retrieval(self, features: torch.Tensor, refs: dict) -> dict[str, float]:
        """R@K / median rank both ways on the first ``lrcn.retrieval.images`` test images and their captions."""
        n = min(int(self.retrieval_cfg["images"]), len(features))
        caps, owner = [], []
        for i in range(n):
            for c in refs[i]:
                ids = self.vocab.encode(c)
                if ids:
                    caps.append(ids)
                    owner.append(i)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.use_bf16):
            ret = retrieval_metrics(self.score_matrix(features[:n], caps), owner)
        out = {f"test/{k}": v for k, v in ret.items()}
        out["retrieval/seconds"] = time.perf_counter() - t0
        out["retrieval/images"], out["retrieval/captions"] = float(n), float(len(caps))
        return out

    def label(self) -> str:
        h = self.hparams
        freeze = "frozen" if self.frozen else "fine-tuned"
        extra = "" if h.image_input == "every_step" else f", image {h.image_input}"
        return f"{h.unit.upper()} {h.variant} ({freeze}{extra})"

    def tables(self, per_decoder: dict, ret: dict, base: dict) -> list[dict]:
        main = self.decoders[0]["name"]
        r = [[ret[f"caption_to_image/R@{k}"]] for k in (1, 5, 10)] + [[ret["caption_to_image/median_rank"]]]
        r += [[ret[f"image_to_caption/R@{k}"]] for k in (1, 5, 10)] + [[ret["image_to_caption/median_rank"]]]
        cols = ["cap->img R@1", "R@5", "R@10", "Medr", "img->cap R@1", "R@5", "R@10", "Medr"]
        gen_cols = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"]

        def row(m):
            return [None if m.get(c) is None or not math.isfinite(m[c]) else [100 * m[c]] for c in gen_cols]

        tables = [
            {"title": "Retrieval (Table 4.5 layout): R@K in %, median rank; length-normalised log-likelihood",
             "corner": "model", "columns": cols, "rows": [{"label": self.label(), "cells": r}], "merge_runs": True},
            {"title": f"Generation (Table 4.6 layout), decoder {main}; scores x100",
             "corner": "model", "columns": gen_cols, "rows": [{"label": self.label(), "cells": row(per_decoder[main])}],
             "merge_runs": True},
        ]
        if len(per_decoder) > 1:
            rows = [{"label": name, "cells": [*row(m), [m["captions_per_second"]]]} for name, m in per_decoder.items()]
            rows.append({"label": "most frequent training caption", "cells": [*row(base), None]})
            tables.append({"title": f"Decoding strategies on {self.label()}; scores x100, captions/s",
                           "corner": "decoder", "columns": [*gen_cols, "captions/s"], "rows": rows})
        return tables

    def draw(self, datamodule, captions: list[str], path: Path) -> Path | None:
        k = min(int(self.hparams.show_images), len(captions))
        if k == 0:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from datamodules.base import read_image

        cols = min(4, k)
        rows = math.ceil(k / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for i in range(k):
            im = datamodule.splits["test"][i]
            ax = axes.ravel()[i]
            ax.imshow(read_image(im.path))
            ax.set_title(_wrap("ours: " + captions[i]) + "\n" + _wrap("ref: " + im.captions[0]), fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path

    def log_to_wandb(self, trainer, datamodule, captions: list[str], png: Path | None, metrics: dict) -> None:
        from lightning.pytorch.loggers import WandbLogger

        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(float(v))}
        for lg in trainer.loggers:
            lg.log_metrics(numeric)
            if isinstance(lg, WandbLogger):
                import wandb

                k = min(int(self.hparams.show_images), len(captions))
                data = [[wandb.Image(datamodule.splits["test"][i].path), captions[i],
                         " | ".join(datamodule.splits["test"][i].captions)] for i in range(k)]
                lg.log_table(key="lrcn/captions", columns=["image", "generated", "references"], data=data)
                if png is not None:
                    lg.log_image(key="lrcn/captions_png", images=[str(png)])
            lg.save()


def _wrap(text: str, width: int = 48) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
