"""task=decaf: DeCAF (thesis ch. 2) -- frozen activations of a pretrained network + linear classifiers.

``DecafModule.run_task`` (called by ``transferrable.runner.train`` instead of fit/test) does:

1. **Pool** the dataset's images: ``pool: all`` joins the DataModule's train+val+test and draws the protocol's
   splits from it (Caltech-101 style); ``pool: given`` draws the N training samples per class from
   train+val and tests on the DataModule's test split. Every image goes through the *evaluation* transform
   (resize to ``input_size``, normalise; no augmentation). The pool is put in a canonical order (by label,
   then image content), so its features do not depend on the DataModule's seed; ``max_images`` keeps at
   most ``ceil(max_images / num_classes)`` images per class, for quick runs.
2. **Extract** each entry of ``features`` once with ``trainer.predict`` (frozen backbone in eval mode, under
   ``torch.inference_mode``; ``channels_last`` and bf16 autocast are switches) and cache it on disk
   (``transferrable.feature_cache``; ``${paths.cache_dir}/features``). A feature is

   * a backbone tap: ``pool5``, ``fc6``, ``fc7`` (= DeCAF5/6/7), or any other tap (``conv3``, ...), flattened;
   * ``random:<tap>``: the same tap of the same architecture with random weights (seeded by
     ``random_seed``; thesis footnote 3) -- identical to running with ``backbone.weights=null``;
   * ``raw``: the normalised input pixels (one channel for grayscale datasets);
   * ``hog``: scikit-image HOG of the grayscale input (``hog`` parameters).
3. **Protocol**: for each of ``splits`` split seeds (``split_seed + k``, recorded), ``N`` training images
   per class are drawn at random and the rest of the pool is the test set. Each classifier of
   ``classifiers`` (``logreg``, ``svm``, ``logreg_dropout``, ``svm_dropout``; see
   ``models.linear_classifiers``) has its C chosen on a ``val_fraction`` validation subsplit of the N
   (thesis: 25/5 of 30) and is refit on all N. Metric: mean per-class accuracy, mean and std over splits.
   ``shots: [1, 2, 3, 5, 10, 20, 30]`` gives the few-shot curve: the same splits' first N images per class
   (nested), with C cross-validated at the largest N and kept fixed for the smaller ones (the thesis's
   "fixed parameters"; ``cv_at: each`` re-validates at every N that allows it).

Outputs (in the run directory): ``metrics.json`` (via the runner) with ``test/<feature>/<classifier>/
mean_class_acc`` (+ ``_std``, at the largest N), ``test/<feature>/<classifier>/n<N>/mean_class_acc`` for a
curve, ``val/...`` (validation accuracy of the chosen C) and the headline ``test/mean_class_acc`` of the
``main`` combination (``best_val``: the one with the best validation accuracy, as the thesis bolds it);
``decaf_results.json`` (every split's accuracy and chosen C); ``tables.json`` + ``decaf_tables.md``
(Figure 2.3-left shape: classifier x feature; the few-shot table: method x N), which
``python eval.py report=<dir>`` prints too; ``fewshot.png`` for a curve; ``tsne.png`` (``decaf.tsne``, Figure
2.1): t-SNE panels side by side -- default ``[conv1, fc6]``, i.e. the first pooling layer's output (the thesis's
DeCAF1) vs DeCAF6 -- of at most ``max_points`` held-out images (the ``pool: given`` test split, else the first
split's test images), coloured by class, with ``tsne/silhouette_<panel>`` in the metrics. A panel that is not a
classifier feature (conv1 by default) is extracted, and cached, for the plotted images only. Metrics, the
plots and the tables are also logged to every attached logger (W&B: images + tables).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader

from datamodules.base import DatasetError, ImageDataset, build_transform, subset
from models.backbones import TapBackbone, UnknownTapError
from models.linear_classifiers import (
    ClassifierSpec,
    FeatureDropout,
    fit_cross_validated,
    mean_class_accuracy,
)
from transferrable.errors import ConfigError
from transferrable.precision import inference_bf16

log = logging.getLogger(__name__)

BASELINES = ("raw", "hog")
RANDOM_PREFIX = "random:"
HOG_DEFAULTS = {"orientations": 9, "pixels_per_cell": 4, "cells_per_block": 2}
FEATURE_LABELS = {"pool5": "DeCAF5", "fc6": "DeCAF6", "fc7": "DeCAF7", "raw": "raw pixels", "hog": "HOG"}


def plain(value):
    """OmegaConf containers -> plain Python (lists/dicts); everything else unchanged."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


TSNE_DEFAULTS = {"enabled": False, "panels": ["conv1", "fc6"], "max_points": 1000, "seed": 0,
                 "max_iter": 1000, "perplexity": 30.0}


