"""Ablation reports (``eval.py report=<multirun dir>``): the reporting core with every table builder registered.

The core (runs, Markdown tables, the builder registry) is :mod:`transferrable.viz.tables`; each builder
module registers its tables there with ``@sweep_table``. Importing this module imports them all, so
:func:`write_report` here gives the full report. A new builder module is added to the import below.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from engine.bigan import transfer_report  # noqa: F401  (imported to register their sweep tables)
from engine.lrcn import report as lrcn_report  # noqa: F401
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
