"""One progress-bar style for the suite's long stages outside Lightning's loops (tqdm on stderr).

``progress(iterable, desc, total, enabled)`` wraps a loop. A bar is shown only when ``enabled`` (a datamodule's
``progress`` flag, or :func:`trainer_bars` for a pipeline: Lightning's bar is on, i.e. ``trainer.enable_progress_bar``
and ``callbacks.progress_bar.refresh_rate`` > 0), stderr is a terminal (a log file gets no ``\\r`` lines) and this is
rank 0 (one bar under DDP). Tests force the terminal check with :func:`assume_tty`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator

_ASSUME_TTY = False


def _rank_zero() -> bool:
    dist = sys.modules.get("torch.distributed")  # a process group exists only if torch.distributed was imported
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    # before the process group exists, a DDP child knows its rank from the launcher's environment
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def bars_shown(enabled: bool = True) -> bool:
    """Whether a bar asked for with ``enabled`` is drawn here (terminal, rank 0)."""
    return bool(enabled) and (_ASSUME_TTY or sys.stderr.isatty()) and _rank_zero()


def progress(iterable: Iterable | None = None, desc: str = "", total: int | None = None, enabled: bool = True,
             unit: str = "it", **kwargs):
    """A tqdm bar on stderr over ``iterable`` (or a manual one: ``with progress(total=n) as bar: bar.update()``),
    silent unless :func:`bars_shown`."""
    from tqdm import tqdm

    kwargs.setdefault("leave", False)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=not bars_shown(enabled), **kwargs)


def trainer_bars(trainer) -> bool:
    """Whether the run shows bars: the trainer has an enabled progress-bar callback (``refresh_rate`` > 0)."""
    bar = getattr(trainer, "progress_bar_callback", None)
    return bar is not None and bool(getattr(bar, "is_enabled", True))


@contextlib.contextmanager
def assume_tty() -> Iterator[None]:
    """Draw enabled bars as if stderr were a terminal (tests capture stderr, which is not one)."""
    global _ASSUME_TTY
    before, _ASSUME_TTY = _ASSUME_TTY, True
    try:
        yield
    finally:
        _ASSUME_TTY = before
