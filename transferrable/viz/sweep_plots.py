"""``eval.py report=<sweep>``'s plots: each swept knob against the metric (``knob_<knob>.png`` beside ``report.md``).

A knob is an override that differs between the sweep's runs (the report table's first columns). Its values go on
a numeric axis when every value is a number (sorted), else one tick per value in order of appearance. Runs that
share a knob value and the other knobs' values are one point (mean, with the standard deviation as an error bar
when there are several, e.g. a ``seed`` sweep: ``seed`` itself is averaged over, never plotted); each combination
of the other knobs is one line. The JSON beside each PNG holds every point drawn.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transferrable.viz.plot_files import new_figure, save_plot

REPLICATE_KNOBS = ("seed",)  # averaged over
# the metric plotted when the report names none: the first of these that a run has (each task's headline)
HEADLINE_METRICS = ("test/mAP", "test/mean_iou", "test/mean_class_acc", "test/acc", "test/CIDEr-D", "test/BLEU-4",
                    "val/knn1_acc", "val/acc")


def varying_knobs(runs: list[dict]) -> list[str]:
    keys = sorted({k for r in runs for k in r["overrides"]})
    return [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1]


def plotted_metrics(runs: list[dict], metrics: Sequence[str] | None) -> list[str]:
    """``metrics`` when given, else the headline metric the runs report (else the first numeric ``test/`` one)."""
    if metrics:
        return list(metrics)
    have = {k for r in runs for k, v in r["metrics"].items() if _number(v) is not None}
    for m in HEADLINE_METRICS:
        if m in have:
            return [m]
    tests = sorted(k for k in have if k.startswith("test/"))
    return tests[:1] or sorted(have)[:1]


def _number(v) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def knob_points(runs: list[dict], knob: str, metric: str) -> dict:
    """``{"knob", "metric", "numeric", "ticks", "series": [{"label", "x", "y", "std", "n"}]}``: the points drawn."""
    others = [k for k in varying_knobs(runs) if k != knob and k not in REPLICATE_KNOBS]
    values = list(dict.fromkeys(str(r["overrides"].get(knob, "-")) for r in runs))  # order of appearance
    numeric = all(_number(v) is not None for v in values)
    ticks = sorted(values, key=float) if numeric else values
    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in runs:
        y = _number(r["metrics"].get(metric))
        if y is None:
            continue
        combo = tuple(str(r["overrides"].get(k, "-")) for k in others)
        groups.setdefault(combo, {}).setdefault(str(r["overrides"].get(knob, "-")), []).append(y)
    series = []
    for combo in sorted(groups, key=_series_order(runs, others)):  # lines in the other knobs' axis order
        by_value = groups[combo]
        label = ", ".join(f"{k}={v}" for k, v in zip(others, combo, strict=True))
        xs = [v for v in ticks if v in by_value]
        ys = [by_value[v] for v in xs]
        series.append({"label": label, "x": [float(v) if numeric else v for v in xs],
                       "y": [float(np.mean(v)) for v in ys], "std": [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
                                                                    for v in ys],
                       "n": [len(v) for v in ys]})
    return {"knob": knob, "metric": metric, "numeric": numeric, "ticks": ticks, "series": series}


def _series_order(runs: list[dict], others: list[str]):
    """Sort key of a combination of the other knobs' values: numbers by value, the rest by first appearance."""
    keys = []
    for k in others:
        seen = list(dict.fromkeys(str(r["overrides"].get(k, "-")) for r in runs))
        numeric = all(_number(v) is not None for v in seen)
        keys.append((lambda v: float(v)) if numeric else (lambda v, seen=seen: seen.index(v)))
    return lambda combo: tuple(key(v) for key, v in zip(keys, combo, strict=True))


def plot_file_name(knob: str) -> str:
    return "knob_" + re.sub(r"[^A-Za-z0-9._-]+", "_", knob) + ".png"


def plot_knob(path: str | Path, runs: list[dict], knob: str, metrics: Sequence[str], sweep: str) -> Path:
    """One panel per metric: ``knob`` on x, the metric on y, one line per combination of the other knobs."""
    panels = [knob_points(runs, knob, m) for m in metrics]
    legend = any(s["label"] for p in panels for s in p["series"])
    fig = new_figure(5.2 * len(panels) + 0.8 + (2.6 if legend else 0.0), 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, p in zip(axes, panels, strict=True):
        for s in p["series"]:
            x = s["x"] if p["numeric"] else [p["ticks"].index(v) for v in s["x"]]
            ax.errorbar(x, s["y"], yerr=s["std"] if any(s["std"]) else None, marker="o", capsize=3,
                        label=s["label"] or None)
        if not p["numeric"]:
            ax.set_xticks(range(len(p["ticks"])), p["ticks"], rotation=30 if len(p["ticks"]) > 4 else 0)
            ax.set_xlim(-0.5, len(p["ticks"]) - 0.5)
        elif len(p["ticks"]) > 2 and min(map(float, p["ticks"])) > 0 and \
                max(map(float, p["ticks"])) / min(map(float, p["ticks"])) >= 50:
            ax.set_xscale("log")  # e.g. N per class 1..1000
        if p["numeric"] and len(p["ticks"]) <= 12:
            ax.set_xticks([float(t) for t in p["ticks"]], p["ticks"])  # the swept values themselves
        ax.set_xlabel(knob)
        ax.set_ylabel(p["metric"])
        ax.set_title(f"{p['metric']} vs {knob}", fontsize=10)
        ax.grid(alpha=0.3)
    if legend:  # one legend, outside the panels: the lines are the same in each
        axes[-1].legend(fontsize=8, title="other knobs", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    reps = sorted({k for k in varying_knobs(runs) if k in REPLICATE_KNOBS})
    fig.suptitle(f"sweep {sweep}" + (f" (mean ± std over {', '.join(reps)})" if reps else ""), fontsize=9)
    fig.tight_layout()
    return save_plot(fig, path, {"sweep": sweep, "panels": panels})


def plot_sweep(runs: list[dict], out_dir: str | Path, metrics: Sequence[str] | None = None) -> list[Path]:
    """A plot per swept knob (``seed`` aside) against the plotted metrics, in ``out_dir``; [] for a single run."""
    chosen = plotted_metrics(runs, metrics)
    knobs = [k for k in varying_knobs(runs) if k not in REPLICATE_KNOBS]
    if not chosen or not knobs:
        return []
    out_dir = Path(out_dir)
    return [plot_knob(out_dir / plot_file_name(k), runs, k, chosen, out_dir.name) for k in knobs]
