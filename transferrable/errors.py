"""Turn the suite's known user-facing errors into one clear line and a non-zero exit, not a traceback."""

from __future__ import annotations

import functools
import logging
import sys

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A one-line, user-facing problem with a task's settings (an unknown classifier name, ...)."""


class TrainingFault(RuntimeError):
    """Training cannot go on (e.g. a NaN/Inf loss); the message says what was kept and how to resume."""


def user_error_types() -> tuple[type[BaseException], ...]:
    from datamodules.base import DatasetError
    from models.backbones import UnknownTapError
    from models.weights import WeightsError

    return (DatasetError, UnknownTapError, WeightsError, ConfigError, TrainingFault, FileNotFoundError)


def find_user_error(err: BaseException | None) -> BaseException | None:
    """``err`` or the user error it wraps: Hydra's ``instantiate`` re-raises a constructor's error as an
    ``InstantiationException`` whose ``__cause__`` is the original."""
    from hydra.errors import InstantiationException

    while isinstance(err, InstantiationException):
        err = err.__cause__
    return err if isinstance(err, user_error_types()) else None


def exit_on_user_error(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            err = find_user_error(exc)
            if err is None or "TRANSFERRABLE_TRACEBACK" in __import__("os").environ:
                raise
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
