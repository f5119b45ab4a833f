"""The reporting core: one Markdown table from every run of a Hydra multirun, and the registry of sweep tables.

Each run writes ``metrics.json`` in its output directory and Hydra writes ``.hydra/overrides.yaml``
beside it; rows are labelled by the overrides that differ between runs, columns are metrics.

A run may also write ``tables.json``: tables shaped like the thesis's (e.g. DeCAF's Figure 2.3 left,
classifier x feature), each ``{"title", "corner", "columns", "rows": [{"label", "cells": [[mean, std] |
[value] | null, ...]}], ["bold": [row, col]]}`` with cells in percent; a one-element cell is a single run's
value and prints without a (fake) std. The report prints them after the run table.
Tables flagged ``"merge_runs": true`` (one row per run, e.g. LRCN's Table 4.5/4.6 layouts) are merged
into one table across the runs of a sweep. Each swept knob is also plotted against the metric
(:mod:`transferrable.viz.sweep_plots`: ``knob_<knob>.png`` + ``.json`` beside ``report.md``, linked at its end).

Tables built across the runs of a sweep (LRCN's Tables 4.1-4.3, Table 5.2) come from builders that register
here with :func:`sweep_table`; this module imports none of them. ``transferrable.run.report`` (what eval.py and
the tests use) imports every builder the suite has, so its ``write_report`` is the full report.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from transferrable.core.atomic import atomic_write_text
from transferrable.viz.sweep_plots import plot_sweep

METRICS_FILE = "metrics.json"  # written by transferrable.run.runner.train in every run's output directory
TABLES_FILE = "tables.json"

SweepTable = Callable[[list[dict]], str]
_SWEEP_TABLES: dict[SweepTable, int] = {}  # builder -> its place in the report


def collect_runs(sweep_dir: str | Path) -> list[dict]:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"report={str(sweep_dir)!r}: no such multirun directory")
    runs = []
    for metrics_file in sorted(sweep_dir.rglob(METRICS_FILE), key=lambda p: _run_order(p.parent, sweep_dir)):
        run_dir = metrics_file.parent
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        runs.append({
            "dir": run_dir,
            "overrides": dict(o.split("=", 1) for o in overrides if "=" in o),
            "metrics": json.loads(metrics_file.read_text()),
        })
    if not runs:
        raise FileNotFoundError(
            f"report={str(sweep_dir)!r}: no run with {METRICS_FILE} below it (expected <dir>/<job>/{METRICS_FILE})"
        )
    return runs


def _run_order(run_dir: Path, root: Path):
    parts = run_dir.relative_to(root).parts
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def markdown_table(runs: list[dict], metrics: Sequence[str] | None = None) -> str:
    keys = sorted({k for r in runs for k in r["overrides"]})
    varying = [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1] or keys
    if metrics is None:
        metrics = sorted({k for r in runs for k, v in r["metrics"].items() if isinstance(v, int | float)})
    header = [*varying, *metrics] or ["run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        row = [r["overrides"].get(k, "-") for k in varying] + [_fmt(r["metrics"].get(m)) for m in metrics]
        lines.append("| " + " | ".join(row or [r["dir"].name]) + " |")
    return "\n".join(lines) + "\n"


def render_table(table: dict) -> str:
    """One ``tables.json`` table as Markdown: ``mean ± std`` (or single-value) cells, the ``bold`` cell in bold."""
    bold = tuple(table.get("bold") or ())
    lines = [f"**{table['title']}**", "", "| " + " | ".join([table.get("corner", ""), *table["columns"]]) + " |",
             "|" + "---|" * (len(table["columns"]) + 1)]
    for i, row in enumerate(table["rows"]):
        cells = []
        for j, c in enumerate(row["cells"]):
            if c is None:
                text = "-"
            elif len(c) < 2 or c[1] is None:
                text = f"{c[0]:.2f}"
            else:
                text = f"{c[0]:.2f} ± {c[1]:.2f}"
            cells.append(f"**{text}**" if (i, j) == bold else text)
        lines.append("| " + " | ".join([row["label"], *cells]) + " |")
    return "\n".join(lines) + "\n"


def run_tables(runs: list[dict]) -> str:
    """The thesis-shaped tables of every run that wrote ``tables.json``, headed by the run's overrides."""
    keys = sorted({k for r in runs for k in r["overrides"]})
    varying = [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1]
    out = []
    merged: dict[str, dict] = {}
    for r in runs:
        path = Path(r["dir"]) / TABLES_FILE
        if not path.is_file():
            continue
        label = ", ".join(f"{k}={r['overrides'].get(k, '-')}" for k in varying)
        tables = json.loads(path.read_text())
        for t in tables:
            if t.get("merge_runs"):
                m = merged.setdefault(t["title"], {**t, "rows": []})
                seen = {row["label"] for row in m["rows"]}  # the run's overrides only where labels repeat
                m["rows"] += [{**row, "label": row["label"] + (f" [{label}]" if row["label"] in seen and label else "")}
                              for row in t["rows"]]
        rest = [t for t in tables if not t.get("merge_runs")]
        if label and rest:
            out.append(f"### {label}\n")
        out += [render_table(t) for t in rest]
    return "\n".join([render_table(t) for t in merged.values()] + out)


def sweep_table(order: int) -> Callable[[SweepTable], SweepTable]:
    """Register ``build(runs) -> Markdown`` (``''`` when the sweep is not its kind) as a table across the runs
    of a sweep, e.g. LRCN's RGB + flow fusion. ``order`` places it in the report, whatever the import order."""

    def register(build: SweepTable) -> SweepTable:
        _SWEEP_TABLES[build] = order
        return build

    return register


def sweep_table_builders() -> list[SweepTable]:
    """The registered sweep-table builders, in report order."""
    return sorted(_SWEEP_TABLES, key=lambda build: (_SWEEP_TABLES[build], build.__module__, build.__qualname__))


def write_report(sweep_dir: str | Path, metrics: Sequence[str] | None = None) -> str:
    runs = collect_runs(sweep_dir)
    table = markdown_table(runs, metrics)
    extra = run_tables(runs)
    if extra:
        table += "\n" + extra
    for build in sweep_table_builders():
        sweep = build(runs)
        if sweep:
            table += "\n" + sweep
    plots = plot_sweep(runs, sweep_dir, metrics)
    if plots:
        table += "\n**Plots** (the numbers drawn: the .json beside each)\n\n" + "".join(
            f"![{p.stem}]({p.name})\n" for p in plots)
    atomic_write_text(Path(sweep_dir) / "report.md", table)
    return table
