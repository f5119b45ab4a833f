"""Generated detection scenes (``dataset=scenes``): made offline by ``scene_generator``, read as VOC.

The scenes live in ``<root>/<key>/VOCScenes`` (``root`` is ``${paths.cache_dir}/scenes``; ``key`` a hash of
every generation parameter), are generated on first use (``prepare_data``, with a progress bar) and reused
afterwards. Class list: the 10 Fashion-MNIST classes. The scene seed is separate from the run seed, so a
seed sweep trains on the same scenes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from datamodules.scene_generator import (
    CLASSES,
    DATASET_NAME,
    FASHION_MNIST_DIR,
    generate_scenes,
    scene_key,
    scene_params,
)
from datamodules.voc import VOCDetectionDataModule

log = logging.getLogger(__name__)


class GeneratedScenes:
    """Mixin for a VOC-layout DataModule whose directory is the generated scenes: it takes the generation
    parameters instead of ``data_dir``/``classes`` and generates (or reuses) the scenes before ``setup`` reads
    them. The same parameters give the same cached directory, whichever DataModule reads it."""

    def __init__(
        self,
        root: str | Path = ".cache/scenes",
        n_train: int = 300,
        n_val: int = 100,
        n_test: int = 200,
        image_size: Sequence[int] = (160, 120),
        scene_seed: int = 0,
        min_objects: int = 1,
        max_objects: int = 6,
        source: str = "fashion_mnist",
        source_dir: str | Path | None = None,
        void_width: int = 1,
        jpeg_quality: int = 90,
        progress: bool = True,
        train_split: str = "train",
        val_split: str | None = "val",
        test_split: str = "test",
        **kwargs,
    ):
        kwargs.pop("data_dir", None)
        kwargs.pop("classes", None)
        super().__init__(data_dir=None, classes=CLASSES, train_split=train_split, val_split=val_split,
                         test_split=test_split, **kwargs)
        self.scene_root = Path(os.path.expanduser(str(root)))
        self.generation = {
            "n_train": n_train, "n_val": n_val, "n_test": n_test, "image_size": list(image_size),
            "seed": scene_seed, "min_objects": min_objects, "max_objects": max_objects, "source": source,
            "data_dir": source_dir or FASHION_MNIST_DIR, "void_width": void_width, "jpeg_quality": jpeg_quality,
        }
        self.progress = progress

    def prepare_data(self) -> None:
        """Generate the scenes unless a complete copy with the same parameters is there."""
        params = scene_params(**self.generation)
        out = self.scene_root / scene_key(params)
        self.data_dir = generate_scenes(out, **self.generation, name=DATASET_NAME, progress=self.progress)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.data_dir is None:
            self.prepare_data()  # cheap when already generated (manifest check)
        super().setup(stage)


class ScenesDataModule(GeneratedScenes, VOCDetectionDataModule):
    name = "scenes"
