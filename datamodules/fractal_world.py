"""Generated object-category datasets (``dataset=fractalnet``, ``fractal_caltech``, ``fractal_office``): made
offline by ``fractal_generator`` in ImageNet's, Caltech-101's and Office-31's layouts, read by the real
``imagefolder`` loader.

A directory lives in ``<root>/<key>/`` (``root`` is ``${paths.cache_dir}/fractal_world``; ``key`` a hash of every
generation parameter), is generated on first use (``prepare_data``, with a progress bar) and reused afterwards. The
loader's ``data_dir`` is then the layout's root: ``FractalNet/`` (train/ and val/ class folders, like ImageNet),
``101_ObjectCategories/`` (flat class folders, split ``train_per_class`` N per class, like Caltech-101) or an
Office domain's ``office31/<domain>/images/``. The world seed is separate from the run seed, so a seed sweep sees
the same images.
"""

from __future__ import annotations

import os
from pathlib import Path

from datamodules.fractal_generator import data_root, generate_world, world_params
from datamodules.imagefolder import ImageFolderDataModule


class FractalWorldDataModule(ImageFolderDataModule):
    name = "fractal_world"

    def __init__(self, root: str | Path = ".cache/fractal_world", role: str = "caltech", n_classes: int = 101,
                 images_per_class: int = 60, val_per_class: int = 0, world_seed: int = 0,
                 category_set: str | None = None, domain: str | None = None, jpeg_quality: int = 90,
                 progress: bool = True, **kwargs):
        kwargs.pop("data_dir", None)
        super().__init__(data_dir=None, **kwargs)
        self.world_root = Path(os.path.expanduser(str(root)))
        # checked now (one line naming the override), before anything is generated or trained
        self.params = world_params(role, n_classes, images_per_class, world_seed, category_set, val_per_class,
                                   jpeg_quality)
        self.domain = domain
        if role == "office":
            data_root(Path("."), self.params, domain)  # a bad domain is refused here
        self.progress = progress

    def prepare_data(self) -> None:
        """Generate the directory unless a complete copy with the same parameters is there."""
        generated = generate_world(self.world_root, self.params, progress=self.progress)
        self.data_dir = str(data_root(generated, self.params, self.domain))
