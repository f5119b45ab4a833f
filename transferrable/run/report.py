"""Ablation reports (``eval.py report=<multirun dir>``): the reporting core with every table builder registered.

The core (runs, Markdown tables, the builder registry) is :mod:`transferrable.viz.tables`; each method's
``engine/<method>/*report.py`` registers its tables there with ``@sweep_table``. Importing this module imports them
all (``load_method_reports``: a new method's report needs no edit here), so :func:`write_report` gives the full
report.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from transferrable.run.methods import load_method_reports
from transferrable.viz.sweep_plots import plot_file_name, varying_knobs
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
log = logging.getLogger(__name__)

__all__ = ["METRICS_FILE", "TABLES_FILE", "collect_runs", "markdown_table", "render_table", "run_tables",
           "sweep_table", "sweep_table_builders", "write_report", "log_plots_to_wandb"]


def log_plots_to_wandb(sweep_dir: str | Path, project: str = "transferrable", base_url: str | None = None) -> bool:
    """The sweep's knob plots (written by :func:`write_report`) to a W&B run of their own (``job_type=report``),
    when online logging can work (an API key, the server answers, ``WANDB_MODE`` is not offline); else one warning.
    Returns whether they were logged."""
    from transferrable.core.wandb_logger import why_offline

    sweep_dir = Path(sweep_dir)
    plots = [sweep_dir / plot_file_name(k) for k in varying_knobs(collect_runs(sweep_dir))]
    plots = [p for p in plots if p.is_file()]
    reason = "WANDB_MODE=offline" if os.environ.get("WANDB_MODE") == "offline" else why_offline(base_url)
    if reason or not plots:
        log.warning("report_wandb: not logged (%s); the plots are in %s", reason or "no plot", sweep_dir)
        return False
    import wandb

    run = wandb.init(project=project, job_type="report", name=f"report-{sweep_dir.name}", reinit=True)
    try:
        run.log({f"report/{p.stem}": wandb.Image(str(p)) for p in plots})
    finally:
        run.finish()
    return True
