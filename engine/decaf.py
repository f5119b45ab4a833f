"""task=decaf's pipeline (thesis ch. 2): DeCAF -- frozen activations of a pretrained network + linear classifiers.

1. **Pool** the dataset's images (``datamodules.image_pool``): ``decaf.pool: all`` joins train+val+test and draws
   the protocol's splits from it, ``given`` tests on the DataModule's test split; ``max_images`` caps the pool.
2. **Extract** each entry of ``decaf.features`` once with ``trainer.predict`` (``DecafModule.predict_step``: frozen
   backbone in eval mode under ``torch.inference_mode``; ``channels_last`` and bf16 autocast are switches) and
   cache it on disk (``transferrable.feature_cache``; ``decaf.cache_dir``). Features: a backbone tap (``pool5``,
   ``fc6``, ``fc7`` = DeCAF5/6/7, or any other tap), ``random:<tap>`` (the same tap with random weights, seeded by
   ``seed`` -- identical to running with ``backbone.weights=null``), ``raw`` pixels, ``hog``.
3. **Protocol**: for each of ``splits`` split seeds (``split_seed + k``, recorded), ``N`` training images per
   class are drawn at random and the rest of the pool is the test set. Each classifier of ``classifiers``
   (``logreg``, ``svm``, ``logreg_dropout``, ``svm_dropout``; see ``models.linear_classifiers``) has its C chosen
   on a ``val_fraction`` validation subsplit of the N (thesis: 25/5 of 30) and is refit on all N. Metric: mean
   per-class accuracy, mean and std over splits. ``shots: [1, 2, 3, 5, 10, 20, 30]`` gives the few-shot curve:
   the same splits' first N images per class (nested), with C cross-validated at the largest N and kept fixed
   for the smaller ones (the thesis's "fixed parameters"; ``cv_at: each`` re-validates at every N that allows it).

Outputs (in the run directory): ``metrics.json`` (via the runner) with ``test/<feature>/<classifier>/
mean_class_acc`` (+ ``_std``, at the largest N), ``test/<feature>/<classifier>/n<N>/mean_class_acc`` for a
curve, ``val/...`` (validation accuracy of the chosen C) and the headline ``test/mean_class_acc`` of the
``main`` combination (``best_val``: the one with the best validation accuracy, as the thesis bolds it);
``decaf_results.json`` (every split's accuracy and chosen C); ``tables.json`` + ``decaf_tables.md``
(Figure 2.3-left shape: classifier x feature; the few-shot table: method x N; ``transferrable.decaf_report``),
which ``python eval.py report=<dir>`` prints too; ``fewshot.png`` for a curve; ``tsne.png`` (``decaf.tsne``,
Figure 2.1): t-SNE panels side by side -- default ``[conv1, fc6]``, i.e. the first pooling layer's output (the
thesis's DeCAF1) vs DeCAF6 -- of at most ``max_points`` held-out images (the ``pool: given`` test split, else the
first split's test images), coloured by class, with ``tsne/silhouette_<panel>`` in the metrics. A panel that is
not a classifier feature (conv1 by default) is extracted, and cached, for the plotted images only. Metrics, the
plots and the tables are also logged to every attached logger (W&B: images + tables).

The stages shared with ``task=decaf_domain`` (``engine/decaf_domain.py``) are here: :class:`Protocol` (the
``decaf:`` node, checked), :class:`FeatureExtractor` (cache + ``trainer.predict``), :func:`tsne_stage`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
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

from callbacks.tsne import draw_tsne, embed_panels, stratified_subsample
from datamodules.base import ImageDataset
from datamodules.image_pool import DirectTransform, Pool, build_pool, check_pool, protocol_split, subset_pool
from engine.ranks import gather_rows, output_dir_of, union_in_order
from lightning_modules.decaf import RANDOM_PREFIX, DecafModule
from models.backbones import TapBackbone
from models.linear_classifiers import SOLVERS, ClassifierSpec, FeatureDropout, fit_cross_validated, mean_class_accuracy
from models.weights import fold_grayscale_source, is_hub_spec
from transferrable.atomic import atomic_write_json
from transferrable.decaf_report import (
    feature_label,
    fewshot_table,
    layer_table,
    log_to_loggers,
    method_label,
    plot_fewshot,
    write_tables,
)
from transferrable.distributed import rank_and_world
from transferrable.errors import ConfigError
from transferrable.feature_cache import CACHE_VERSION, FeatureCache, state_sha256
from transferrable.manifest import file_sha256
from transferrable.precision import inference_bf16

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
        if cfg.get("solver", "sklearn") not in SOLVERS:
            raise ConfigError(f"decaf.solver={cfg.solver!r}: expected one of {list(SOLVERS)}")
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
        )


# -- features -----------------------------------------------------------------------------------
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


# -- the protocol -------------------------------------------------------------------------------
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


def run_protocol(p: Protocol, pool: Pool, feats: dict[str, np.ndarray]) -> dict:
    """{(feature, classifier, N): {"acc": [...], "C": [...], "val": [...]}} over the split seeds."""
    from tqdm import tqdm

    results: dict[tuple[str, str, int], dict[str, list]] = {}
    shots_desc = sorted(p.shots, reverse=True)
    # the fits are the slow part on many classes (C validated per feature x classifier x split): show them
    bar = tqdm(total=len(p.split_seeds) * len(p.features) * len(p.specs), desc="decaf: fitting classifiers",
               unit="fit", mininterval=5.0, disable=rank_and_world()[0] != 0)
    for seed in p.split_seeds:
        splits = {n: protocol_split(pool, n, seed) for n in shots_desc}
        for name in p.features:
            X = feats[name]
            for spec in p.specs:
                bar.set_postfix_str(f"{name}/{spec.name}", refresh=False)
                C_fixed = None
                for n in shots_desc:
                    train, test = splits[n]
                    acc, C, val = fit_eval(p, spec, X[train], pool.labels[train], X[test], pool.labels[test], seed,
                                           C=C_fixed)
                    if p.cv_at == "largest" and C_fixed is None:
                        C_fixed = C
                    r = results.setdefault((name, spec.name, n), {"acc": [], "C": [], "val": []})
                    r["acc"].append(acc)
                    r["C"].append(C)
                    r["val"].append(val)
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


def summarise(p: Protocol, pool: Pool, results: dict, feats: dict, stats: dict, output_dir: Path):
    """(metrics, tables, images); writes ``decaf_results.json``, the tables and ``fewshot.png``."""
    n_top = max(p.shots)
    curve = len(p.shots) > 1
    metrics: dict[str, Any] = {}
    for (name, clf, n), r in results.items():
        mean, std = float(np.mean(r["acc"])), float(np.std(r["acc"]))
        prefixes = ([f"{name}/{clf}/n{n}"] if curve else []) + ([f"{name}/{clf}"] if n == n_top else [])
        for prefix in prefixes:
            metrics[f"test/{prefix}/mean_class_acc"] = mean
            metrics[f"test/{prefix}/mean_class_acc_std"] = std
        if n == n_top and not all(np.isnan(r["val"])):
            metrics[f"val/{name}/{clf}/mean_class_acc"] = float(np.nanmean(r["val"]))
    main = choose_main(p, results, n_top)
    r = results[(*main, n_top)]
    metrics["test/mean_class_acc"] = float(np.mean(r["acc"]))
    metrics["test/mean_class_acc_std"] = float(np.std(r["acc"]))
    metrics.update({
        "decaf/main": "/".join(main),
        "decaf/train_per_class": n_top,
        "decaf/shots": list(p.shots),
        "decaf/split_seeds": list(p.split_seeds),
        "decaf/pool_size": len(pool),
        "decaf/num_classes": len(np.unique(pool.labels)),
        "decaf/feature_dims": {k: int(v.shape[1]) for k, v in feats.items()},
        **extraction_metrics(stats),
    })
    if stats["extracted_images"] and stats["extract_seconds"] > 0:
        metrics["decaf/extract_images_per_second"] = stats["extracted_images"] / stats["extract_seconds"]

    atomic_write_json(output_dir / "decaf_results.json", {
        "dataset": pool.name, "pool": pool.key, "split_seeds": p.split_seeds, "main": "/".join(main),
        "results": [{"feature": f, "classifier": c, "train_per_class": n, **r} for (f, c, n), r in results.items()],
    })
    tables = [layer_table(pool.name, results, p.features, p.specs, n_top, main, len(p.split_seeds))]
    images = {}
    fewshot = None
    if curve:
        fewshot = fewshot_table(pool.name, results, p.features, p.specs, p.shots, len(p.split_seeds))
        tables.append(fewshot)
        if p.plot:
            curves = {method_label(f, s): [results[(f, s.name, n)]["acc"] for n in p.shots]
                      for f in p.features for s in p.specs}
            images["decaf/fewshot"] = plot_fewshot(
                curves, p.shots, output_dir / "fewshot.png",
                f"{pool.name}: mean per-class accuracy vs training samples per class ({len(p.split_seeds)} splits)",
            )
    write_tables(output_dir, tables, fewshot)
    return metrics, tables, images


# -- t-SNE (Figure 2.1) -------------------------------------------------------------------------
def tsne_stage(p: Protocol, extractor: FeatureExtractor, trainer, parts: Sequence[tuple[Pool, np.ndarray, str | None]],
               feats_of: dict, path: Path, batch_size: int = 256, num_workers: int = 0) -> dict[str, float]:
    """Side-by-side t-SNE of ``decaf.tsne.panels`` on held-out images -> ``path`` (PNG) and
    ``{"tsne/silhouette_<panel>": score, "tsne/seconds": s}``.

    ``parts``: (pool, held-out row indices, domain name or None) -- one entry for ``task=decaf``, source and target
    for ``task=decaf_domain`` (then the marker shows the domain). At most ``max_points`` images are drawn,
    stratified by class (and split evenly over the domains). A panel already extracted for the classifiers
    (``feats_of[id(pool)]``) is reused; any other (``conv1`` by default) is extracted, and cached, for those images
    only, so a wide low-level tap costs ``max_points`` rows, not the whole pool.
    """
    t0 = time.perf_counter()
    cfg = p.tsne
    panels: list[str] = list(cfg["panels"])
    per_part = None if not cfg["max_points"] else max(1, int(cfg["max_points"]) // len(parts))
    columns: dict[str, list[np.ndarray]] = {name: [] for name in panels}
    labels, domains = [], []
    for k, (pool, rows, domain) in enumerate(parts):
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[stratified_subsample(pool.labels[rows], per_part, int(cfg["seed"]) + k)]
        have = feats_of.get(id(pool), {})
        missing = [name for name in panels if name not in have]
        extra = extractor.extract(trainer, subset_pool(pool, rows), missing, batch_size, num_workers) if missing else {}
        for name in panels:
            columns[name].append(have[name][rows] if name in have else extra[name])
        labels.append(pool.labels[rows])
        domains += [domain] * len(rows)
    result = embed_panels(
        {feature_label(name): np.concatenate(columns[name]) for name in panels}, np.concatenate(labels),
        domains if parts[0][2] is not None else None, max_points=None, seed=int(cfg["seed"]),
        max_iter=int(cfg["max_iter"]), perplexity=float(cfg["perplexity"]),
    )
    pool0 = parts[0][0]
    what = " vs ".join(str(d) for _, _, d in parts) if parts[0][2] is not None else pool0.name
    draw_tsne(result, path, class_names=pool0.class_names,
              title=f"t-SNE of held-out {what} images ({len(result.labels)} points)")
    out = {f"tsne/silhouette_{name}": float(result.silhouettes[feature_label(name)]) for name in panels}
    out["tsne/seconds"] = time.perf_counter() - t0
    log.info("decaf: t-SNE of %s on %d held-out images -> %s (%.1fs; silhouettes %s)", panels,
             len(result.labels), path, out["tsne/seconds"],
             {name: round(out[f"tsne/silhouette_{name}"], 3) for name in panels})
    return out


# -- the pipeline -------------------------------------------------------------------------------
def fold_conv1_for_grayscale_source(model: DecafModule, setting) -> None:
    """A source learnt on grayscale images never trained conv1's colour components: fold them away (as R-CNN does,
    ``models.weights.fold_grayscale_source``) so a colour target is seen as its channel mean, not through noise."""
    removed = fold_grayscale_source(model.backbone, setting)
    if removed is not None:
        log.info("decaf: grayscale source (%s): conv1 folded to colour-blind filters (%.0f%% of its weight norm was "
                 "untrained colour noise)", getattr(model.backbone, "source_dataset", "?"), 100 * removed)


def run(cfg: DictConfig, trainer, datamodule, model: DecafModule) -> dict:
    """Pool, extract (cached), fit the linear classifiers over the splits, then tables, plots and t-SNE."""
    p = Protocol.from_cfg(cfg.decaf, model)
    model.use_bf16 = inference_bf16(cfg.decaf.bf16, trainer.precision)
    fold_conv1_for_grayscale_source(model, cfg.decaf.get("grayscale_source", "auto"))
    with output_dir_of(trainer, Path(cfg.paths.output_dir)) as output_dir:
        return _run(p, cfg, trainer, datamodule, model, output_dir)


def _run(p: Protocol, cfg: DictConfig, trainer, datamodule, model: DecafModule, output_dir: Path) -> dict:
    extractor = FeatureExtractor.from_cfg(cfg, model)
    pool = build_pool(datamodule, p.pool, p.max_images)
    check_pool(pool, max(p.shots), "decaf.shots" if len(p.shots) > 1 else "decaf.train_per_class")
    feats = extractor.extract(trainer, pool, p.features, datamodule.eval_batch_size, datamodule.num_workers)
    t0 = time.perf_counter()
    with limit_threads(p.fit_threads):
        results = run_protocol(p, pool, feats)
    fit_seconds = time.perf_counter() - t0
    metrics, tables, images = summarise(p, pool, results, feats, extractor.stats, output_dir)
    metrics["decaf/classifier_seconds"] = fit_seconds
    if p.tsne["enabled"]:
        test = pool.part == 1
        held_out = np.flatnonzero(test) if test.any() else protocol_split(pool, max(p.shots), p.split_seeds[0])[1]
        metrics.update(tsne_stage(p, extractor, trainer, [(pool, held_out, None)], feats_of={id(pool): feats},
                                  path=output_dir / "tsne.png", batch_size=datamodule.eval_batch_size,
                                  num_workers=datamodule.num_workers))
        images["decaf/tsne"] = output_dir / "tsne.png"
    log_to_loggers(trainer, metrics, images, tables)
    return metrics
