"""Generated captioned scenes (``dataset=scene_captions``): the detection scenes of ``scene_generator``
(generated or reused under ``<cache>/scenes/<key>``) captioned by ``caption_generator`` into a COCO
captions directory ``<cache>/scene_captions/<key>``, then read by the ``coco_captions`` loader through the
Karpathy split file it writes (train / val / test = the scenes' splits)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from datamodules.caption_generator import caption_key, caption_params, write_caption_dataset
from datamodules.coco_captions import COCOCaptionsDataModule
from datamodules.scene_generator import (
    DATASET_NAME,
    FASHION_MNIST_DIR,
    SceneSpec,
    generate_scenes,
    scene_key,
    scene_params,
)


class SceneCaptionsDataModule(COCOCaptionsDataModule):
    name = "scene_captions"

    def __init__(self, root: str | Path = ".cache/scene_captions", scene_root: str | Path = ".cache/scenes",
                 scene_seed: int = 0, caption_seed: int = 0, captions_per_image: int = 5,
                 source_dir: str | Path = FASHION_MNIST_DIR, progress: bool = True, **kwargs):
        kwargs.pop("data_dir", None)
        kwargs.pop("karpathy_json", None)
        # the scene knobs (n_*, image_size, min/max_objects, ...) are SceneSpec's
        spec = SceneSpec.pop_from(kwargs, seed=scene_seed, data_dir=source_dir)
        super().__init__(data_dir=None, **kwargs)
        self.root = Path(os.path.expanduser(str(root)))
        self.scene_root = Path(os.path.expanduser(str(scene_root)))
        self.generation = dataclasses.asdict(spec)
        self.caption_seed, self.captions_per_image = int(caption_seed), int(captions_per_image)
        self.progress = progress

    def prepare_data(self) -> None:
        params = scene_params(**self.generation)
        voc = generate_scenes(self.scene_root / scene_key(params), **self.generation, name=DATASET_NAME,
                              progress=self.progress)
        cparams = caption_params(params, self.caption_seed, self.captions_per_image)
        out = write_caption_dataset(self.root / caption_key(cparams), voc, cparams, progress=self.progress)
        self.karpathy_json = out / "dataset_coco.json"
        self.image_dir = out

    def setup(self, stage: str | None = None) -> None:
        if self.karpathy_json is None:
            self.prepare_data()  # cheap when already generated (manifest checks)
        super().setup(stage)
