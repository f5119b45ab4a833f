"""Fashion-MNIST (60k/10k, IDX): the offline stand-in for ImageNet as the supervised source."""

from __future__ import annotations

from pathlib import Path

from datamodules.base import ImageClassificationDataModule
from datamodules.idx import download_idx, load_idx_split

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
HOW_TO_GET = (
    "Get it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set dataset.download=true "
    "(needs internet)."
)


class FashionMNISTDataModule(ImageClassificationDataModule):
    name = "fashion_mnist"

    def __init__(self, data_dir: str = "/usr/share/datasets/fashion-mnist", download: bool = False, **kwargs):
        super().__init__(data_dir=data_dir, **kwargs)
        self.download = download

    @property
    def class_names(self) -> list[str]:
        return CLASSES

    def prepare_data(self) -> None:
        if self.download:
            download_idx(Path(self.data_dir), "FashionMNIST")

    def load_splits(self):
        self.prepare_data()
        d = Path(self.data_dir)
        return {
            "train": load_idx_split(d, "train", "Fashion-MNIST", HOW_TO_GET, len(CLASSES)),
            "test": load_idx_split(d, "t10k", "Fashion-MNIST", HOW_TO_GET, len(CLASSES)),
        }
