"""A task's defaults read from its YAML, for code that builds a LightningModule without Hydra (tests, benchmarks, one
task reusing another's module): ``conf/task/<task>.yaml`` stays the only place a default is written.

``task_config("rcnn", "rcnn", cfg, overrides)`` is that file with its ``rcnn:`` node replaced by ``cfg`` (when
given, e.g. the node Hydra composed) and ``overrides`` merged into the node; a key the node does not have is a
``ConfigError``. Interpolations are left for the caller to resolve (``OmegaConf.to_container(node, resolve=True)``)
so that e.g. ``model.optimizer.lr: ${rcnn.finetune.lr}`` follows the overridden node.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from transferrable.core.errors import ConfigError

TASK_DIR = Path(__file__).resolve().parents[2] / "conf" / "task"


def task_config(task: str, node: str, cfg: Mapping | None = None, overrides: Mapping | None = None) -> DictConfig:
    root = OmegaConf.load(TASK_DIR / f"{task}.yaml")
    if cfg is not None:
        root[node] = OmegaConf.create(dict(cfg))
    if overrides:
        OmegaConf.set_struct(root[node], True)
        try:
            root[node] = OmegaConf.merge(root[node], dict(overrides))
        except ConfigKeyError as err:
            raise ConfigError(f"{node}: no such key ({err.msg.splitlines()[0]}); the keys are in "
                              f"conf/task/{task}.yaml") from None
        OmegaConf.set_struct(root[node], False)
    return root


def plain(node) -> dict:
    """A resolved node as plain containers (what checkpoints' hparams and cache keys hold)."""
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