def parse_tsne(cfg) -> dict:
    """``decaf.tsne`` with defaults filled in; ``None``/``False`` disables it, ``True`` enables the defaults."""
    if cfg is None or cfg is False:
        return dict(TSNE_DEFAULTS)
    if cfg is True:
        return {**TSNE_DEFAULTS, "enabled": True}
    cfg = plain(cfg)
    unknown = set(cfg) - set(TSNE_DEFAULTS)
    if unknown:
        raise ConfigError(f"decaf.tsne: unknown key(s) {sorted(unknown)}; expected {sorted(TSNE_DEFAULTS)}")
    out = {**TSNE_DEFAULTS, **cfg}
    out["enabled"] = bool(out["enabled"])
    out["panels"] = [str(p) for p in (out["panels"] or [])]
    if out["enabled"] and not out["panels"]:
        raise ConfigError("decaf.tsne.panels: name at least one feature (e.g. [conv1, fc6])")
    if out["max_points"] is not None and int(out["max_points"]) < 2:
        raise ConfigError(f"decaf.tsne.max_points={out['max_points']}: expected >= 2 (or null for every held-out image)")
    return out


def feature_label(name: str) -> str:
    if name.startswith(RANDOM_PREFIX):
        return f"{FEATURE_LABELS.get(name[len(RANDOM_PREFIX):], name[len(RANDOM_PREFIX):])} (random weights)"
    return FEATURE_LABELS.get(name, name)


# -- the image pool -----------------------------------------------------------------------------
@dataclass
class Pool:
    """Images of one dataset in canonical order; ``part`` is 0 (training candidates) or 1 (fixed test set)."""

    name: str
    images: Any
    labels: np.ndarray
    part: np.ndarray
    class_names: list[str]
    key: dict
    transform: Any = field(repr=False, default=None)
    gray: bool = False

    def __len__(self) -> int:
        return len(self.labels)


def _item_digest(item) -> bytes:
    if isinstance(item, str | Path):
        st = os.stat(item)
        return hashlib.sha1(f"{item}|{st.st_size}|{st.st_mtime_ns}".encode()).digest()
    arr = np.ascontiguousarray(item)
    return hashlib.sha1(f"{arr.shape}|{arr.dtype}|".encode() + arr.tobytes()).digest()


def build_pool(datamodule, pool: str = "all", max_images: int | None = None) -> Pool:
    """The DataModule's images as one pool (see the module docstring), with the dataset part of the cache key."""
    if pool not in ("all", "given"):
        raise ConfigError(f"decaf.pool={pool!r}: expected 'all' (train+val+test, split by the protocol) or 'given'")
    datamodule.setup()
    names = list(datamodule.class_names)
    parts = [("train", 0), ("val", 0), ("test", 0 if pool == "all" else 1)]
    chunks = [(datamodule.splits[s].images, datamodule.splits[s].labels, p) for s, p in parts if s in datamodule.splits]
    if all(isinstance(x, np.ndarray) for x, _, _ in chunks):
        images = np.concatenate([x for x, _, _ in chunks])
    else:
        images = [i for x, _, _ in chunks for i in (x if not isinstance(x, np.ndarray) else list(x))]
    labels = np.concatenate([np.asarray(y, dtype=np.int64) for _, y, _ in chunks])
    part = np.concatenate([np.full(len(y), p, dtype=np.int8) for _, y, p in chunks])

    digests = [_item_digest(images[i]) for i in range(len(labels))]
    order = sorted(range(len(labels)), key=lambda i: (int(part[i]), int(labels[i]), digests[i]))
    if max_images:
        cap = math.ceil(int(max_images) / max(len(names), 1))
        seen: dict[tuple[int, int], int] = {}
        kept = []
        for i in order:
            k = (int(part[i]), int(labels[i]))
            if seen.get(k, 0) < cap:
                seen[k] = seen.get(k, 0) + 1
                kept.append(i)
        order = kept
    idx = np.asarray(order, dtype=np.int64)
    images, labels, part = subset(images, idx), labels[idx], part[idx]
    h = hashlib.sha256()
    for i in idx:
        h.update(digests[i])
    h.update(labels.tobytes() + part.tobytes())

    size, mean, std = int(datamodule.input_size), list(datamodule.mean), list(datamodule.std)
    gray = isinstance(images, np.ndarray) and images.ndim == 3
    cls = type(datamodule)
    key = {
        "datamodule": f"{cls.__module__}.{cls.__qualname__}",
        "name": getattr(datamodule, "name", cls.__name__),
        "pool": pool,
        "max_images": max_images,
        "n": int(len(labels)),
        "content_sha256": h.hexdigest(),
        "transform": {"resize": size, "mean": mean, "std": std},
    }
    return Pool(getattr(datamodule, "name", cls.__name__), images, labels, part, names, key,
                build_transform(size, mean, std, "none"), gray)


