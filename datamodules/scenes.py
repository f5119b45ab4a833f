"""Generated detection scenes (``dataset=scenes``): made offline by ``scene_generator``, read as VOC.

The scenes live in ``<root>/<key>/VOCScenes`` (``root`` is ``${paths.cache_dir}/scenes``; ``key`` a hash of
every generation parameter), are generated on first use (``prepare_data``, with a progress bar) and reused
afterwards. Class list: the 10 Fashion-MNIST classes. The scene seed is separate from the run seed, so a
seed sweep trains on the same scenes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from datamodules.scene_generator import (
    CLASSES,
    DATASET_NAME,
    FASHION_MNIST_DIR,
    SceneSpec,
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

    def __init__(self, root: str | Path = ".cache/scenes", scene_seed: int = 0, source_dir: str | Path | None = None,
                 progress: bool = True, train_split: str = "train", val_split: str | None = "val",
                 test_split: str = "test", **kwargs):
        kwargs.pop("data_dir", None)
        kwargs.pop("classes", None)
        spec = SceneSpec.pop_from(kwargs, seed=scene_seed, data_dir=source_dir or FASHION_MNIST_DIR)
        super().__init__(data_dir=None, classes=CLASSES, train_split=train_split, val_split=val_split,
                         test_split=test_split, **kwargs)
        self.scene_root = Path(os.path.expanduser(str(root)))
        self.generation = dataclasses.asdict(spec)  # SceneSpec's knobs (n_*, image_size, objects, ...)
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
