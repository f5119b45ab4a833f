"""SIGTERM / SIGINT end a run with a non-zero status (143 / 130, as a shell reports a signal), not 0.

Lightning's own SIGTERM handling raises ``SIGTERMException``, a ``SystemExit`` with no code, so ``train.py`` used to
exit 0 with no metrics: a scheduler or ``make`` then took a killed run for a finished one. These handlers raise
``SystemExit(128 + signal)`` instead. Inside ``trainer.fit`` Lightning composes its handler with ours, calls the
callbacks' ``on_exception`` and tears down; ``metrics.json`` is never written. The last epoch-end ``last.ckpt``
stays, and ``ckpt_path=last`` resumes from it exactly (a mid-epoch state cannot be resumed exactly with plain,
non-stateful data loaders, so none is written: the interrupted epoch is redone).
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(SystemExit):
    """A signal asked the run to stop; the exit status is 128 + the signal number."""


def _raise_exit(signum, frame) -> None:
    name = signal.Signals(signum).name
    log.warning("received %s: stopping the run (exit status %d); resume with ckpt_path=last", name, 128 + signum)
    raise RunInterrupted(128 + signum)


def exit_on_signals() -> None:
    """Install the handlers (main thread only; elsewhere Python refuses signal handlers)."""
    if threading.current_thread() is threading.main_thread():
        for sig in HANDLED:
            signal.signal(sig, _raise_exit)
