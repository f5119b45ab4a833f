"""Activity-recognition tables from per-video test scores (thesis Tables 4.1-4.3), and RGB + flow late fusion.

Every ``task=lrcn_activity`` run writes ``video_scores.npz`` (per-video softmax scores). ``eval.py report=<sweep>``
pairs the runs of a sweep by sequence model and modality (other overrides, e.g. ``dataset.split``, are averaged
over, as the thesis averages its three splits) and prints:

- Table 4.1: rows single frame / LRCN, columns RGB, flow and the fusions ``w_rgb * p_rgb + w_flow * p_flow`` with
  weights 1/2,1/2 and 1/3,2/3 (eval-time, from the two models' saved scores; videos matched by name);
- Table 4.2: per-class accuracy delta LRCN - single frame (for each modality present);
- Table 4.3: per-class accuracy delta LRCN flow - LRCN RGB.

``eval.py fuse=[<rgb run dir | video_scores.npz>, <flow run dir | npz>]`` fuses any two score files (written by
``engine/lrcn/activity.py`` after each run's test).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.lrcn.scores import SCORES_FILE, load_video_scores
from transferrable.core.errors import ConfigError
from transferrable.metrics.classification import per_class_accuracy
from transferrable.viz.tables import render_table, sweep_table

CONFUSION_FILE = "confusion.png"
FUSION_WEIGHTS = ((0.5, 0.5), (1 / 3, 2 / 3))
ROW_LABELS = {"none": "Single frame", "lstm": "LRCN-fc6"}
PAIR_KEYS = ("lrcn.sequence_model", "lrcn.modality")


def _load(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / SCORES_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such score file (written by a task=lrcn_activity test)")
    return load_video_scores(p)


def fuse(rgb: dict, flow: dict, w_rgb: float, w_flow: float) -> tuple[np.ndarray, np.ndarray]:
    """Weighted average of two runs' per-video probabilities over the videos both scored: (scores, labels)."""
    if rgb["classes"] != flow["classes"]:
        raise ConfigError("fusion: the RGB and flow runs have different class lists")
    index = {v: i for i, v in enumerate(flow["videos"])}
    common = [(i, index[v]) for i, v in enumerate(rgb["videos"]) if v in index]
    if not common:
        raise ConfigError("fusion: the RGB and flow runs share no test video")
    a, b = (np.array(x) for x in zip(*common, strict=True))
    if (rgb["labels"][a] != flow["labels"][b]).any():
        raise ConfigError("fusion: the two runs disagree on the labels of the same videos")
    return w_rgb * rgb["scores"][a] + w_flow * flow["scores"][b], rgb["labels"][a]


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float((scores.argmax(1) == labels).mean()) * 100


