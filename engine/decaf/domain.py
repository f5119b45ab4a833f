"""task=decaf_domain's pipeline: DeCAF for supervised domain adaptation (thesis ch. 2.3.2, Table 2.1).

The run's ``dataset`` is the source domain, ``decaf_domain.target`` (a dataset config, e.g.
``dataset@decaf_domain.target=digits``) the target domain; both must have the same classes. Features are
extracted (and cached) for both pools exactly as in ``task=decaf`` (``engine.decaf.protocol.FeatureExtractor``, the same
``DecafModule``). For each split seed:

* source: ``source_per_class`` labelled images per class (null: all of them);
* target: ``target_per_class`` labelled images per class; every other target image is the test set;

and each classifier is trained in each setting

* ``S``  source only,
* ``T``  target only (the few labelled target images),
* ``ST`` source and target pooled,
* ``daume``  Daumé III (2007) feature augmentation: source rows [x, x, 0], target rows [x, 0, x], trained on
  both, tested on target rows [x, 0, x];

and tested on the held-out target images (mean per-class accuracy, mean ± std over the splits). C is
chosen on a validation subsplit: of the source labels for ``S``, of the *target* labels otherwise (the
domain the classifier is tested on), then refit on all of that setting's training data.

``directions: both`` also runs target -> source with the same features (MNIST -> digits and digits ->
MNIST from one run). Metrics: ``test/<src>_to_<tgt>/<feature>/<setting>/<classifier>/mean_class_acc`` (+
``_std``) and the headline ``test/mean_class_acc`` (``main``, default fc6/daume/svm of the first
direction); ``tables.json``/``decaf_tables.md`` hold the Table 2.1-shaped table (rows: classifier and
setting, columns: direction x feature; ``engine.decaf.report.domain_table``). Everything under
``decaf.*`` applies, except ``decaf.main`` and ``decaf.pool`` (both domains are pooled whole).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from datamodules.image_pool import Pool, build_pool, per_class_draw
from engine.decaf.pipeline import fold_conv1_for_grayscale_source, tsne_stage
from engine.decaf.protocol import FeatureExtractor, Protocol, extraction_metrics, limit_threads, plain
from engine.decaf.report import domain_table, log_to_loggers, write_tables
from lightning_modules.decaf import DecafModule
from models.linear_classifiers import (
    ClassifierSpec,
    LinearClassifier,
    can_validate,
    daume_augment,
    mean_class_accuracy,
    select_C,
    validation_subsplit,
)
from transferrable.core.atomic import atomic_write_json
from transferrable.core.distributed import output_dir_of, rank_aware
from transferrable.core.errors import ConfigError, DatasetError
from transferrable.core.precision import inference_bf16
from transferrable.core.progress import progress, trainer_bars

SETTINGS = ("S", "T", "ST", "daume")


def setting_training_data(setting: str, Xs, ys, Xt, yt, val_fraction: float, seed: int):
    """(X_fit, y_fit, X_val, y_val, X_all, y_all, test_transform) for one DA setting; X_val is None when the
    labelled data cannot be split (then C is not validated)."""
    if setting not in SETTINGS:
        raise ConfigError(f"decaf_domain.settings: unknown setting {setting!r}; choices: {list(SETTINGS)}")
    ident = lambda X: X  # noqa: E731
    if setting == "S":
        if not can_validate(ys):
            return Xs, ys, None, None, Xs, ys, ident
        f, v = validation_subsplit(ys, val_fraction, seed)
        return Xs[f], ys[f], Xs[v], ys[v], Xs, ys, ident
    if setting == "daume":
        Xs, Xt = daume_augment(Xs, "source"), daume_augment(Xt, "target")
        test_tf = lambda X: daume_augment(X, "target")  # noqa: E731
    else:
        test_tf = ident
    src = setting != "T"
    X_all = np.concatenate([Xs, Xt]) if src else Xt
    y_all = np.concatenate([ys, yt]) if src else yt
    if not can_validate(yt):
        return X_all, y_all, None, None, X_all, y_all, test_tf
    f, v = validation_subsplit(yt, val_fraction, seed)
    X_fit = np.concatenate([Xs, Xt[f]]) if src else Xt[f]
    y_fit = np.concatenate([ys, yt[f]]) if src else yt[f]
    return X_fit, y_fit, Xt[v], yt[v], X_all, y_all, test_tf


@dataclass
class DomainProtocol:
    """The ``decaf_domain:`` node, parsed and checked."""

    target_cfg: dict
    settings: list[str]
    source_per_class: int | None
    target_per_class: int
    directions: str
    main: str

    @classmethod
    def from_cfg(cls, cfg: DictConfig, p: Protocol) -> DomainProtocol:
        target_cfg = plain(cfg.target)
        if not target_cfg or "_target_" not in target_cfg:
            raise ConfigError("decaf_domain.target: a dataset config is needed (e.g. dataset@decaf_domain.target=digits)")
        settings = [str(s) for s in plain(cfg.settings)]
        for s in settings:
            if s not in SETTINGS:
                raise ConfigError(f"decaf_domain.settings: unknown setting {s!r}; choices: {list(SETTINGS)}")
        if cfg.directions not in ("both", "forward"):
            raise ConfigError(f"decaf_domain.directions={cfg.directions!r}: expected 'both' or 'forward'")
        source_per_class = None if cfg.source_per_class is None else int(cfg.source_per_class)
        target_per_class = int(cfg.target_per_class)
        if target_per_class < 1 or (source_per_class is not None and source_per_class < 1):
            raise ConfigError("decaf_domain.source_per_class/target_per_class: expected >= 1 (source: or null for all)")
        combos = [f"{f}/{s}/{c.name}" for f in p.features for s in settings for c in p.specs]
        main = cfg.main
        if main is None:
            main = "fc6/daume/svm" if "fc6/daume/svm" in combos else combos[-1]
        if main not in combos:
            raise ConfigError(f"decaf_domain.main={main!r}: expected one of {combos}")
        return cls(target_cfg, settings, source_per_class, target_per_class, str(cfg.directions), str(main))


def check_domain_pool(pool: Pool, n: int | None, role: str, what: str) -> None:
    """One-line DatasetErrors: a single class, or a class too small for ``n`` labelled images (target: + a test one)."""
    present = np.unique(pool.labels)
    if len(present) < 2:
        raise DatasetError(f"{role} dataset '{pool.name}' has a single class: a classifier needs at least 2")
    if n is None:
        return
    counts = np.bincount(pool.labels, minlength=len(pool.class_names))
    smallest = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
    need = n + 1 if role == "target" else n
    if counts[smallest] < need:
        raise DatasetError(
            f"{what}={n}: class '{pool.class_names[smallest]}' of {role} dataset '{pool.name}' has only "
            f"{counts[smallest]} images; it needs {'more than' if role == 'target' else 'at least'} {n}"
        )


def held_out(pool: Pool, n: int | None, seed: int) -> np.ndarray:
    """Rows of ``pool`` not labelled for training in the split ``seed`` (every row when ``n`` is None)."""
    everything = np.arange(len(pool))
    if n is None:
        return everything
    return np.setdiff1d(everything, per_class_draw(pool.labels, everything, n, seed))


def fit_eval_domain(p: Protocol, spec: ClassifierSpec, data, X_test, y_test, seed: int):
    """(test mean per-class accuracy, C, validation accuracy) of one classifier in one setting."""
    X_fit, y_fit, X_val, y_val, X_all, y_all, _ = data
    val = float("nan")
    if X_val is not None and len(p.C_grid) > 1:
        C, scores = select_C(spec, X_fit, y_fit, X_val, y_val, p.C_grid, p.dropout, seed, p.max_iter, p.solver)
        val = scores[C]
    else:
        C = p.C_grid[0] if len(p.C_grid) == 1 else float(p.default_C)
    clf = LinearClassifier(spec, C, p.dropout, seed, p.max_iter, p.solver).fit(X_all, y_all)
    return mean_class_accuracy(y_test, clf.predict(X_test)), float(C), val


def run_domain_protocol(p: Protocol, dom: DomainProtocol, src: Pool, tgt: Pool, fs: dict, ft: dict,
                        bars: bool = False) -> dict:
    """{(feature, setting, classifier): {"acc": [...], "C": [...], "val": [...]}} over the split seeds (a bar of
    the fits when ``bars``)."""
    results: dict[tuple[str, str, str], dict[str, list]] = {}
    bar = progress(total=len(p.split_seeds) * len(p.features) * len(dom.settings) * len(p.specs),
                   desc=f"decaf_domain: {src.name} -> {tgt.name} classifiers", enabled=bars, unit="fit")
    everything_s, everything_t = np.arange(len(src)), np.arange(len(tgt))
    for seed in p.split_seeds:
        s_idx = per_class_draw(src.labels, everything_s, dom.source_per_class, seed)
        t_idx = per_class_draw(tgt.labels, everything_t, dom.target_per_class, seed)
        test = np.setdiff1d(everything_t, t_idx)
        ys, yt, y_test = src.labels[s_idx], tgt.labels[t_idx], tgt.labels[test]
        for name in p.features:
            Xs, Xt, X_test = fs[name][s_idx], ft[name][t_idx], ft[name][test]
            for setting in dom.settings:
                data = setting_training_data(setting, Xs, ys, Xt, yt, p.val_fraction, seed)
                test_tf = data[-1]
                for spec in p.specs:
                    acc, C, val = fit_eval_domain(p, spec, data, test_tf(X_test), y_test, seed)
                    r = results.setdefault((name, setting, spec.name), {"acc": [], "C": [], "val": []})
                    r["acc"].append(acc)
                    r["C"].append(C)
                    r["val"].append(val)
                    bar.update(1)
    bar.close()
    return results


def summarise_domain(p: Protocol, dom: DomainProtocol, pairs, results: dict, stats: dict, output_dir: Path):
    """(metrics, tables); writes ``decaf_results.json`` and the Table 2.1-shaped table."""
    metrics: dict[str, Any] = {}
    for direction, res in results.items():
        for (name, setting, clf), r in res.items():
            prefix = f"{direction}/{name}/{setting}/{clf}"
            metrics[f"test/{prefix}/mean_class_acc"] = float(np.mean(r["acc"]))
            metrics[f"test/{prefix}/mean_class_acc_std"] = float(np.std(r["acc"]))
    first = next(iter(results))
    r = results[first][tuple(dom.main.split("/"))]
    metrics["test/mean_class_acc"] = float(np.mean(r["acc"]))
    metrics["test/mean_class_acc_std"] = float(np.std(r["acc"]))
    metrics.update({
        "decaf/main": f"{first}/{dom.main}",
        "decaf/directions": list(results),
        "decaf/split_seeds": list(p.split_seeds),
        "decaf/source_per_class": dom.source_per_class,
        "decaf/target_per_class": dom.target_per_class,
        "decaf/pool_sizes": {x.name: len(x) for x in {id(x): x for pair in pairs for x in pair}.values()},
        **extraction_metrics(stats),
    })
    atomic_write_json(output_dir / "decaf_results.json", {
        "split_seeds": p.split_seeds,
        "results": [{"direction": d, "feature": f, "setting": s, "classifier": c, **r}
                    for d, res in results.items() for (f, s, c), r in res.items()],
    })
    tables = [domain_table(results, p.features, dom.settings, p.specs, dom.source_per_class, dom.target_per_class,
                           len(p.split_seeds))]
    write_tables(output_dir, tables)
    return metrics, tables


def domain_pools(datamodule, dom: DomainProtocol, max_images: int | None) -> tuple[Pool, Pool, list]:
    """(source, target, the directions' (src, tgt) pairs), checked: same classes, every class large enough."""
    source = build_pool(datamodule, "all", max_images)
    target = build_pool(instantiate(dom.target_cfg), "all", max_images)
    if source.class_names != target.class_names:
        raise DatasetError(
            f"source '{source.name}' and target '{target.name}' have different classes "
            f"({source.class_names[:5]}... vs {target.class_names[:5]}...): domain adaptation needs the same label set"
        )
    if source.name == target.name:
        target.name = f"{target.name}_target"
    pairs = [(source, target)] + ([(target, source)] if dom.directions == "both" else [])
    for src, tgt in pairs:
        check_domain_pool(src, dom.source_per_class, "source", "decaf_domain.source_per_class")
        check_domain_pool(tgt, dom.target_per_class, "target", "decaf_domain.target_per_class")
    return source, target, pairs


@rank_aware
def run(cfg: DictConfig, trainer, datamodule, model: DecafModule) -> dict:
    """Pool both domains, extract (cached), fit every setting's classifiers over the splits, table and t-SNE."""
    p = Protocol.from_cfg(cfg.decaf, model, check_main=False)
    dom = DomainProtocol.from_cfg(cfg.decaf_domain, p)
    model.use_bf16 = inference_bf16(cfg.decaf.bf16, trainer.precision)  # null: the run's precision, as task=decaf
    fold_conv1_for_grayscale_source(model, cfg.decaf.get("grayscale_source", "auto"))
    with output_dir_of(trainer, Path(cfg.paths.output_dir)) as output_dir:  # under DDP, rank 0 keeps the outputs
        return _run(p, dom, cfg, trainer, datamodule, model, output_dir)


def _run(p: Protocol, dom: DomainProtocol, cfg: DictConfig, trainer, datamodule, model: DecafModule,
         output_dir: Path) -> dict:
    extractor = FeatureExtractor.from_cfg(cfg, model)
    source, target, pairs = domain_pools(datamodule, dom, p.max_images)
    feats = {id(pool): extractor.extract(trainer, pool, p.features, datamodule.eval_batch_size, datamodule.num_workers)
             for pool in (source, target)}
    t0 = time.perf_counter()
    with limit_threads(p.fit_threads):
        results = {f"{s.name}_to_{t.name}": run_domain_protocol(p, dom, s, t, feats[id(s)], feats[id(t)],
                                                                    bars=trainer_bars(trainer))
                   for s, t in pairs}
    metrics, tables = summarise_domain(p, dom, pairs, results, extractor.stats, output_dir)
    metrics["decaf/classifier_seconds"] = time.perf_counter() - t0
    images = {}
    if p.tsne["enabled"]:
        seed = p.split_seeds[0]
        parts = [(source, held_out(source, dom.source_per_class, seed), f"source ({source.name})"),
                 (target, held_out(target, dom.target_per_class, seed), f"target ({target.name})")]
        metrics.update(tsne_stage(p, extractor, trainer, parts, feats_of=feats, path=output_dir / "tsne.png",
                                  batch_size=datamodule.eval_batch_size, num_workers=datamodule.num_workers))
        images["decaf/tsne"] = output_dir / "tsne.png"
    log_to_loggers(trainer, metrics, images, tables)
    return metrics
