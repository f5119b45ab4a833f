"""Build the suite's own objects for benchmarks: Hydra-composed configs and a Fashion-MNIST-shaped fixture."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from bench import ROOT

CONF_DIR = ROOT / "conf"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# train.yaml made quiet and side-effect free: no logger, no callbacks, CPU, nothing written but a temp dir.
QUIET = [
    "task=classify",
    "logger=none",
    "callbacks=none",
    "hardware=cpu",
    "trainer.enable_model_summary=false",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_checkpointing=false",
]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Lightning's info banners and warnings (e.g. "few workers") while an entry measures."""
    names = ("lightning.pytorch", "lightning.fabric")
    levels = {n: logging.getLogger(n).level for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in names:
            logging.getLogger(n).setLevel(logging.WARNING)
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


def compose_train(overrides: Sequence[str] = ()):
    """Compose ``conf/train.yaml`` in-process (the config ``train.py`` would get), hydra node included."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", return_hydra_config=True, overrides=list(overrides))


@contextlib.contextmanager
def train_config(overrides: Sequence[str] = ()) -> Iterator:
    """A composed, quiet train config whose outputs go to a temp dir and whose ``${hydra:...}`` resolve."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        cfg = compose_train([*QUIET, *overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = cfg.hydra.runtime.output_dir = tmp
            cfg.paths.log_dir = str(Path(tmp) / "logs")
            cfg.paths.cache_dir = str(Path(tmp) / "cache")
            cfg.hydra.job.num = 0
        from transferrable.run.runner import apply_precision_policy

        apply_precision_policy(cfg)  # hardware=cpu's ``auto`` -> what this CPU runs natively
        hydra_config = HydraConfig.instance()
        previous = hydra_config.cfg
        hydra_config.set_config(cfg)
        try:
            yield cfg
        finally:
            hydra_config.cfg = previous


def write_idx(path: Path, array: np.ndarray) -> None:
    """A uint8 array in the (uncompressed) IDX format of (Fashion-)MNIST."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def fashion_mnist_fixture(directory: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Random 28x28 uint8 images with 10 balanced labels, in Fashion-MNIST's file layout."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % 10)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels)
    return directory
