"""A test-only callback (``+callbacks.kill._target_=tests.kill_switch.KillAtStep +callbacks.kill.step=N``) that
SIGKILLs its own process after N optimiser steps: a hard crash mid-epoch, with no chance to clean up."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]


class KillAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def run_train(args: list[str], run_dir, *extra: str) -> subprocess.CompletedProcess:
    """``python train.py <args> hydra.run.dir=<run_dir> <extra>`` in a subprocess that must not touch a shared
    cache (the kill/resume tests run the same command twice, killed once)."""
    from zygote import (
        run_script,  # forked from a process with the suite imported: ~10 s less start-up per run
    )

    env = {**os.environ, "TRANSFERRABLE_CACHE": "/nonexistent-cache-should-not-be-used"}
    return run_script(["train.py", *args, f"hydra.run.dir={run_dir}", *extra], cwd=ROOT, env=env, timeout=300)


class SignalAtStep(L.Callback):
    """Sends ``signum`` (default SIGTERM) to its own process after N optimiser steps: a polite stop mid-epoch."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.step, self.signum, self.sent = int(step), int(signum), False

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class SignalOnceAtStep(L.Callback):
    """Sends ``signum`` to its own process after N optimiser steps, once per ``marker`` file (so a requeued job that
    reaches step N again runs on): SLURM's time-limit warning (USR2) arriving mid-epoch."""

    def __init__(self, step: int, signum: int, marker: str) -> None:
        self.step, self.signum, self.marker = int(step), int(signum), Path(marker)

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), self.signum)
