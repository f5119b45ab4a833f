"""A test-only callback (``+callbacks.kill._target_=tests.kill_switch.KillAtStep +callbacks.kill.step=N``) that
SIGKILLs its own process after N optimiser steps: a hard crash mid-epoch, with no chance to clean up."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
