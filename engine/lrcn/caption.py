"""task=lrcn_caption: LRCN image captioning (thesis 4.4), from the vocabulary to the tables.

1. vocabulary from the training captions; a checkpoint (``ckpt_path``) carries its own: ``train=false`` evaluates
   with it, resuming training on data whose vocabulary differs is refused up front (``VocabularyMismatchError``);
2. image features: with ``backbone.freeze=all`` the tap (``lrcn.tap``, fc6/fc7) is extracted once per image and
   cached (``transferrable/core/feature_cache.py``), so a sweep over decoders trains on cached rows; otherwise the CNN
   is fine-tuned through the captioning loss (``lightning_modules/lrcn_caption.py``);
3. fit the decoder (gradient clipping from the trainer); the checkpoint with the lowest ``val/loss`` is evaluated;
4. test: every decoder of ``lrcn.decoders`` (greedy, beam k, sampling N at inverse temperature T; the first is the
   headline) -> BLEU-1..4 / METEOR / ROUGE-L / CIDEr-D (``transferrable/metrics/caption_eval.py``), the "most frequent
   training caption" baseline, retrieval in both directions on ``lrcn.retrieval.images`` test images (R@1/5/10,
   median rank; length-normalised log-likelihood), captions/s per decoder;
5. ``captions.json`` (every decoder's captions), ``tables.json`` (Table 4.5 / 4.6 / decoding layouts, merged across
   the runs of a sweep by ``eval.py report=``), ``captions.png`` (a few test images with their captions; also a W&B
   table when W&B is the logger), from ``engine/lrcn/caption_report.py``.

Under DDP (``hardware=ddp_cpu``, ``trainer.devices=N``) the fit is sharded by Lightning and every rank validates the
whole val split (the checkpoint's ``val/loss`` is the one-process value on each rank); the generated scenes and the
feature cache are written before the first trainer call, i.e. by rank 0 alone (Lightning starts the other ranks
there; they find both complete). After the fit every rank decodes and scores the whole test split with the same
checkpoint and the same seeded generator (deterministic, so identical on every rank and equal to one process
evaluating that checkpoint, with no collective that could hang); only rank 0 writes the files.

Bad input never stops the evaluation after training: images without references are left out of the metrics
(counted), METEOR without Java is NaN with a warning, empty generated captions score as empty.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from datamodules.coco_captions import pad_captions
from engine.lrcn.caption_report import caption_model_label, caption_tables, draw_captions, log_captions
from transferrable.core.atomic import atomic_write_json
from transferrable.core.distributed import output_dir_of, rank_aware, whole_split_loader
from transferrable.core.errors import ConfigError
from transferrable.core.feature_cache import CACHE_VERSION, FeatureCache, state_sha256
from transferrable.core.precision import inference_bf16
from transferrable.core.progress import progress, trainer_bars
from transferrable.core.vocabulary import Vocabulary, VocabularyMismatchError
from transferrable.metrics.caption_eval import (
    MeteorSession,
    caption_metrics,
    java_available,
    retrieval_metrics,
)

log = logging.getLogger(__name__)


@rank_aware
def run(cfg: DictConfig, trainer, datamodule, model) -> dict:
    lrcn = cfg.lrcn
    decoders, metrics_cfg = parse_decoders(lrcn.decoders), metric_settings(lrcn)  # bad values fail before any work
    use_bf16 = inference_bf16(lrcn.bf16, trainer.precision)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    datamodule.setup("fit")
    build_with_vocabulary(model, datamodule, cfg.get("ckpt_path"), bool(cfg.get("train", True)))
    features = FeatureExtractor(model, datamodule, use_bf16, cfg.paths.get("cache_dir"), bool(lrcn.feature_cache),
                                trainer_bars(trainer))
    feats = {s: features(s, cache=True) for s in ("train", "val", "test")} if model.frozen else {}
    metrics: dict[str, float] = {f"data/{k}": float(v) for k, v in _flat(datamodule.summary).items()}
    t0 = time.perf_counter()
    if cfg.get("train", True):
        train_loader = datamodule.pair_loader("train", feats.get("train"), shuffle=True)
        val_loader = (whole_split_loader(datamodule.pair_loader("val", feats.get("val")), trainer.world_size)
                      if datamodule.val_pairs else None)
        trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=val_loader, weights_only=True)
        cb = trainer.checkpoint_callback
        if cb is not None and cb.best_model_path:
            model.load_weights(cb.best_model_path)
            metrics["test_checkpoint"] = cb.best_model_path  # type: ignore[assignment]
    metrics["lrcn/train_seconds"] = time.perf_counter() - t0
    model.eval()
    test_feats = feats["test"] if model.frozen else features("test", cache=False)
    metrics.update(evaluate(cfg, model, datamodule, test_feats, decoders, metrics_cfg, output_dir, use_bf16, trainer))
    return metrics


def build_with_vocabulary(model, datamodule, ckpt: str | None, train: bool) -> None:
    """The decoder for the data's vocabulary, or a checkpoint's weights with the checkpoint's vocabulary."""
    if not ckpt:
        model.build(datamodule.vocab)
        return
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    stored = Vocabulary.from_dict(blob["vocabulary"]) if "vocabulary" in blob else None
    if stored is None:
        raise VocabularyMismatchError(f"ckpt_path={ckpt}: no vocabulary stored (not an lrcn_caption checkpoint)")
    if train and stored != datamodule.vocab:
        raise VocabularyMismatchError(
            f"ckpt_path={ckpt}: its vocabulary differs from the one built from the data "
            f"({stored.difference(datamodule.vocab)}); word ids would not line up. Evaluate it with "
            "train=false, or train without ckpt_path")
    model.load_weights(ckpt)
    if stored != datamodule.vocab:
        log.warning("lrcn: evaluating with the checkpoint's vocabulary (%s)", stored.difference(datamodule.vocab))


