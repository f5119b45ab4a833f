"""Ablation reports (``eval.py report=<multirun dir>``): the reporting core with every table builder registered.

The core (runs, Markdown tables, the builder registry) is :mod:`transferrable.viz.tables`; each method's
``engine/<method>/*report.py`` registers its tables there with ``@sweep_table``. Importing this module imports them
all (``load_method_reports``: a new method's report needs no edit here), so :func:`write_report` gives the full
report.
"""

from __future__ import annotations

from transferrable.run.methods import load_method_reports
from transferrable.viz.tables import (
    METRICS_FILE,
    TABLES_FILE,
    collect_runs,
    markdown_table,
    render_table,
    run_tables,
    sweep_table,
    sweep_table_builders,
    write_report,
)

REPORT_MODULES = load_method_reports()  # registers every method's sweep tables

__all__ = ["METRICS_FILE", "TABLES_FILE", "collect_runs", "markdown_table", "render_table", "run_tables",
           "sweep_table", "sweep_table_builders", "write_report"]
