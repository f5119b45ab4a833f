"""Turn the suite's known user-facing errors into one clear line and a non-zero exit, not a traceback.

A leaf of the import graph: it imports nothing of the project, so every layer can use it. An error is
user-facing when its class derives from :class:`UserError` (``ConfigError``, ``DatasetError``,
``models.weights.WeightsError``, ``models.backbones.UnknownTapError``, ...), wherever it is defined.
"""

from __future__ import annotations

import functools
import logging
import os
import re
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


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def framework_error_line(err: BaseException) -> str | None:
    """One line for Hydra's and Lightning's own failures that a config value causes: an object ``instantiate`` could
    not build (e.g. a torchmetrics ``ValueError``), and Lightning's ``MisconfigurationException``; None for others."""
    from hydra.errors import InstantiationException

    if isinstance(err, InstantiationException):
        text = str(err)
        key = re.search(r"full_key: (\S+)", text)
        target = re.search(r"target '([^']+)'", text)
        where = key.group(1) if key else (target.group(1) if target else "a config node")
        cause = err.__cause__ or err
        return f"{where}: could not be built ({_first_line(cause)})"
    lightning_errors = sys.modules.get("lightning.fabric.utilities.exceptions")  # imported only if Lightning ran
    if lightning_errors is not None and isinstance(err, lightning_errors.MisconfigurationException):
        return f"trainer: {_first_line(err).split(': ', 1)[1]}"
    return None


def exit_on_user_error(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            exc._raised_in_task = True  # type: ignore[attr-defined]  # run_entry_point leaves it as it is
            err = find_user_error(exc)
            line = one_line(err) if err is not None else framework_error_line(exc)
            if line is None or "TRANSFERRABLE_TRACEBACK" in os.environ:
                raise
            print(f"error: {line}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


def run_entry_point(main) -> None:
    """Run a ``@hydra.main`` function so that Hydra's own failures before the task (a run directory it cannot
    create, an unknown config option, a bad override) end in one ``error:`` line and exit 2, as ours do. Hydra
    prints those as a stripped traceback with exit 1 unless ``HYDRA_FULL_ERROR=1`` lets them through to here."""
    from hydra.errors import HydraException

    if "HYDRA_FULL_ERROR" in os.environ or "TRANSFERRABLE_TRACEBACK" in os.environ:
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as exc:
        if getattr(exc, "_raised_in_task", False):
            raise  # the task's own error, already past exit_on_user_error: a bug, shown in full
        if isinstance(exc, HydraException):  # (MissingConfigException is an OSError too)
            text = str(exc).split("Config search path:")[0]  # Hydra's search path: not the user's concern
            parts = [ln.strip() for ln in text.splitlines() if ln.strip()]
            line = "; ".join(parts).replace(":; ", ": ") or type(exc).__name__
        elif isinstance(exc, OSError):
            where = exc.filename or "the run directory"
            line = f"cannot create {where} (hydra.run.dir / hydra.sweep.dir): {exc.strerror or _first_line(exc)}"
        else:
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(2)
