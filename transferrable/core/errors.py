"""Turn the suite's known user-facing errors into one clear line and a non-zero exit, not a traceback.

A leaf of the import graph: it imports nothing of the project, so every layer can use it. An error is
user-facing when its class derives from :class:`UserError` (``ConfigError``, ``DatasetError``,
``models.weights.WeightsError``, ``models.backbones.UnknownTapError``, ...), wherever it is defined.
"""

from __future__ import annotations

import functools
import logging
import sys

log = logging.getLogger(__name__)


class UserError(Exception):
    """Base of every user-facing error: train.py and eval.py print its message as one line and exit 2.

    Mixed in beside the builtin the error already is (``class DatasetError(UserError, RuntimeError)``), so
    ``except RuntimeError`` still catches it."""


class ConfigError(UserError, ValueError):
    """A one-line, user-facing problem with a task's settings (an unknown classifier name, ...)."""


class DatasetError(UserError, RuntimeError):
    """A one-line, user-facing problem with a dataset on disk (re-exported by ``datamodules.base``)."""


class TrainingFault(UserError, RuntimeError):
    """Training cannot go on (e.g. a NaN/Inf loss); the message says what was kept and how to resume."""


class NonFiniteLossError(TrainingFault):
    """A NaN/Inf loss: training stops before the bad step is applied."""


def last_checkpoint_note(module) -> str:
    """Where the last good checkpoint of ``module``'s run is, for a message that stops training."""
    trainer = getattr(module, "_trainer", None)
    cb = trainer.checkpoint_callback if trainer is not None else None
    last = (cb.last_model_path or cb.best_model_path) if cb is not None else ""
    return (f"the last good checkpoint is {last} (resume with ckpt_path={last})" if last
            else "no checkpoint was written yet")


def user_error_types() -> tuple[type[BaseException], ...]:
    """The errors train.py and eval.py report as one line: every :class:`UserError`, and a missing file."""
    return (UserError, FileNotFoundError)


def find_user_error(err: BaseException | None) -> BaseException | None:
    """``err`` or the user error it wraps: Hydra's ``instantiate`` re-raises a constructor's error as an
    ``InstantiationException`` whose ``__cause__`` is the original."""
    from hydra.errors import InstantiationException

    while isinstance(err, InstantiationException):
        err = err.__cause__
    return err if isinstance(err, user_error_types()) else None


def one_line(err: BaseException) -> str:
    """The user-facing line of ``err``. An error raised in a DataLoader worker comes back re-raised by PyTorch
    as ``Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback ...``: its last line is the
    original message (naming the file), which is what the user needs, not the worker's traceback."""
    msg = str(err)
    if msg.startswith("Caught ") and "Original Traceback" in msg:
        worker = msg.split("\n", 1)[0].removeprefix(f"Caught {type(err).__name__} ").rstrip(".")
        last = [line for line in msg.strip().splitlines() if line.strip()][-1]
        original = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
        return f"{original} (raised {worker})"
    return msg


def exit_on_user_error(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            err = find_user_error(exc)
            if err is None or "TRANSFERRABLE_TRACEBACK" in __import__("os").environ:
                raise
            print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