def per_class(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    return per_class_accuracy(labels, scores.argmax(1), k) * 100


def fusion_line(rgb_path: str | Path, flow_path: str | Path) -> str:
    """``eval.py fuse=[rgb, flow]``: RGB, flow and both fusions as one Markdown table."""
    rgb, flow = _load(rgb_path), _load(flow_path)
    cells = [accuracy(rgb["scores"], rgb["labels"]), accuracy(flow["scores"], flow["labels"])]
    cells += [accuracy(*fuse(rgb, flow, wr, wf)) for wr, wf in FUSION_WEIGHTS]
    return ("| RGB | Flow | 1/2, 1/2 | 1/3, 2/3 |\n|---|---|---|---|\n| "
            + " | ".join(f"{c:.2f}" for c in cells) + " |\n")


def _groups(runs: list[dict]) -> dict[tuple, dict[tuple[str, str], dict]]:
    """Runs with scores, keyed by their other overrides (e.g. the split), then by (sequence model, modality)."""
    scored = [r for r in runs if (Path(r["dir"]) / SCORES_FILE).is_file()]
    # an override that only some runs carry (e.g. lrcn.hidden_flow on the flow runs) does not separate groups
    shared = set.intersection(*(set(r["overrides"]) for r in scored)) - set(PAIR_KEYS) if scored else set()
    out: dict[tuple, dict[tuple[str, str], dict]] = defaultdict(dict)
    for r in scored:
        s = _load(Path(r["dir"]) / SCORES_FILE)
        rest = tuple(sorted((k, v) for k, v in r["overrides"].items() if k in shared))
        out[rest][(s["sequence_model"], s["modality"])] = s
    return out


def _mean_std(values: Sequence[float]) -> list[float] | None:
    # one run: the value alone (no fake "± 0.00"); several (e.g. splits 1-3): mean and std
    if not values:
        return None
    return [float(np.mean(values)), float(np.std(values)) if len(values) > 1 else None]


def table_4_1(groups: dict) -> dict:
    cells: dict[tuple[str, int], list[float]] = defaultdict(list)
    for pair in groups.values():
        for seq in ROW_LABELS:
            rgb, flow = pair.get((seq, "rgb")), pair.get((seq, "flow"))
            if rgb is not None:
                cells[seq, 0].append(accuracy(rgb["scores"], rgb["labels"]))
            if flow is not None:
                cells[seq, 1].append(accuracy(flow["scores"], flow["labels"]))
            if rgb is not None and flow is not None:
                for j, (wr, wf) in enumerate(FUSION_WEIGHTS, 2):
                    cells[seq, j].append(accuracy(*fuse(rgb, flow, wr, wf)))
    n = len(groups)
    rows = [{"label": label, "cells": [_mean_std(cells[seq, j]) for j in range(4)]} for seq, label in ROW_LABELS.items()
            if any(cells[seq, j] for j in range(4))]
    flat = [(i, j, c[0]) for i, row in enumerate(rows) for j, c in enumerate(row["cells"]) if c is not None]
    best = max(flat, key=lambda x: x[2]) if flat else None
    return {
        "title": f"Table 4.1: video accuracy (%), single frame vs LRCN, RGB / flow / weighted average of the two "
                 f"(w_rgb, w_flow){'' if n == 1 else f'; mean ± std over {n} runs (splits)'}",
        "corner": "Model",
        "columns": ["RGB", "Flow", "1/2, 1/2", "1/3, 2/3"],
        "rows": rows,
        **({"bold": [best[0], best[1]]} if best else {}),
    }


def _per_class_delta(groups: dict, a: tuple[str, str], b: tuple[str, str]) -> tuple[list[str], np.ndarray] | None:
    """Per-class accuracy of run ``a`` minus run ``b``, averaged over the groups that have both."""
    deltas, classes = [], None
    for pair in groups.values():
        if a in pair and b in pair:
            classes = pair[a]["classes"]
            k = len(classes)
            deltas.append(per_class(pair[a]["scores"], pair[a]["labels"], k)
                          - per_class(pair[b]["scores"], pair[b]["labels"], k))
    if not deltas:
        return None
    return classes, np.nanmean(np.stack(deltas), 0)


def delta_table(title: str, classes: list[str], delta: np.ndarray, top: int = 10) -> str:
    """Thesis layout: the largest gains (left pair of columns) beside the largest losses (right pair); when
    no class loses, the right pair holds the smallest gains, so the columns say largest / smallest."""
    order = [i for i in np.argsort(-delta) if np.isfinite(delta[i])]
    n = min(top, (len(order) + 1) // 2)
    gains, losses = order[:n], order[::-1][: len(order) - n][:n]
    lines = [f"**{title}**", "", "| Label | Δ (largest) | Label | Δ (smallest) |", "|---|---|---|---|"]
    for r in range(n):
        left = f"{classes[gains[r]]} | {delta[gains[r]]:+.2f}"
        right = f"{classes[losses[r]]} | {delta[losses[r]]:+.2f}" if r < len(losses) else " | "
        lines.append(f"| {left} | {right} |")
    return "\n".join(lines) + "\n"


@sweep_table(order=10)
def activity_tables(runs: list[dict]) -> str:
    """Markdown for ``eval.py report=``: Tables 4.1-4.3 when the sweep holds LRCN activity runs, else ''."""
    groups = _groups(runs)
    if not groups:
        return ""
    out = ["## LRCN activity recognition\n", render_table(table_4_1(groups))]
    for modality in ("rgb", "flow"):
        d = _per_class_delta(groups, ("lstm", modality), ("none", modality))
        if d is not None:
            out.append(delta_table(f"Table 4.2 ({modality}): per-class accuracy Δ, LRCN - single frame", *d))
    d = _per_class_delta(groups, ("lstm", "flow"), ("lstm", "rgb"))
    if d is not None:
        out.append(delta_table("Table 4.3: per-class accuracy Δ, LRCN flow - LRCN RGB", *d))
    confusions = [str(Path(r["dir"]) / CONFUSION_FILE) for r in runs if (Path(r["dir"]) / CONFUSION_FILE).is_file()]
    if confusions:
        out.append("Confusion matrices: " + ", ".join(confusions) + "\n")
    return "\n".join(out)
