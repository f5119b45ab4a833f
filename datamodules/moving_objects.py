"""Generated motion clips (``dataset=moving_objects``): made offline by ``motion_generator`` in the UCF101
layout under ``<root>/<key>`` (``root`` is ``${paths.cache_dir}/moving_objects``; ``key`` a hash of every
generation parameter), generated on first use and reused, then read by the ``ucf101`` loader itself."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from datamodules.motion_generator import FASHION_MNIST_DIR, generate_motions
from datamodules.ucf101 import UCF101DataModule


class MovingObjectsDataModule(UCF101DataModule):
    name = "moving_objects"

    def __init__(
        self,
        root: str | Path = ".cache/moving_objects",
        actions: Sequence[str] | None = None,
        n_groups: int = 25,
        clips_per_group: int = 2,
        num_frames: int = 24,
        video_size: int | Sequence[int] = 36,
        motion_seed: int = 0,
        distractors: int = 0,
        camera_jitter: float = 1.0,
        noise: float = 4.0,
        object_size: Sequence[float] = (0.35, 0.5),
        source_dir: str | Path = FASHION_MNIST_DIR,
        mirror: bool = False,
        **kwargs,
    ):
        kwargs.pop("data_dir", None)
        # the labels are left/right and clockwise/counter-clockwise: a mirrored clip would carry the wrong label
        super().__init__(data_dir=None, mirror=mirror, **kwargs)
        self.motion_root = Path(os.path.expanduser(str(root)))
        self.generation = {
            "classes": None if actions is None else list(actions), "n_groups": n_groups,
            "clips_per_group": clips_per_group, "num_frames": num_frames,
            "frame_size": video_size if isinstance(video_size, int) else list(video_size), "seed": motion_seed,
            "distractors": distractors, "camera_jitter": camera_jitter, "noise": noise,
            "object_size": list(object_size), "data_dir": source_dir,
        }

    def generate(self) -> None:
        self.data_dir = generate_motions(self.motion_root, progress=self.progress, **self.generation)

    def prepare_data(self) -> None:
        self.generate()
        super().prepare_data()  # then the frames cache, as for real UCF101

    def _read_classes(self) -> list[str]:
        if self.data_dir is None:
            self.generate()  # cheap when already generated (manifest check)
        return super()._read_classes()
