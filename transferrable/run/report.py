"""Ablation reports (``eval.py report=<multirun dir>``): the reporting core with every table builder registered.

The core (runs, Markdown tables, the builder registry) is :mod:`transferrable.viz.tables`; each builder
module registers its tables there with ``@sweep_table``. Importing this module imports them all, so
:func:`write_report` here gives the full report. A new builder module is added to the import below.
"""

from __future__ import annotations

from engine.bigan import transfer_report  # noqa: F401  (imported to register their sweep tables)
from engine.lrcn import report as lrcn_report  # noqa: F401
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

__all__ = ["METRICS_FILE", "TABLES_FILE", "collect_runs", "markdown_table", "render_table", "run_tables",
           "sweep_table", "sweep_table_builders", "write_report"]
