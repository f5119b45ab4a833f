"""DeCAF's protocol, shared by task=decaf and task=decaf_domain (thesis ch. 2): the ``decaf:`` settings
(``Protocol``), frozen-feature extraction through ``trainer.predict`` with an on-disk cache (``FeatureExtractor``),
and the classifier fits with cross-validated C over splits (``run_protocol``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader

from datamodules.base import ImageDataset
from datamodules.image_pool import DirectTransform, Pool, protocol_split
from lightning_modules.decaf import RANDOM_PREFIX, DecafModule
from models.backbones import TapBackbone
from models.linear_classifiers import (
    ClassifierSpec,
    FeatureDropout,
    fit_cross_validated,
    mean_class_accuracy,
)
from models.weights import is_hub_spec
from transferrable.core.distributed import gather_rows, union_in_order
from transferrable.core.errors import ConfigError
from transferrable.core.feature_cache import CACHE_VERSION, FeatureCache, state_sha256
from transferrable.core.manifest import file_sha256
from transferrable.core.progress import progress

log = logging.getLogger(__name__)


# The keys of decaf.tsne; the values only fill in the shorthand decaf.tsne=true (conf/task/decaf.yaml lists them).
TSNE_DEFAULTS = {"enabled": False, "panels": ["conv1", "fc6"], "max_points": 1000, "seed": 0,
                 "max_iter": 1000, "perplexity": 30.0}


def plain(value):
    """OmegaConf containers -> plain Python (lists/dicts); everything else unchanged."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


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


@dataclass
class Protocol:
    """The ``decaf:`` node, parsed and checked (one-line ConfigErrors) before any work."""

    features: list[str]
    specs: list[ClassifierSpec]
    shots: list[int]
    split_seeds: list[int]
    C_grid: list[float]
    val_fraction: float
    default_C: float
    cv_at: str
    dropout: FeatureDropout
    max_iter: int
    pool: str
    max_images: int | None
    main: str
    tsne: dict
    fit_threads: int | None
    plot: bool
    solver: str = "sklearn"
    fit_workers: int = 1

    @classmethod
    def from_cfg(cls, cfg: DictConfig, model: DecafModule, check_main: bool = True) -> Protocol:
        """``check_main``: ``decaf.main`` must name a computed combination (task=decaf; decaf_domain has its own)."""
        features = [str(f) for f in plain(cfg.features)]
        try:
            specs = [ClassifierSpec.parse(str(c)) for c in plain(cfg.classifiers)]
        except ValueError as err:
            raise ConfigError(f"decaf.classifiers: {err}") from None
        if not features or not specs:
            raise ConfigError("decaf.features and decaf.classifiers must each name at least one entry")
        model.check_features(features)
        tsne = parse_tsne(cfg.get("tsne"))
        if tsne["enabled"]:
            model.check_features(tsne["panels"], what="decaf.tsne.panels")
        shots = plain(cfg.shots)
        shots = sorted({int(s) for s in shots}) if shots else [int(cfg.train_per_class)]
        if shots[0] < 1:
            raise ConfigError(f"decaf.shots/train_per_class: {shots[0]} training samples per class; expected >= 1")
        split_seeds = [int(cfg.split_seed) + k for k in range(int(cfg.splits))]
        if not split_seeds:
            raise ConfigError("decaf.splits must be >= 1")
        if cfg.cv_at not in ("largest", "each"):
            raise ConfigError(f"decaf.cv_at={cfg.cv_at!r}: expected 'largest' or 'each'")
        main = str(cfg.main)
        combos = [f"{f}/{s.name}" for f in features for s in specs]
        if check_main and main != "best_val" and main not in combos:
            raise ConfigError(f"decaf.main={main!r}: expected best_val or one of {combos}")
        return cls(
            features=features, specs=specs, shots=shots, split_seeds=split_seeds,
            C_grid=[float(c) for c in plain(cfg.C_grid)], val_fraction=float(cfg.val_fraction),
            default_C=float(cfg.default_C), cv_at=str(cfg.cv_at),
            dropout=FeatureDropout(float(cfg.dropout_rate), int(cfg.dropout_copies)), max_iter=int(cfg.max_iter),
            pool=str(cfg.pool), max_images=cfg.max_images, main=main, tsne=tsne, fit_threads=cfg.fit_threads,
            plot=bool(cfg.plot), solver=str(cfg.get("solver", "sklearn")),
            fit_workers=int(cfg.get("fit_workers") or len(os.sched_getaffinity(0))),
        )


def _cache_name(key: dict) -> str:
    """File-name prefix of a cache entry: the baseline's name or the tap."""
    return str(key.get("feature") or key.get("tap"))


