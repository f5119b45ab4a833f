"""Table 5.2 layout from a freeze-transfer sweep (``experiment=bigan_transfer``): rows = where the frozen layers
come from, columns = frozen up to conv1..conv5, cells = test accuracy (%).

Every run of such a sweep is a ``task=classify`` run that overrides ``backbone.weights`` and ``backbone.freeze``
and writes ``test/acc`` to ``metrics.json``. ``eval.py report=<sweep>`` pivots them; runs that differ in any
other override (e.g. ``seed``) fill the same cell, printed as mean ± std over them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from transferrable.viz.tables import render_table, sweep_table

WEIGHTS_KEY, FREEZE_KEY, METRIC = "backbone.weights", "backbone.freeze", "test/acc"
DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "digits": "digits"}
RANDOM_SPECS = ("null", "None", "none", "~", "")


def source_label(spec: str) -> str:
    """A ``backbone.weights`` value as the thesis names the row."""
    spec = str(spec).replace("\\:", ":")  # Hydra writes a sweep value's ':' escaped in overrides.yaml
    kind, _, name = spec.partition(":")
    pretty = DATASET_NAMES.get(name, name)
    if spec in RANDOM_SPECS:
        return "Random"
    if kind == "bigan" and name:
        return "BiGAN (ours)" if name == "fashion_mnist" else f"BiGAN (ours, {pretty})"
    if kind == "source" and name:
        return f"Supervised ({pretty})"
    if spec.startswith("hub"):  # an architecture's ImageNet weights (EfficientNet-Lite offline, the others online)
        return "Supervised (ImageNet)"
    return spec  # a checkpoint path: shown as given


def _row_order(spec: str) -> tuple[int, str]:
    label = source_label(spec)
    rank = 0 if label.startswith("BiGAN") else 1 if label == "Random" else 2 if label.startswith("Supervised") else 3
    return rank, label


def _layer_index(freeze: str) -> tuple[int, str]:
    m = re.fullmatch(r"conv(\d+)", str(freeze))
    return (int(m.group(1)), "") if m else (99, str(freeze))


def _cell(values: Sequence[float]) -> list[float] | None:
    if not values:
        return None
    return [float(values[0])] if len(values) == 1 else [float(np.mean(values)), float(np.std(values))]


def table_5_2(runs: list[dict]) -> dict | None:
    """The pivot as a ``tables.json``-style table, or None when the runs are no freeze-transfer sweep."""
    runs = [r for r in runs if FREEZE_KEY in r["overrides"] and WEIGHTS_KEY in r["overrides"]
            and isinstance(r["metrics"].get(METRIC), int | float)]
    if len({r["overrides"][FREEZE_KEY] for r in runs}) < 2 and len({r["overrides"][WEIGHTS_KEY] for r in runs}) < 2:
        return None
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in runs:
        cells[r["overrides"][WEIGHTS_KEY], r["overrides"][FREEZE_KEY]].append(100 * float(r["metrics"][METRIC]))
    specs = sorted({s for s, _ in cells}, key=_row_order)
    layers = sorted({f for _, f in cells}, key=_layer_index)
    rows = [{"label": source_label(s), "cells": [_cell(cells.get((s, f), [])) for f in layers]} for s in specs]
    repeats = max(len(v) for v in cells.values())
    return {
        "title": "Table 5.2 layout: test accuracy (%) with the layers up to the column's frozen (transferred from "
                 "the row's source; the rest re-initialised and trained supervised)"
                 + ("" if repeats == 1 else f"; mean ± std over up to {repeats} runs per cell"),
        "corner": "frozen up to",
        "columns": layers,
        "rows": rows,
    }


@sweep_table(order=20)
def transfer_tables(runs: list[dict]) -> str:
    """Markdown for ``eval.py report=``: the Table 5.2 pivot when the sweep is a freeze-transfer sweep, else ''."""
    table = table_5_2(runs)
    return "" if table is None else "## Transfer by freezing layers\n\n" + render_table(table)
