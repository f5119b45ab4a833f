"""DeCAF's tables and figures (thesis ch. 2): Figure 2.3-left (classifier x feature), the few-shot table and
curve, Table 2.1 (domain adaptation), written per run as ``tables.json`` (``report_core``'s format, which
``python eval.py report=<dir>`` prints) + ``decaf_tables.md``, and sent to the run's loggers.

Results come in as ``engine.decaf.pipeline`` / ``engine.decaf.domain`` build them: a dict from (feature, classifier, N) or
(feature, setting, classifier) to ``{"acc": [...], "C": [...], "val": [...]}`` over the split seeds.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lightning_modules.decaf import RANDOM_PREFIX
from transferrable.core.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from transferrable.viz.tables import TABLES_FILE, render_table

FEATURE_LABELS = {"pool5": "DeCAF5", "fc6": "DeCAF6", "fc7": "DeCAF7", "raw": "raw pixels", "hog": "HOG"}
SETTING_LABELS = {"S": "S", "T": "T", "ST": "ST", "daume": "Daumé III"}


def feature_label(name: str) -> str:
    if name.startswith(RANDOM_PREFIX):
        return f"{FEATURE_LABELS.get(name[len(RANDOM_PREFIX):], name[len(RANDOM_PREFIX):])} (random weights)"
    return FEATURE_LABELS.get(name, name)


def method_label(feature: str, spec) -> str:
    return f"{feature_label(feature)}, {spec.label}"


def cell(accs: Sequence[float]) -> list[float]:
    """A table cell: mean and std of the per-split accuracies, in percent."""
    return [100.0 * float(np.mean(accs)), 100.0 * float(np.std(accs))]


def layer_table(name: str, results: dict, features: list[str], specs: list, n: int, main: tuple[str, str],
                n_splits: int) -> dict:
    """Figure 2.3 (left): rows = classifiers, columns = features, mean ± std (%) at N per class."""
    rows = [{"label": spec.label, "cells": [cell(results[(f, spec.name, n)]["acc"]) for f in features]}
            for spec in specs]
    return {
        "title": (f"{name}: mean per-class accuracy (%) with {n} training samples per class, mean ± std "
                  f"over {n_splits} splits (bold: best validation accuracy)"),
        "corner": "classifier",
        "columns": [feature_label(f) for f in features],
        "rows": rows,
        "bold": [[s.name for s in specs].index(main[1]), features.index(main[0])],
    }


def fewshot_table(name: str, results: dict, features: list[str], specs: list, shots: list[int], n_splits: int) -> dict:
    rows = [{"label": method_label(f, s), "cells": [cell(results[(f, s.name, n)]["acc"]) for n in shots]}
            for f in features for s in specs]
    return {
        "title": (f"{name}: few-shot mean per-class accuracy (%) vs training samples per class N, "
                  f"mean ± std over {n_splits} splits"),
        "corner": "method \\ N",
        "columns": [str(n) for n in shots],
        "rows": rows,
    }


def domain_table(results: dict, features: list[str], settings: list[str], specs: list,
                 source_per_class: int | None, target_per_class: int, n_splits: int) -> dict:
    """Table 2.1 shape: rows = classifier (setting), columns = direction x feature."""
    columns = [(d, f) for d in results for f in features]
    rows = []
    for setting in settings:
        for spec in specs:
            label = (f"{SETTING_LABELS[setting]} ({spec.label})" if setting == "daume"
                     else f"{spec.label} ({SETTING_LABELS[setting]})")
            cells = [cell(results[d][(f, setting, spec.name)]["acc"]) for d, f in columns]
            rows.append({"label": label, "cells": cells})
    src = f"{source_per_class}" if source_per_class is not None else "all"
    return {
        "title": (f"Domain adaptation: mean per-class accuracy (%) on held-out target images; {src} labelled "
                  f"source and {target_per_class} labelled target images per class; mean ± std over "
                  f"{n_splits} splits"),
        "corner": "method",
        "columns": [f"{d.replace('_to_', ' → ')} {feature_label(f)}" for d, f in columns],
        "rows": rows,
    }


def write_tables(output_dir: Path, tables: list[dict], fewshot: dict | None = None) -> None:
    """``tables.json`` + ``decaf_tables.md`` (every table), and ``fewshot.md`` for a few-shot table."""
    atomic_write_json(output_dir / TABLES_FILE, tables)
    atomic_write_text(output_dir / "decaf_tables.md", "\n".join(render_table(t) for t in tables))
    if fewshot is not None:
        atomic_write_text(output_dir / "fewshot.md", render_table(fewshot))


def plot_fewshot(curves: dict[str, list[list[float]]], shots: Sequence[int], path: Path, title: str) -> Path:
    """Accuracy (%) vs N with one line per method and std error bars; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def log_to_loggers(trainer, metrics: dict, images: dict[str, Path], tables: list[dict]) -> None:
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