class FeatureExtractor:
    """A pool's features from the feature cache, or from one ``trainer.predict`` pass of ``DecafModule`` over the
    pool for all the missing ones (then cached). ``stats`` counts hits, misses, images and seconds."""

    def __init__(self, model: DecafModule, cache: FeatureCache | None = None, backbone_cfg: dict | None = None,
                 random_seed: int | None = 0):
        self.model = model
        self.cache = cache if cache is not None else FeatureCache(".", enabled=False)
        self.backbone_cfg = backbone_cfg  # the run's ``backbone`` config: the cache key, random:<tap>
        self.random_seed = random_seed
        self.stats = {"cache_hits": 0, "cache_misses": 0, "extract_seconds": 0.0, "extracted_images": 0}
        self._state_hashes: dict[int, str] = {}

    @classmethod
    def from_cfg(cls, cfg: DictConfig, model: DecafModule) -> FeatureExtractor:
        d = cfg.decaf
        cache = FeatureCache(d.cache_dir or ".", enabled=bool(d.cache and d.cache_dir))  # no cache_dir: no cache
        return cls(model, cache, plain(cfg.backbone), cfg.get("seed"))

    # -- the cache key ---------------------------------------------------------------------------
    def _backbone_arch_cfg(self) -> dict:
        cfg = dict(self.backbone_cfg or {"arch": self.model.backbone.arch})
        return {k: v for k, v in cfg.items() if k not in ("weights", "freeze", "norm_eval")}

    def _weights_spec(self) -> str:
        spec = (self.backbone_cfg or {}).get("weights")
        if spec is None:
            return f"random:{self.random_seed}"
        if is_hub_spec(spec):
            return str(spec)
        if Path(str(spec)).is_file():
            return f"sha256:{file_sha256(spec)}"
        return str(spec)

    def key(self, name: str, pool: Pool) -> dict:
        key: dict[str, Any] = {"version": CACHE_VERSION, "dataset": pool.key}
        if name == "raw":
            key.update(feature="raw", params={"gray": pool.gray})
        elif name == "hog":
            key.update(feature="hog", params=dict(self.model.hog_params))
        else:  # identified by tap + weights, so random:fc6 and fc6 with backbone.weights=null share an entry
            rand = name.startswith(RANDOM_PREFIX)
            net = self.random_backbone() if rand else self.model.backbone
            if id(net) not in self._state_hashes:
                self._state_hashes[id(net)] = state_sha256(net)
            key.update(
                tap=name[len(RANDOM_PREFIX):] if rand else name,
                weights={"spec": f"random:{self.random_seed}" if rand else self._weights_spec(),
                         "state_sha256": self._state_hashes[id(net)]},
                backbone=self._backbone_arch_cfg(),
                bf16=self.model.use_bf16,
            )
        return key

    def random_backbone(self) -> TapBackbone:
        """The same architecture with random weights, built as ``backbone.weights=null`` with ``seed`` would be,
        once, and handed to the model for its ``random:<tap>`` features."""
        model = self.model
        if model.random_backbone is None:
            if not self.backbone_cfg or "_target_" not in self.backbone_cfg:
                raise ConfigError("random:<tap> features need the backbone's config (with its _target_) to rebuild it")
            cfg = {**self.backbone_cfg, "weights": None, "freeze": "all"}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self.random_seed))
                net = instantiate(cfg)
            net.requires_grad_(False)
            net.eval()
            model.random_backbone = net.to(model.device)
        return model.random_backbone

    # -- extraction ------------------------------------------------------------------------------
    def extract(self, trainer, pool: Pool, names: Sequence[str], batch_size: int = 256,
                num_workers: int = 0) -> dict[str, np.ndarray]:
        """Every feature in ``names`` for every pool image (rows in pool order)."""
        out, keys = {}, {}
        for name in names:
            keys[name] = self.key(name, pool)
            arr = self.cache.load(_cache_name(keys[name]), keys[name])
            if arr is not None and arr.shape[0] == len(pool):
                out[name] = arr
                self.stats["cache_hits"] += 1
        missing = union_in_order(list(names), [n for n in names if n not in out], trainer.world_size)
        if not missing:
            return out
        self.stats["cache_misses"] += len(missing)
        if any(n.startswith(RANDOM_PREFIX) for n in missing):
            self.random_backbone()
        self.model.request(missing, pool.gray)
        loader = DataLoader(ImageDataset(pool.images, pool.labels, DirectTransform.of(pool.transform)),
                            batch_size=batch_size, shuffle=False, num_workers=num_workers)
        t0 = time.perf_counter()
        batches = trainer.predict(self.model, dataloaders=loader, return_predictions=True) or []
        seconds = time.perf_counter() - t0
        self.stats["extract_seconds"] += seconds
        self.stats["extracted_images"] += len(pool)
        local = {n: np.concatenate([b[n] for b in batches]).astype(np.float32) if batches else np.zeros((0, 0))
                 for n in missing}
        rows = gather_rows(local, trainer.world_size)  # under DDP: every rank's shard, back in pool order
        for name in missing:
            arr = rows[name]
            if arr.shape[0] != len(pool):
                raise RuntimeError(
                    f"feature extraction of '{name}' returned {arr.shape[0]} rows for {len(pool)} images: "
                    "the trainer limits prediction batches (limit_predict_batches / fast_dev_run); unset it for task=decaf"
                )
            if self.cache.enabled and trainer.is_global_zero:  # one writer; the other ranks hold the same rows
                self.cache.save(_cache_name(keys[name]), keys[name], arr)
            out[name] = arr
        log.info("decaf: extracted %s for %d %s images in %.1fs (%.0f img/s)", missing, len(pool), pool.name,
                 seconds, len(pool) / max(seconds, 1e-9))
        return out


