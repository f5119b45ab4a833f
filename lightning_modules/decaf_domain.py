"""task=decaf_domain: DeCAF for supervised domain adaptation (thesis ch. 2.3.2, Table 2.1).

The run's ``dataset`` is the source domain, ``decaf_domain.target`` (a dataset config, e.g.
``dataset@decaf_domain.target=digits``) the target domain; both must have the same classes. Features are
extracted (and cached) for both pools exactly as in ``task=decaf``. For each split seed:

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
setting, columns: direction x feature).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from omegaconf import DictConfig

from datamodules.base import DatasetError
from lightning_modules.decaf import (
    DecafModule,
    Pool,
    _cell,
    build_pool,
    feature_label,
    limit_threads,
    log_to_loggers,
    per_class_draw,
    plain,
)
from models.backbones import TapBackbone
from models.linear_classifiers import (
    ClassifierSpec,
    LinearClassifier,
    can_validate,
    daume_augment,
    mean_class_accuracy,
    select_C,
    validation_subsplit,
)
from transferrable.errors import ConfigError

SETTINGS = ("S", "T", "ST", "daume")
SETTING_LABELS = {"S": "S", "T": "T", "ST": "ST", "daume": "Daumé III"}


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


class DecafDomainModule(DecafModule):
    def __init__(
        self,
        backbone: TapBackbone,
        num_classes: int | None = None,
        target: DictConfig | dict | None = None,
        settings: Sequence[str] = SETTINGS,
        source_per_class: int | None = 20,
        target_per_class: int = 3,
        directions: str = "both",
        main: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(backbone, num_classes, main=main or "best_val", **kwargs)
        self.target_cfg = plain(target)
        if not self.target_cfg or "_target_" not in self.target_cfg:
            raise ConfigError("decaf_domain.target: a dataset config is needed (e.g. dataset@decaf_domain.target=digits)")
        self.settings = [str(s) for s in plain(settings)]
        for s in self.settings:
            if s not in SETTINGS:
                raise ConfigError(f"decaf_domain.settings: unknown setting {s!r}; choices: {list(SETTINGS)}")
        if directions not in ("both", "forward"):
            raise ConfigError(f"decaf_domain.directions={directions!r}: expected 'both' or 'forward'")
        self.source_per_class = None if source_per_class is None else int(source_per_class)
        self.target_per_class = int(target_per_class)
        if self.target_per_class < 1 or (self.source_per_class is not None and self.source_per_class < 1):
            raise ConfigError("decaf_domain.source_per_class/target_per_class: expected >= 1 (source: or null for all)")
        combos = [f"{f}/{s}/{c.name}" for f in self.features for s in self.settings for c in self.specs]
        if main is None:
            main = "fc6/daume/svm" if "fc6/daume/svm" in combos else combos[-1]
        if main not in combos:
            raise ConfigError(f"decaf_domain.main={main!r}: expected one of {combos}")
        self.da_main = main

    def _check_domain_pool(self, pool: Pool, n: int | None, role: str, what: str) -> None:
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

    def run_task(self, trainer: L.Trainer, datamodule, output_dir: str | Path) -> dict:
        from hydra.utils import instantiate

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self._reset_stats()
        source = build_pool(datamodule, "all", self.hparams.max_images)
        target = build_pool(instantiate(self.target_cfg), "all", self.hparams.max_images)
        if source.class_names != target.class_names:
            raise DatasetError(
                f"source '{source.name}' and target '{target.name}' have different classes "
                f"({source.class_names[:5]}... vs {target.class_names[:5]}...): domain adaptation needs the same label set"
            )
        if source.name == target.name:
            target.name = f"{target.name}_target"
        pairs = [(source, target)] + ([(target, source)] if self.hparams.directions == "both" else [])
        for src, tgt in pairs:
            self._check_domain_pool(src, self.source_per_class, "source", "decaf_domain.source_per_class")
            self._check_domain_pool(tgt, self.target_per_class, "target", "decaf_domain.target_per_class")
        feats = {
            id(p): self.extract(trainer, p, self.features, datamodule.eval_batch_size, datamodule.num_workers)
            for p in (source, target)
        }
        t0 = time.perf_counter()
        with limit_threads(self.hparams.fit_threads):
            results = {f"{s.name}_to_{t.name}": self.run_domain_protocol(s, t, feats[id(s)], feats[id(t)])
                       for s, t in pairs}
        metrics = self.summarise_domain(pairs, results, output_dir)
        metrics["decaf/classifier_seconds"] = time.perf_counter() - t0
        images = {}
        if self.tsne["enabled"]:
            metrics.update(self.plot_tsne(
                trainer, [(source, self.held_out(source, self.source_per_class), f"source ({source.name})"),
                          (target, self.held_out(target, self.target_per_class), f"target ({target.name})")],
                feats_of=feats, path=output_dir / "tsne.png", batch_size=datamodule.eval_batch_size,
                num_workers=datamodule.num_workers,
            ))
            images["decaf/tsne"] = output_dir / "tsne.png"
        log_to_loggers(trainer, metrics, images, self._tables)
        return metrics

    def held_out(self, pool: Pool, n: int | None) -> np.ndarray:
        """Rows of ``pool`` not labelled for training in the first split (every row when ``n`` is None)."""
        everything = np.arange(len(pool))
        if n is None:
            return everything
        return np.setdiff1d(everything, per_class_draw(pool.labels, everything, n, self.split_seeds[0]))

    def run_domain_protocol(self, src: Pool, tgt: Pool, fs: dict, ft: dict) -> dict:
        """{(feature, setting, classifier): {"acc": [...], "C": [...], "val": [...]}} over the split seeds."""
        results: dict[tuple[str, str, str], dict[str, list]] = {}
        everything_s, everything_t = np.arange(len(src)), np.arange(len(tgt))
        for seed in self.split_seeds:
            s_idx = per_class_draw(src.labels, everything_s, self.source_per_class, seed)
            t_idx = per_class_draw(tgt.labels, everything_t, self.target_per_class, seed)
            test = np.setdiff1d(everything_t, t_idx)
            ys, yt, y_test = src.labels[s_idx], tgt.labels[t_idx], tgt.labels[test]
            for name in self.features:
                Xs, Xt, X_test = fs[name][s_idx], ft[name][t_idx], ft[name][test]
                for setting in self.settings:
                    data = setting_training_data(setting, Xs, ys, Xt, yt, self.hparams.val_fraction, seed)
                    X_fit, y_fit, X_val, y_val, X_all, y_all, test_tf = data
                    for spec in self.specs:
                        acc, C, val = self._fit_eval_domain(spec, data, test_tf(X_test), y_test, seed)
                        r = results.setdefault((name, setting, spec.name), {"acc": [], "C": [], "val": []})
                        r["acc"].append(acc)
                        r["C"].append(C)
                        r["val"].append(val)
        return results

    def _fit_eval_domain(self, spec: ClassifierSpec, data, X_test, y_test, seed: int):
        X_fit, y_fit, X_val, y_val, X_all, y_all, _ = data
        val = float("nan")
        if X_val is not None and len(self.C_grid) > 1:
            C, scores = select_C(spec, X_fit, y_fit, X_val, y_val, self.C_grid, self.dropout, seed, self.hparams.max_iter)
            val = scores[C]
        else:
            C = self.C_grid[0] if len(self.C_grid) == 1 else float(self.hparams.default_C)
        clf = LinearClassifier(spec, C, self.dropout, seed, self.hparams.max_iter).fit(X_all, y_all)
        return mean_class_accuracy(y_test, clf.predict(X_test)), float(C), val

    def summarise_domain(self, pairs, results: dict, output_dir: Path) -> dict:
        from transferrable.atomic import atomic_write_json, atomic_write_text
        from transferrable.report import TABLES_FILE, render_table

        metrics: dict[str, Any] = {}
        for direction, res in results.items():
            for (name, setting, clf), r in res.items():
                p = f"{direction}/{name}/{setting}/{clf}"
                metrics[f"test/{p}/mean_class_acc"] = float(np.mean(r["acc"]))
                metrics[f"test/{p}/mean_class_acc_std"] = float(np.std(r["acc"]))
        first = next(iter(results))
        main = tuple(self.da_main.split("/"))
        r = results[first][main]
        metrics["test/mean_class_acc"] = float(np.mean(r["acc"]))
        metrics["test/mean_class_acc_std"] = float(np.std(r["acc"]))
        metrics.update({
            "decaf/main": f"{first}/{self.da_main}",
            "decaf/directions": list(results),
            "decaf/split_seeds": list(self.split_seeds),
            "decaf/source_per_class": self.source_per_class,
            "decaf/target_per_class": self.target_per_class,
            "decaf/pool_sizes": {p.name: len(p) for p in {id(x): x for pair in pairs for x in pair}.values()},
            "decaf/cache_hits": self._stats["cache_hits"],
            "decaf/cache_misses": self._stats["cache_misses"],
            "decaf/extract_seconds": self._stats["extract_seconds"],
        })
        atomic_write_json(output_dir / "decaf_results.json", {
            "split_seeds": self.split_seeds,
            "results": [{"direction": d, "feature": f, "setting": s, "classifier": c, **r}
                        for d, res in results.items() for (f, s, c), r in res.items()],
        })
        self._tables = [self.domain_table(results)]
        atomic_write_json(output_dir / TABLES_FILE, self._tables)
        atomic_write_text(output_dir / "decaf_tables.md", "\n".join(render_table(t) for t in self._tables))
        return metrics

    def domain_table(self, results: dict) -> dict:
        """Table 2.1 shape: rows = classifier (setting), columns = direction x feature."""
        columns = [(d, f) for d in results for f in self.features]
        rows = []
        for setting in self.settings:
            for spec in self.specs:
                label = (f"{SETTING_LABELS[setting]} ({spec.label})" if setting == "daume"
                         else f"{spec.label} ({SETTING_LABELS[setting]})")
                rows.append({"label": label, "cells": [_cell(results[d][(f, setting, spec.name)]["acc"])
                                                       for d, f in columns]})
        src = f"{self.source_per_class}" if self.source_per_class is not None else "all"
        return {
            "title": (f"Domain adaptation: mean per-class accuracy (%) on held-out target images; {src} labelled "
                      f"source and {self.target_per_class} labelled target images per class; mean ± std over "
                      f"{len(self.split_seeds)} splits"),
            "corner": "method",
            "columns": [f"{d.replace('_to_', ' → ')} {feature_label(f)}" for d, f in columns],
            "rows": rows,
        }