def subset_pool(pool: Pool, rows: np.ndarray) -> Pool:
    """The pool's ``rows`` as a pool of their own, with a cache key of its own (dataset key + the rows)."""
    rows = np.asarray(rows, dtype=np.int64)
    key = {**pool.key, "n": int(len(rows)), "rows_sha256": hashlib.sha256(rows.tobytes()).hexdigest()}
    return Pool(pool.name, subset(pool.images, rows), pool.labels[rows], pool.part[rows], pool.class_names, key,
                pool.transform, pool.gray)


def check_pool(pool: Pool, n_train: int, what: str = "decaf.train_per_class") -> None:
    """One-line DatasetErrors for a pool the protocol cannot use: one class, or N >= a class's size."""
    train_labels = pool.labels[pool.part == 0]
    present = np.unique(pool.labels)
    if len(present) < 2:
        only = pool.class_names[present[0]] if len(present) else "-"
        raise DatasetError(
            f"dataset '{pool.name}' has a single class ('{only}', {len(pool)} images): a classifier needs at least 2"
        )
    counts = np.bincount(train_labels, minlength=len(pool.class_names))
    counts = np.where(np.isin(np.arange(len(counts)), present), counts, np.iinfo(np.int64).max)
    smallest = int(np.argmin(counts))
    given = bool((pool.part == 1).any())
    need = n_train if given else n_train + 1
    if counts[smallest] < need:
        where = "in its train+val splits" if given else "in the pool (train+val+test)"
        raise DatasetError(
            f"{what}={n_train}: class '{pool.class_names[smallest]}' of dataset '{pool.name}' has only "
            f"{counts[smallest]} images {where}; every class needs "
            f"{'at least' if given else 'more than'} {n_train} (N to train, the rest to test)"
        )


