"""Writing a plot: the PNG and, beside it, the plotted numbers as JSON (``<name>.json``), both atomically.

The JSON is what was drawn, so a test (or a reader) checks a figure against the table it shows without reading
pixels. Figures are ``matplotlib.figure.Figure`` on the Agg canvas: no pyplot state, no display needed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from transferrable.core.atomic import atomic_write_bytes, atomic_write_json


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def data_path(png: str | Path) -> Path:
    """Where the plotted numbers of ``png`` are written."""
    return Path(png).with_suffix(".json")


def save_plot(fig, path: str | Path, data: Any, dpi: int = 110) -> Path:
    """``path`` (PNG) and :func:`data_path` (``data`` as JSON), each written atomically; returns ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_json(data_path(path), data)
    return atomic_write_bytes(path, buf.getvalue())