@contextmanager
def limit_threads(n: int | None):
    """BLAS/OpenMP threads for the classifier fits: small problems run several times faster on one thread
    than on a contended pool (measured: 1.6 s vs 9.4 s for twelve 300-sample fits on 2 busy cores); torch's own
    intra-op pool (the torch solver; threadpoolctl does not reach it) is set alike, then restored."""
    before = torch.get_num_threads()
    with threadpool_limits(limits=int(n)) if n else nullcontext():
        torch.set_num_threads(int(n) if n else before)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def fit_eval(p: Protocol, spec: ClassifierSpec, X_train, y_train, X_test, y_test, seed: int, C: float | None = None):
    """(test mean per-class accuracy, chosen C, validation accuracy)."""
    clf, C, val = fit_cross_validated(spec, X_train, y_train, p.C_grid, p.val_fraction, p.default_C, p.dropout, seed,
                                      p.max_iter, C=C, solver=p.solver)
    return mean_class_accuracy(y_test, clf.predict(X_test)), C, val


def fit_cost(p: Protocol, X: np.ndarray, spec: ClassifierSpec) -> float:
    """A fit's relative cost for the job order: dims x the dropout copies (rows), x3 for the SVM (measured: its
    one-vs-rest path takes ~3x the L-BFGS iterations of logreg's at C 100-1000)."""
    return float(X.shape[1]) * (p.dropout.copies if spec.dropout else 1) * (3.0 if spec.kind == "svm" else 1.0)


def run_protocol(p: Protocol, pool: Pool, feats: dict[str, np.ndarray], bars: bool = False) -> dict:
    """{(feature, classifier, N): {"acc": [...], "C": [...], "val": [...]}} over the split seeds (a bar of the fits
    when ``bars``). The (split, feature, classifier) fits are independent, so ``fit_workers`` threads run them at once
    (one BLAS/torch thread each: the matrix work releases the GIL, and each fit draws from its own seeded Generator);
    the results are gathered in a fixed order, the same for any number of workers."""
    shots_desc = sorted(p.shots, reverse=True)
    splits = {seed: {n: protocol_split(pool, n, seed) for n in shots_desc} for seed in p.split_seeds}
    jobs = [(seed, name, spec) for seed in p.split_seeds for name in p.features for spec in p.specs]

    def fit_job(seed: int, name: str, spec: ClassifierSpec) -> list[tuple]:
        X, out, C_fixed = feats[name], [], None
        for n in shots_desc:
            train, test = splits[seed][n]
            acc, C, val = fit_eval(p, spec, X[train], pool.labels[train], X[test], pool.labels[test], seed, C=C_fixed)
            if p.cv_at == "largest" and C_fixed is None:
                C_fixed = C
            out.append((n, acc, C, val))
        return out

    results: dict[tuple[str, str, int], dict[str, list]] = {}
    # the fits are the slow part on many classes (C validated per feature x classifier x split): show them
    bar = progress(total=len(jobs), desc="decaf: fitting classifiers", enabled=bars, unit="fit")
    with ThreadPoolExecutor(max_workers=max(1, p.fit_workers)) as workers:
        # the longest first (dropout: copies x the rows; wide features), so no long fit starts last on one worker
        # while the others idle; gathered in ``jobs`` order all the same
        futures = dict.fromkeys(range(len(jobs)))
        for i in sorted(range(len(jobs)), key=lambda i: -fit_cost(p, feats[jobs[i][1]], jobs[i][2])):
            futures[i] = workers.submit(fit_job, *jobs[i])
        futures = list(futures.values())
        for (_, name, spec), future in zip(jobs, futures, strict=True):
            for n, acc, C, val in future.result():
                r = results.setdefault((name, spec.name, n), {"acc": [], "C": [], "val": []})
                r["acc"].append(acc)
                r["C"].append(C)
                r["val"].append(val)
            bar.set_postfix_str(f"{name}/{spec.name}", refresh=False)
            bar.update(1)
    bar.close()
    return results


def choose_main(p: Protocol, results: dict, n: int) -> tuple[str, str]:
    combos = [(f, s.name) for f in p.features for s in p.specs]
    if p.main != "best_val":
        return tuple(p.main.rsplit("/", 1))  # type: ignore[return-value]  # checked in Protocol.from_cfg
    vals = {c: np.nanmean(results[(*c, n)]["val"]) if not all(np.isnan(results[(*c, n)]["val"])) else -1.0
            for c in combos}
    return max(combos, key=lambda c: vals[c])  # first of the best on ties


def extraction_metrics(stats: dict) -> dict[str, Any]:
    """A :class:`FeatureExtractor`'s counters as ``decaf/*`` metrics."""
    return {"decaf/cache_hits": stats["cache_hits"], "decaf/cache_misses": stats["cache_misses"],
            "decaf/extract_seconds": stats["extract_seconds"]}