def per_class_draw(labels: np.ndarray, candidates: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """``n`` random indices of each class among ``candidates`` (all of them when ``n`` is None), sorted.
    The draw for a smaller ``n`` with the same seed is a subset of the draw for a larger one."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels[candidates]):
        idx = rng.permutation(candidates[labels[candidates] == c])
        chosen.append(idx if n is None else idx[:n])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def protocol_split(pool: Pool, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: ``n`` per class from the training candidates, the rest (pool=all) or the
    given test split (pool=given) for test."""
    candidates = np.flatnonzero(pool.part == 0)
    train = per_class_draw(pool.labels, candidates, n, seed)
    if (pool.part == 1).any():
        test = np.flatnonzero(pool.part == 1)
    else:
        test = np.setdiff1d(np.arange(len(pool)), train)
    return train, test


# -- baseline features --------------------------------------------------------------------------
class DirectTransform:
    """A fixed albumentations pipeline (Resize / Normalize / ToTensorV2 only) run by calling each transform's
    ``apply`` in turn: the same output bit for bit, without Compose's per-call bookkeeping (shape checks,
    probability draws, parameter and target routing), which is over half of the per-image loading cost at
    DeCAF's small image sizes -- and loading is what kept extraction below the bare forward's speed."""

    FIXED = ("Resize", "Normalize", "ToTensorV2")

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    @classmethod
    def of(cls, transform):
        """The direct form of ``transform`` when it is such a pipeline that always applies, else ``transform``."""
        steps = getattr(transform, "transforms", None)
        if steps is None or getattr(transform, "p", 1.0) != 1.0:
            return transform
        if all(type(t).__name__ in cls.FIXED and getattr(t, "p", 1.0) == 1.0 for t in steps):
            return cls(steps)
        return transform

    def __call__(self, image: np.ndarray) -> dict:
        for t in self.transforms:
            image = t.apply(image)
        return {"image": image}


def raw_pixels(x: torch.Tensor, gray: bool) -> np.ndarray:
    x = x.float()
    if gray:
        x = x.mean(1)
    return x.flatten(1).cpu().numpy()


def hog_features(x: torch.Tensor, orientations: int = 9, pixels_per_cell: int = 4, cells_per_block: int = 2) -> np.ndarray:
    from skimage.feature import hog

    gray = x.float().mean(1).cpu().numpy()
    return np.stack([
        hog(img, orientations=orientations, pixels_per_cell=(pixels_per_cell,) * 2,
            cells_per_block=(cells_per_block,) * 2, block_norm="L2-Hys", feature_vector=True)
        for img in gray
    ]).astype(np.float32)


# -- the task -----------------------------------------------------------------------------------
class DecafModule(L.LightningModule):
    REQUIRES_DATA = ("images", "labels")  # checked against the dataset before any work (transferrable/compat.py)

    def __init__(
        self,
        backbone: TapBackbone,
        num_classes: int | None = None,
        features: Sequence[str] = ("fc6",),
        classifiers: Sequence[str] = ("logreg", "svm"),
        train_per_class: int = 30,
        shots: Sequence[int] | None = None,
        splits: int = 5,
        split_seed: int = 0,
        val_fraction: float = 1 / 6,
        C_grid: Sequence[float] = (0.1, 1.0, 10.0, 100.0, 1000.0),
        default_C: float = 1.0,
        cv_at: str = "largest",
        dropout_rate: float = 0.5,
        dropout_copies: int = 4,
        max_iter: int = 1000,
        pool: str = "all",
        max_images: int | None = None,
        main: str = "best_val",
        cache_dir: str | None = None,
        use_cache: bool = True,
        channels_last: bool = True,
        bf16: bool | None = None,
        hog: dict | None = None,
        backbone_cfg: DictConfig | dict | None = None,
        random_seed: int = 0,
        plot: bool = True,
        fit_threads: int | None = 1,
        tsne: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "backbone_cfg", "target"])
        # bf16 autocast of this task's own inference paths; null follows trainer.precision (run_task)
        self.use_bf16 = inference_bf16(bf16, None)
        self.backbone = backbone
        self.backbone_cfg = plain(backbone_cfg)
        self.features = [str(f) for f in plain(features)]
        try:
            self.specs = [ClassifierSpec.parse(str(c)) for c in plain(classifiers)]
        except ValueError as err:
            raise ConfigError(f"decaf.classifiers: {err}") from None
        if not self.features or not self.specs:
            raise ConfigError("decaf.features and decaf.classifiers must each name at least one entry")
        self.check_features(self.features)
        self.tsne = parse_tsne(tsne)
        if self.tsne["enabled"]:
            self.check_features(self.tsne["panels"], what="decaf.tsne.panels")
        shots = plain(shots)
        self.shots = sorted({int(s) for s in shots}) if shots else [int(train_per_class)]
        if self.shots[0] < 1:
            raise ConfigError(f"decaf.shots/train_per_class: {self.shots[0]} training samples per class; expected >= 1")
        self.split_seeds = [int(split_seed) + k for k in range(int(splits))]
        if not self.split_seeds:
            raise ConfigError("decaf.splits must be >= 1")
        self.C_grid = [float(c) for c in plain(C_grid)]
        if cv_at not in ("largest", "each"):
            raise ConfigError(f"decaf.cv_at={cv_at!r}: expected 'largest' or 'each'")
        self.dropout = FeatureDropout(float(dropout_rate), int(dropout_copies))
        self.hog_params = {**HOG_DEFAULTS, **(plain(hog) or {})}
        self.main = str(main)
        combos = [f"{f}/{s.name}" for f in self.features for s in self.specs]
        if self.main != "best_val" and type(self) is DecafModule and self.main not in combos:
            raise ConfigError(f"decaf.main={self.main!r}: expected best_val or one of {combos}")
        self.cache_dir = cache_dir
        self.random_backbone: TapBackbone | None = None
        self._wanted: list[str] = []
        self._gray = False
        self._reset_stats()
        backbone.requires_grad_(False)
        backbone.eval()

    # -- features -------------------------------------------------------------------------------
    def check_features(self, names: Sequence[str], what: str = "decaf.features") -> None:
        for name in names:
            if name in BASELINES:
                continue
            tap = name[len(RANDOM_PREFIX):] if name.startswith(RANDOM_PREFIX) else name
            if tap not in self.backbone.tap_names:
                raise UnknownTapError(
                    f"{what}: backbone '{self.backbone.arch}' has no tap '{tap}'; available taps: "
                    f"{list(self.backbone.tap_names)} (also: raw, hog, random:<tap>)"
                )

    def _backbone_arch_cfg(self) -> dict:
        cfg = dict(self.backbone_cfg or {"arch": self.backbone.arch})
        return {k: v for k, v in cfg.items() if k not in ("weights", "freeze", "norm_eval")}

    def _weights_spec(self) -> str:
        from models.weights import is_hub_spec

        spec = (self.backbone_cfg or {}).get("weights")
        if spec is None:
            return f"random:{self.hparams.random_seed}"
        if is_hub_spec(spec):
            return str(spec)
        if Path(str(spec)).is_file():
            from transferrable.manifest import file_sha256

            return f"sha256:{file_sha256(spec)}"
        return str(spec)

    def feature_key(self, name: str, pool: Pool) -> dict:
        from transferrable.feature_cache import CACHE_VERSION, state_sha256

        key: dict[str, Any] = {"version": CACHE_VERSION, "dataset": pool.key}
        if name == "raw":
            key.update(feature="raw", params={"gray": pool.gray})
        elif name == "hog":
            key.update(feature="hog", params=dict(self.hog_params))
        else:  # identified by tap + weights, so random:fc6 and fc6 with backbone.weights=null share an entry
            rand = name.startswith(RANDOM_PREFIX)
            net = self._random_backbone() if rand else self.backbone
            if not hasattr(self, "_state_hashes"):
                self._state_hashes: dict[int, str] = {}
            if id(net) not in self._state_hashes:
                self._state_hashes[id(net)] = state_sha256(net)
            key.update(
                tap=name[len(RANDOM_PREFIX):] if rand else name,
                weights={"spec": f"random:{self.hparams.random_seed}" if rand else self._weights_spec(),
                         "state_sha256": self._state_hashes[id(net)]},
                backbone=self._backbone_arch_cfg(),
                bf16=self.use_bf16,
            )
        return key

    def _random_backbone(self) -> TapBackbone:
        """The same architecture with random weights, built as ``backbone.weights=null`` with ``seed`` would be."""
        if self.random_backbone is None:
            if not self.backbone_cfg or "_target_" not in self.backbone_cfg:
                raise ConfigError("random:<tap> features need model.backbone_cfg (the backbone's config) to rebuild it")
            from hydra.utils import instantiate

            cfg = {**self.backbone_cfg, "weights": None, "freeze": "all"}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self.hparams.random_seed))
                net = instantiate(cfg)
            net.requires_grad_(False)
            net.eval()
            if self.hparams.channels_last:
                net.to(memory_format=torch.channels_last)
            self.random_backbone = net.to(self.device)
        return self.random_backbone

    def predict_step(self, batch, batch_idx: int = 0) -> dict[str, np.ndarray]:
        x = batch[0]
        out: dict[str, np.ndarray] = {}
        nets = [(self.backbone, "", [n for n in self._wanted if n not in BASELINES and not n.startswith(RANDOM_PREFIX)])]
        if self.random_backbone is not None:
            nets.append((self.random_backbone, RANDOM_PREFIX,
                         [n[len(RANDOM_PREFIX):] for n in self._wanted if n.startswith(RANDOM_PREFIX)]))
        with torch.inference_mode():
            xin = x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                for net, prefix, taps in nets:
                    if taps:
                        for tap, act in net.forward_taps(xin, taps).items():
                            out[prefix + tap] = act.flatten(1).float().cpu().numpy()
            if "raw" in self._wanted:
                out["raw"] = raw_pixels(x, self._gray)
            if "hog" in self._wanted:
                out["hog"] = hog_features(x, **self.hog_params)
        return out

    def extract(self, trainer: L.Trainer, pool: Pool, names: Sequence[str], batch_size: int = 256,
                num_workers: int = 0) -> dict[str, np.ndarray]:
        """Every feature in ``names`` for every pool image (rows in pool order), from the cache or one
        ``trainer.predict`` pass over the pool for all the missing ones."""
        from transferrable.feature_cache import FeatureCache

        cache = self._cache()
        out, keys = {}, {}
        for name in names:
            keys[name] = self.feature_key(name, pool)
            arr = cache.load(_cache_name(keys[name]), keys[name])
            if arr is not None and arr.shape[0] == len(pool):
                out[name] = arr
                self._stats["cache_hits"] += 1
        missing = [n for n in names if n not in out]
        if not missing:
            return out
        self._stats["cache_misses"] += len(missing)
        if any(n.startswith(RANDOM_PREFIX) for n in missing):
            self._random_backbone()
        if self.hparams.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self._wanted, self._gray = missing, pool.gray
        loader = DataLoader(ImageDataset(pool.images, pool.labels, DirectTransform.of(pool.transform)),
                            batch_size=batch_size, shuffle=False, num_workers=num_workers)
        t0 = time.perf_counter()
        batches = trainer.predict(self, dataloaders=loader, return_predictions=True) or []
        seconds = time.perf_counter() - t0
        self._stats["extract_seconds"] += seconds
        self._stats["extracted_images"] += len(pool)
        for name in missing:
            arr = np.concatenate([b[name] for b in batches]).astype(np.float32) if batches else np.zeros((0, 0))
            if arr.shape[0] != len(pool):
                raise RuntimeError(
                    f"feature extraction of '{name}' returned {arr.shape[0]} rows for {len(pool)} images: "
                    "the trainer limits prediction batches (limit_predict_batches / fast_dev_run); unset it for task=decaf"
                )
            if isinstance(cache, FeatureCache) and cache.enabled:
                cache.save(_cache_name(keys[name]), keys[name], arr)
            out[name] = arr
        log.info("decaf: extracted %s for %d %s images in %.1fs (%.0f img/s)", missing, len(pool), pool.name,
                 seconds, len(pool) / max(seconds, 1e-9))
        return out

    def _cache(self):
        from transferrable.feature_cache import FeatureCache

        if not hasattr(self, "_feature_cache"):  # no cache_dir: no cache
            self._feature_cache = FeatureCache(self.cache_dir or ".", enabled=bool(self.hparams.use_cache and self.cache_dir))
        return self._feature_cache

    def _reset_stats(self) -> None:
        self._stats = {"cache_hits": 0, "cache_misses": 0, "extract_seconds": 0.0, "extracted_images": 0}

    # -- the protocol ---------------------------------------------------------------------------
    def fit_eval(self, spec: ClassifierSpec, X_train, y_train, X_test, y_test, seed: int, C: float | None = None):
        """(test mean per-class accuracy, chosen C, validation accuracy)."""
        clf, C, val = fit_cross_validated(
            spec, X_train, y_train, self.C_grid, self.hparams.val_fraction, self.hparams.default_C,
            self.dropout, seed, self.hparams.max_iter, C=C,
        )
        return mean_class_accuracy(y_test, clf.predict(X_test)), C, val

    def run_protocol(self, pool: Pool, feats: dict[str, np.ndarray]) -> dict:
        """{(feature, classifier, N): {"acc": [...], "C": [...], "val": [...]}} over the split seeds."""
        results: dict[tuple[str, str, int], dict[str, list]] = {}
        shots_desc = sorted(self.shots, reverse=True)
        for seed in self.split_seeds:
            splits = {n: protocol_split(pool, n, seed) for n in shots_desc}
            for name in self.features:
                X = feats[name]
                for spec in self.specs:
                    C_fixed = None
                    for n in shots_desc:
                        train, test = splits[n]
                        acc, C, val = self.fit_eval(spec, X[train], pool.labels[train], X[test], pool.labels[test],
                                                    seed, C=C_fixed)
                        if self.hparams.cv_at == "largest" and C_fixed is None:
                            C_fixed = C
                        r = results.setdefault((name, spec.name, n), {"acc": [], "C": [], "val": []})
                        r["acc"].append(acc)
                        r["C"].append(C)
                        r["val"].append(val)
        return results

    def choose_main(self, results: dict, n: int) -> tuple[str, str]:
        combos = [(f, s.name) for f in self.features for s in self.specs]
        if self.main != "best_val":
            return tuple(self.main.rsplit("/", 1))  # type: ignore[return-value]  # checked in __init__
        vals = {c: np.nanmean(results[(*c, n)]["val"]) if not all(np.isnan(results[(*c, n)]["val"])) else -1.0
                for c in combos}
        return max(combos, key=lambda c: vals[c])  # first of the best on ties

    def run_task(self, trainer: L.Trainer, datamodule, output_dir: str | Path) -> dict:
        self.use_bf16 = inference_bf16(self.hparams.bf16, trainer.precision)
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self._reset_stats()
        pool = build_pool(datamodule, self.hparams.pool, self.hparams.max_images)
        check_pool(pool, max(self.shots), "decaf.shots" if len(self.shots) > 1 else "decaf.train_per_class")
        feats = self.extract(trainer, pool, self.features, datamodule.eval_batch_size, datamodule.num_workers)
        t0 = time.perf_counter()
        with limit_threads(self.hparams.fit_threads):
            results = self.run_protocol(pool, feats)
        fit_seconds = time.perf_counter() - t0
        metrics, tables, images = self.summarise(pool, results, feats, output_dir)
        metrics["decaf/classifier_seconds"] = fit_seconds
        if self.tsne["enabled"]:
            test = pool.part == 1
            held_out = (np.flatnonzero(test) if test.any()
                        else protocol_split(pool, max(self.shots), self.split_seeds[0])[1])
            metrics.update(self.plot_tsne(trainer, [(pool, held_out, None)], feats_of={id(pool): feats},
                                          path=output_dir / "tsne.png", batch_size=datamodule.eval_batch_size,
                                          num_workers=datamodule.num_workers))
            images["decaf/tsne"] = output_dir / "tsne.png"
        log_to_loggers(trainer, metrics, images, tables)
        return metrics

    # -- t-SNE (Figure 2.1) ------------------------------------------------------------------------
    def plot_tsne(self, trainer: L.Trainer, parts: Sequence[tuple[Pool, np.ndarray, str | None]], feats_of: dict,
                  path: Path, batch_size: int = 256, num_workers: int = 0) -> dict[str, float]:
        """Side-by-side t-SNE of ``decaf.tsne.panels`` on held-out images -> ``path`` (PNG) and
        ``{"tsne/silhouette_<panel>": score, "tsne/seconds": s}``.

        ``parts``: (pool, held-out row indices, domain name or None) -- one entry for ``task=decaf``, source
        and target for ``task=decaf_domain`` (then the marker shows the domain). At most ``max_points`` images
        are drawn, stratified by class (and split evenly over the domains). A panel already extracted for the
        classifiers is reused; any other (``conv1`` by default) is extracted, and cached, for those images
        only, so a wide low-level tap costs ``max_points`` rows, not the whole pool.
        """
        from callbacks.tsne import draw_tsne, embed_panels, stratified_subsample

        t0 = time.perf_counter()
        cfg = self.tsne
        panels: list[str] = list(cfg["panels"])
        per_part = None if not cfg["max_points"] else max(1, int(cfg["max_points"]) // len(parts))
        columns: dict[str, list[np.ndarray]] = {p: [] for p in panels}
        labels, domains = [], []
        for k, (pool, rows, domain) in enumerate(parts):
            rows = np.asarray(rows, dtype=np.int64)
            rows = rows[stratified_subsample(pool.labels[rows], per_part, int(cfg["seed"]) + k)]
            have = feats_of.get(id(pool), {})
            missing = [p for p in panels if p not in have]
            extra = {}
            if missing:
                sub = subset_pool(pool, rows)
                extra = self.extract(trainer, sub, missing, batch_size, num_workers)
            for p in panels:
                columns[p].append(have[p][rows] if p in have else extra[p])
            labels.append(pool.labels[rows])
            domains += [domain] * len(rows)
        result = embed_panels(
            {feature_label(p): np.concatenate(columns[p]) for p in panels}, np.concatenate(labels),
            domains if parts[0][2] is not None else None, max_points=None, seed=int(cfg["seed"]),
            max_iter=int(cfg["max_iter"]), perplexity=float(cfg["perplexity"]),
        )
        pool0 = parts[0][0]
        what = " vs ".join(str(d) for _, _, d in parts) if parts[0][2] is not None else pool0.name
        draw_tsne(result, path, class_names=pool0.class_names,
                  title=f"t-SNE of held-out {what} images ({len(result.labels)} points)")
        out = {f"tsne/silhouette_{p}": float(result.silhouettes[feature_label(p)]) for p in panels}
        out["tsne/seconds"] = time.perf_counter() - t0
        log.info("decaf: t-SNE of %s on %d held-out images -> %s (%.1fs; silhouettes %s)", panels,
                 len(result.labels), path, out["tsne/seconds"],
                 {p: round(out[f"tsne/silhouette_{p}"], 3) for p in panels})
        return out

    # -- reporting ------------------------------------------------------------------------------
    def summarise(self, pool: Pool, results: dict, feats: dict, output_dir: Path):
        from transferrable.atomic import atomic_write_json, atomic_write_text
        from transferrable.report import TABLES_FILE, render_table

        n_top = max(self.shots)
        curve = len(self.shots) > 1
        metrics: dict[str, Any] = {}
        for (name, clf, n), r in results.items():
            mean, std = float(np.mean(r["acc"])), float(np.std(r["acc"]))
            prefixes = ([f"{name}/{clf}/n{n}"] if curve else []) + ([f"{name}/{clf}"] if n == n_top else [])
            for p in prefixes:
                metrics[f"test/{p}/mean_class_acc"] = mean
                metrics[f"test/{p}/mean_class_acc_std"] = std
            if n == n_top and not all(np.isnan(r["val"])):
                metrics[f"val/{name}/{clf}/mean_class_acc"] = float(np.nanmean(r["val"]))
        main = self.choose_main(results, n_top)
        r = results[(*main, n_top)]
        metrics["test/mean_class_acc"] = float(np.mean(r["acc"]))
        metrics["test/mean_class_acc_std"] = float(np.std(r["acc"]))
        metrics.update({
            "decaf/main": "/".join(main),
            "decaf/train_per_class": n_top,
            "decaf/shots": list(self.shots),
            "decaf/split_seeds": list(self.split_seeds),
            "decaf/pool_size": len(pool),
            "decaf/num_classes": len(np.unique(pool.labels)),
            "decaf/feature_dims": {k: int(v.shape[1]) for k, v in feats.items()},
            "decaf/cache_hits": self._stats["cache_hits"],
            "decaf/cache_misses": self._stats["cache_misses"],
            "decaf/extract_seconds": self._stats["extract_seconds"],
        })
        if self._stats["extracted_images"] and self._stats["extract_seconds"] > 0:
            metrics["decaf/extract_images_per_second"] = self._stats["extracted_images"] / self._stats["extract_seconds"]

        atomic_write_json(output_dir / "decaf_results.json", {
            "dataset": pool.name, "pool": pool.key, "split_seeds": self.split_seeds, "main": "/".join(main),
            "results": [{"feature": f, "classifier": c, "train_per_class": n, **r} for (f, c, n), r in results.items()],
        })
        tables = [self.layer_table(pool, results, n_top, main)]
        images = {}
        if curve:
            tables.append(self.fewshot_table(pool, results))
            if self.hparams.plot:
                images["decaf/fewshot"] = plot_fewshot(
                    {self.method_label(f, s): [results[(f, s.name, n)]["acc"] for n in self.shots]
                     for f in self.features for s in self.specs},
                    self.shots, output_dir / "fewshot.png",
                    f"{pool.name}: mean per-class accuracy vs training samples per class "
                    f"({len(self.split_seeds)} splits)",
                )
        atomic_write_json(output_dir / TABLES_FILE, tables)
        atomic_write_text(output_dir / "decaf_tables.md", "\n".join(render_table(t) for t in tables))
        if curve:
            atomic_write_text(output_dir / "fewshot.md", render_table(tables[-1]))
        return metrics, tables, images

    def method_label(self, feature: str, spec: ClassifierSpec) -> str:
        return f"{feature_label(feature)}, {spec.label}"

    def layer_table(self, pool: Pool, results: dict, n: int, main: tuple[str, str]) -> dict:
        """Figure 2.3 (left): rows = classifiers, columns = features, mean ± std (%) at N per class."""
        rows = []
        for spec in self.specs:
            cells = [_cell(results[(f, spec.name, n)]["acc"]) for f in self.features]
            rows.append({"label": spec.label, "cells": cells})
        bold = [[s.name for s in self.specs].index(main[1]), self.features.index(main[0])]
        return {
            "title": (f"{pool.name}: mean per-class accuracy (%) with {n} training samples per class, mean ± std "
                      f"over {len(self.split_seeds)} splits (bold: best validation accuracy)"),
            "corner": "classifier",
            "columns": [feature_label(f) for f in self.features],
            "rows": rows,
            "bold": bold,
        }

    def fewshot_table(self, pool: Pool, results: dict) -> dict:
        rows = [{"label": self.method_label(f, s), "cells": [_cell(results[(f, s.name, n)]["acc"]) for n in self.shots]}
                for f in self.features for s in self.specs]
        return {
            "title": (f"{pool.name}: few-shot mean per-class accuracy (%) vs training samples per class N, "
                      f"mean ± std over {len(self.split_seeds)} splits"),
            "corner": "method \\ N",
            "columns": [str(n) for n in self.shots],
            "rows": rows,
        }


def limit_threads(n: int | None):
    """BLAS/OpenMP threads for the classifier fits: small problems run several times faster on one thread
    than on a contended pool (measured: 1.6 s vs 9.4 s for twelve 300-sample fits on 2 busy cores)."""
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=int(n)) if n else nullcontext()