class FeatureExtractor:
    """The tap's rows of every image of a split; cached (keyed by data, tap, weights and precision) on request."""

    def __init__(self, model, datamodule, use_bf16: bool, cache_dir: str | None, enabled: bool, bars: bool = False):
        self.model, self.datamodule, self.use_bf16, self.bars = model, datamodule, use_bf16, bars
        self.cache = FeatureCache(Path(cache_dir or ".") / "features", enabled=bool(enabled and cache_dir))
        self._state_sha: str | None = None

    def key(self, split: str) -> dict:
        backbone = self.model.backbone
        if self._state_sha is None:
            self._state_sha = state_sha256(backbone)
        # the state hash names the weights; shapes in it and the input size pin the architecture
        arch = {"arch": backbone.arch, "input_size": backbone.input_size}
        return {"version": CACHE_VERSION, "task": "lrcn_caption", "data": self.datamodule.dataset_key(),
                "split": split, "n": len(self.datamodule.splits[split]), "tap": self.model.cfg["tap"],
                "backbone": arch, "weights_sha256": self._state_sha, "bf16": self.use_bf16}

    @torch.no_grad()
    def compute(self, split: str) -> np.ndarray:
        model, backbone = self.model, self.model.backbone
        was = backbone.training
        backbone.eval()
        rows = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.use_bf16):
            for x, _ in progress(self.datamodule.image_loader(split), f"lrcn_caption: features ({split})",
                             enabled=self.bars, unit="batch"):
                rows.append(model.image_features(x.to(model.device)).float().cpu().numpy())
        backbone.train(was)
        return np.concatenate(rows).astype(np.float32)

    def __call__(self, split: str, cache: bool) -> torch.Tensor:
        if not cache:
            return torch.from_numpy(self.compute(split))
        arr, _ = self.cache.get_or_compute(f"lrcn-{self.model.cfg['tap']}-{split}", self.key(split),
                                           lambda: self.compute(split))
        return torch.from_numpy(arr)


# -- decoders ---------------------------------------------------------------------------------------------------------
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
    for s in _plain(specs) or ["beam1"]:
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


