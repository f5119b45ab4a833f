"""Exact resume: checkpoints carry the global RNG states (torch, numpy, Python) and a resumed run restores them
when fitting starts, so dropout and any other global draws continue exactly as in an uninterrupted run with the
same seed (``python train.py ... ckpt_path=last``). Shuffling and augmentation are resume-exact on their own
(``datamodules.base.EpochSeededSampler``: a function of seed and epoch, with a private generator).

Lightning restores model, optimiser, scheduler and loop progress but not the global RNG; without this a resumed
run ends with different metrics. States are stored as tensors and plain Python values
so checkpoints still load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch

STATE_KEY = "rng_states"


def collect_rng_states() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(py_state), gauss],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = states["python"]
    random.setstate((version, tuple(py_state), gauss))


class RNGStateCheckpoint(L.Callback):
    """Saves the RNG states with every checkpoint and re-applies them at ``on_fit_start`` of a resumed run
    (Lightning runs the sanity check inside ``isolate_rng``, so it does not disturb them)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[STATE_KEY] = collect_rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(STATE_KEY)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None