def _cache_name(key: dict) -> str:
    """File-name prefix of a cache entry: the baseline's name or the tap."""
    return str(key.get("feature") or key.get("tap"))


def _cell(accs: Sequence[float]) -> list[float]:
    return [100.0 * float(np.mean(accs)), 100.0 * float(np.std(accs))]


def plot_fewshot(curves: dict[str, list[list[float]]], shots: Sequence[int], path: Path, title: str) -> Path:
    """Accuracy (%) vs N with one line per method and std error bars; written atomically as PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from transferrable.atomic import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, per_n in curves.items():
        means = [100 * np.mean(a) for a in per_n]
        stds = [100 * np.std(a) for a in per_n]
        ax.errorbar(shots, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(list(shots))
    ax.set_xticklabels([str(s) for s in shots])
    ax.set_xlabel("training samples per class (N)")
    ax.set_ylabel("mean per-class accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def log_to_loggers(trainer: L.Trainer, metrics: dict, images: dict[str, Path], tables: list[dict]) -> None:
    """Numeric metrics to every logger; with a WandbLogger also the PNGs and the tables."""
    from lightning.pytorch.loggers import WandbLogger

    numeric = {k: float(v) for k, v in metrics.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}
    for lg in trainer.loggers:
        lg.log_metrics(numeric)
        if isinstance(lg, WandbLogger):
            for key, path in images.items():
                lg.log_image(key=key, images=[str(path)])
            for i, t in enumerate(tables):
                data = [[r["label"], *[("-" if c is None else f"{c[0]:.2f} ± {c[1]:.2f}") for c in r["cells"]]]
                        for r in t["rows"]]
                lg.log_table(key=f"decaf/table_{i}", columns=[t["corner"], *t["columns"]], data=data)
        lg.save()
