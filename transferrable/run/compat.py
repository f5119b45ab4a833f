"""Refuse a task/dataset pair that cannot work before any heavy work starts (source pretraining, proposals).

A LightningModule declares what its data must carry (``REQUIRES_DATA``, e.g. ``("boxes",)`` for detection) and a
DataModule what it provides (``PROVIDES_DATA``). Only the classes are imported, nothing is built, so
``python train.py task=rcnn dataset=fashion_mnist`` fails in about a second with one line that lists the
datasets that would fit, instead of after minutes of pretraining.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra.utils import get_class
from omegaconf import DictConfig

from transferrable.core.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def provided(target: str) -> set[str]:
    return set(getattr(get_class(target), "PROVIDES_DATA", ()))


def dataset_target(name: str) -> str | None:
    """A dataset option's ``_target_``, following its defaults list (e.g. flickr30k extends coco_captions)."""
    node = yaml.safe_load((CONF_DIR / "dataset" / f"{name}.yaml").read_text()) or {}
    if "_target_" in node:
        return node["_target_"]
    bases = [d for d in node.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    return dataset_target(bases[0]) if bases else None


def fitting_datasets(needs: set[str]) -> list[str]:
    names = []
    for path in sorted((CONF_DIR / "dataset").glob("*.yaml")):
        target = dataset_target(path.stem)
        try:
            if target and needs <= provided(target):
                names.append(path.stem)
        except ImportError:  # an optional dataset whose extra is not installed
            continue
    return names


def check_task_dataset(cfg: DictConfig) -> None:
    model_target = cfg.get("model", {}).get("_target_")
    dataset_target = cfg.get("dataset", {}).get("_target_")
    if not (model_target and dataset_target):
        return
    needs = set(getattr(get_class(model_target), "REQUIRES_DATA", ()))
    missing = needs - provided(dataset_target)
    if missing:
        raise ConfigError(
            f"task={cfg.get('task_name')} needs a dataset with {', '.join(sorted(missing))}, but dataset "
            f"{dataset_target.rsplit('.', 1)[-1]} provides {sorted(provided(dataset_target)) or 'nothing declared'}; "
            f"datasets that fit: {fitting_datasets(needs)}"
        )
