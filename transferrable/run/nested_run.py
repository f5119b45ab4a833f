"""A training run started from inside another one: the source representations' pretraining.

``backbone.weights=source:<dataset>`` (``transferrable.run.source``) and ``bigan:<dataset>``
(``transferrable.run.bigan_source``) compose a second ``conf/train.yaml`` run, give it this run's devices, seed
and paths, and train it before the outer run starts. The helpers they share live here, below both.

The runner calls the source modules, so they cannot import the runner back. Instead ``transferrable.run.runner``
installs its ``train`` here when it is imported (:func:`install_train`), and :func:`run_nested` calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

_train: Callable[[DictConfig], dict] | None = None


def install_train(train: Callable[[DictConfig], dict]) -> None:
    """Make ``train`` the function nested runs use (``transferrable.run.runner`` does this when imported)."""
    global _train
    _train = train


def run_nested(pre: DictConfig) -> dict:
    """Run the composed pretraining config ``pre`` as a whole training run; its metrics."""
    if _train is None:
        raise RuntimeError("no training function installed for nested pretraining: import transferrable.run.runner "
                           "first (it installs its train())")
    return _train(pre)


def _override_value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list | tuple):
        return "[" + ",".join(_override_value(x) for x in v) + "]"
    return str(v)


def _as_overrides(node: dict, prefix: str = "") -> list[str]:
    """``source_overrides`` as Hydra override strings. Nested keys (``+source_overrides.trainer.max_epochs=2``
    on the command line) are joined with dots, and null/booleans/lists are written in Hydra's syntax."""
    out = []
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out += _as_overrides(v, key) if isinstance(v, dict) else [f"{key}={_override_value(v)}"]
    return out


def overrides_node(cfg: DictConfig, key: str) -> dict:
    """``cfg[key]`` as a plain dict (an empty DictConfig is falsy, and to_container refuses a plain dict)."""
    how = cfg.get(key)
    return OmegaConf.to_container(how, resolve=True) if isinstance(how, DictConfig) else dict(how or {})


def compose_train_config(overrides: list[str]) -> DictConfig:
    """Compose ``conf/train.yaml`` inside a running Hydra app (train.py, tests) or standalone."""
    # imported here for start-up speed (Hydra's compose API is needed only when a nested run is composed)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=overrides)
    conf_dir = str(Path(__file__).resolve().parents[2] / "conf")
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def inherit_run_settings(pre: DictConfig, cfg: DictConfig, run_dir: Path, task_name: str) -> None:
    """A nested pretraining run uses this run's devices, seed and paths, and writes into ``run_dir``."""
    with open_dict(pre):
        pre.trainer.accelerator = cfg.trainer.accelerator
        pre.trainer.devices = cfg.trainer.devices
        pre.seed = cfg.get("seed")
        pre.paths = OmegaConf.merge(cfg.paths, {"output_dir": str(run_dir)})
        pre.task_name = task_name
        pre.pop("hydra", None)


def check_dataset_choice(spec: str, dataset: str, what: str = "dataset") -> None:
    """A ``<prefix>:<dataset>`` weights spec must name a ``conf/dataset`` option."""
    conf_dir = Path(__file__).resolve().parents[2] / "conf" / "dataset"
    if not (conf_dir / f"{dataset}.yaml").is_file():
        choices = sorted(p.stem for p in conf_dir.glob("*.yaml"))
        raise ValueError(f"backbone.weights={spec!r}: unknown {what} {dataset!r}; choices: {choices}")