@torch.no_grad()
def generate(model, features: torch.Tensor, spec: dict, max_len: int, seed: int,
             batch: int = 256) -> tuple[list[str], float]:
    """Captions for every feature row with one decoder, and captions/s."""
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    t0 = time.perf_counter()
    per = max(1, batch // max(int(spec["width"]), int(spec["n"]) if spec["method"] == "sample" else 1))
    for i in range(0, len(features), per):
        d = model.decoder.decode(features[i : i + per].to(model.device), method=spec["method"],
                                 width=int(spec["width"]), n=int(spec["n"]),
                                 inverse_temperature=float(spec["inverse_temperature"]), max_len=int(max_len),
                                 generator=gen)
        out += [model.vocab.decode(row) for row in d.tokens.tolist()]
    seconds = time.perf_counter() - t0
    return out, len(features) / max(seconds, 1e-9)


# -- evaluation -------------------------------------------------------------------------------------------------------
def metric_settings(lrcn: DictConfig) -> dict:
    """``lrcn.metrics``: ``java`` (auto | false) and which decoders get METEOR (all | main | none)."""
    metrics_cfg = dict(_plain(lrcn.metrics))
    if metrics_cfg["meteor"] not in ("all", "main", "none"):
        raise ConfigError(f"lrcn.metrics.meteor={metrics_cfg['meteor']!r}: expected all, main or none")
    return metrics_cfg


def evaluate(cfg: DictConfig, model, datamodule, features: torch.Tensor, decoders: list[dict], metrics_cfg: dict,
             output_dir: Path, use_bf16: bool, trainer=None) -> dict[str, float]:
    """Every decoder's captions and metrics, the frequent-caption baseline, retrieval, then the output files."""
    lrcn = cfg.lrcn
    refs = datamodule.references("test")
    java, meteor = metrics_cfg["java"], metrics_cfg["meteor"]
    out: dict[str, float] = {}
    generated: dict[str, list[str]] = {}
    per_decoder: dict[str, dict] = {}
    session = MeteorSession() if meteor != "none" and java_available(java) else None
    try:
        for k, spec in enumerate(decoders):
            caps, rate = generate(model, features, spec, lrcn.max_len, cfg.seed)
            generated[spec["name"]] = caps
            m = caption_metrics(refs, dict(enumerate(caps)), java=java, meteor_scorer=session,
                                meteor=meteor == "all" or (meteor == "main" and k == 0))
            m["captions_per_second"] = rate
            per_decoder[spec["name"]] = m
            out.update({f"test/{spec['name']}/{key}": v for key, v in m.items()})
            if k == 0:
                out.update({f"test/{key}": v for key, v in m.items()})
            log.info("lrcn %s: CIDEr-D %.3f BLEU-4 %.3f (%.0f captions/s)", spec["name"], m["CIDEr-D"], m["BLEU-4"], rate)
    finally:
        if session is not None:
            session.close()
    # baseline: the most frequent training caption for every image
    freq = Counter(c for im in datamodule.splits["train"] for c in im.captions).most_common(1)[0][0]
    base = caption_metrics(refs, dict.fromkeys(refs, freq), java=java, meteor=False)
    for key in ("BLEU-4", "CIDEr-D", "ROUGE-L"):
        out[f"test/baseline_frequent/{key}"] = base[key]
    out.update(retrieval(model, features, refs, lrcn.retrieval, use_bf16))
    with output_dir_of(trainer, output_dir) if trainer is not None else contextlib.nullcontext(output_dir) as where:
        write_outputs(lrcn, model, datamodule, generated, per_decoder, base, freq, out, where, trainer)
    return out


def write_outputs(lrcn, model, datamodule, generated: dict, per_decoder: dict, base: dict, freq: str, out: dict,
                  output_dir: Path, trainer) -> None:
    """``captions.json``, ``tables.json``, ``captions.png`` and the loggers' copies."""
    refs = datamodule.references("test")
    test = datamodule.splits["test"]
    atomic_write_json(output_dir / "captions.json", {
        "decoders": generated, "references": {str(k): v for k, v in refs.items()},
        "images": [im.path for im in test], "baseline_frequent": freq})
    label = caption_model_label(model.cfg["unit"], model.cfg["variant"], model.frozen, model.cfg["image_input"])
    ret = {k[len("test/"):]: v for k, v in out.items() if "_to_" in k}
    atomic_write_json(output_dir / "tables.json", caption_tables(label, per_decoder, ret, base))
    main = next(iter(generated))
    shown = [test[i] for i in range(min(int(lrcn.show_images), len(generated[main])))]
    png = draw_captions(shown, generated[main], output_dir / "captions.png")
    if trainer is not None:
        log_captions(trainer, shown, generated[main], png, out)


@torch.no_grad()
def score_matrix(model, features: torch.Tensor, captions: list[list[int]], rows_per_batch: int) -> np.ndarray:
    """captions x images length-normalised log p(caption | image)."""
    _, tokens, _ = pad_captions([(torch.zeros(1), torch.tensor(c, dtype=torch.long), 0) for c in captions],
                                model.vocab)
    M, N = len(captions), len(features)
    per = max(1, int(rows_per_batch) // max(M, 1))
    scores = np.zeros((M, N), dtype=np.float64)
    for j in range(0, N, per):
        f = features[j : j + per]
        b = len(f)
        s = model.decoder.sequence_logprob(f.repeat_interleave(M, 0), tokens.repeat(b, 1), normalise=True)
        scores[:, j : j + b] = s.view(b, M).T.cpu().numpy()
    return scores


def retrieval(model, features: torch.Tensor, refs: dict, retrieval_cfg, use_bf16: bool) -> dict[str, float]:
    """R@K / median rank both ways on the first ``lrcn.retrieval.images`` test images and their captions."""
    n = min(int(retrieval_cfg["images"]), len(features))
    caps, owner = [], []
    for i in range(n):
        for c in refs[i]:
            ids = model.vocab.encode(c)
            if ids:
                caps.append(ids)
                owner.append(i)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
        ret = retrieval_metrics(score_matrix(model, features[:n], caps, retrieval_cfg["rows_per_batch"]), owner)
    out = {f"test/{k}": v for k, v in ret.items()}
    out["retrieval/seconds"] = time.perf_counter() - t0
    out["retrieval/images"], out["retrieval/captions"] = float(n), float(len(caps))
    return out


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
