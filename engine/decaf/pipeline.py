"""task=decaf's pipeline (thesis ch. 2): DeCAF -- frozen activations of a pretrained network + linear classifiers.

1. **Pool** the dataset's images (``datamodules.image_pool``): ``decaf.pool: all`` joins train+val+test and draws
   the protocol's splits from it, ``given`` tests on the DataModule's test split; ``max_images`` caps the pool.
2. **Extract** each entry of ``decaf.features`` once with ``trainer.predict`` (``DecafModule.predict_step``: frozen
   backbone in eval mode under ``torch.inference_mode``; ``channels_last`` and bf16 autocast are switches) and
   cache it on disk (``transferrable.core.feature_cache``; ``decaf.cache_dir``). Features: a backbone tap (``pool5``,
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
(Figure 2.3-left shape: classifier x feature; the few-shot table: method x N; ``engine.decaf.report``),
which ``python eval.py report=<dir>`` prints too; ``fewshot.png`` for a curve; ``tsne.png`` (``decaf.tsne``,
Figure 2.1): t-SNE panels side by side -- default ``[conv1, fc6]``, i.e. the first pooling layer's output (the
thesis's DeCAF1) vs DeCAF6 -- of at most ``max_points`` held-out images (the ``pool: given`` test split, else the
first split's test images), coloured by class, with ``tsne/silhouette_<panel>`` in the metrics. A panel that is
not a classifier feature (conv1 by default) is extracted, and cached, for the plotted images only. Metrics, the
plots and the tables are also logged to every attached logger (W&B: images + tables).

The stages shared with ``task=decaf_domain`` (``engine/decaf/domain.py``) are here: :class:`Protocol` (the
``decaf:`` node, checked), :class:`FeatureExtractor` (cache + ``trainer.predict``), :func:`tsne_stage`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from datamodules.image_pool import Pool, build_pool, check_pool, protocol_split, subset_pool
from engine.decaf.protocol import (
    FeatureExtractor,
    Protocol,
    choose_main,
    extraction_metrics,
    limit_threads,
    run_protocol,
)
from engine.decaf.report import (
    feature_label,
    fewshot_table,
    layer_table,
    log_to_loggers,
    method_label,
    plot_fewshot,
    write_tables,
)
from lightning_modules.decaf import DecafModule
from models.weights import fold_grayscale_source
from transferrable.core.atomic import atomic_write_json
from transferrable.core.distributed import output_dir_of, rank_aware
from transferrable.core.precision import inference_bf16
from transferrable.core.progress import trainer_bars
from transferrable.viz.tsne import draw_tsne, embed_panels, stratified_subsample

log = logging.getLogger(__name__)


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


def fold_conv1_for_grayscale_source(model: DecafModule, setting) -> None:
    """A source learnt on grayscale images never trained conv1's colour components: fold them away (as R-CNN does,
    ``models.weights.fold_grayscale_source``) so a colour target is seen as its channel mean, not through noise."""
    removed = fold_grayscale_source(model.backbone, setting)
    if removed is not None:
        log.info("decaf: grayscale source (%s): conv1 folded to colour-blind filters (%.0f%% of its weight norm was "
                 "untrained colour noise)", getattr(model.backbone, "source_dataset", "?"), 100 * removed)


@rank_aware
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
        results = run_protocol(p, pool, feats, bars=trainer_bars(trainer))
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
