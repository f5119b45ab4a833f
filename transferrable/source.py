"""The suite's own source representation: ``backbone.weights=source:<dataset>``.

Offline there are no ImageNet weights, so the suite pretrains a backbone with ``task=classify`` on a
large labelled source dataset (Fashion-MNIST by default) and caches it. The cache key is the backbone's
architecture config (everything but weights/freeze) + the source dataset + the input size, so
``caffenet_mini`` at 32 px pretrained on Fashion-MNIST is trained once and reused by every later task.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from transferrable.manifest import sidecar, usable_weights_file, write_sidecar

log = logging.getLogger(__name__)

SOURCE_PREFIX = "source:"
# Backbone keys that do not change the learned weights' shapes or meaning.
_NOT_IN_KEY = ("weights", "freeze", "norm_eval")


def source_key(backbone_cfg: DictConfig, dataset: str, source_overrides: DictConfig | dict | None = None) -> str:
    """Architecture + source dataset + how it was pretrained (``source_overrides``, e.g. fewer epochs)."""
    arch = {k: v for k, v in OmegaConf.to_container(backbone_cfg, resolve=True).items() if k not in _NOT_IN_KEY}
    how = OmegaConf.to_container(source_overrides, resolve=True) if isinstance(source_overrides, DictConfig) else source_overrides
    parts = [arch, dataset] + ([how] if how else [])  # no overrides: the key of the default recipe
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = str(arch.get("_target_", "backbone")).rsplit(".", 1)[-1].lower()
    return f"{name}-{dataset}-{arch.get('input_size', 'any')}px-{digest}"


def source_checkpoint_path(cfg: DictConfig, dataset: str) -> Path:
    key = source_key(cfg.backbone, dataset, cfg.get("source_overrides"))
    return Path(cfg.paths.cache_dir) / "source" / f"{key}.pt"


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
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=overrides)
    conf_dir = str(Path(__file__).resolve().parents[1] / "conf")
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
    conf_dir = Path(__file__).resolve().parents[1] / "conf" / "dataset"
    if not (conf_dir / f"{dataset}.yaml").is_file():
        choices = sorted(p.stem for p in conf_dir.glob("*.yaml"))
        raise ValueError(f"backbone.weights={spec!r}: unknown {what} {dataset!r}; choices: {choices}")


def _pretraining_config(cfg: DictConfig, dataset: str, run_dir: Path) -> DictConfig:
    """``task=classify dataset=<dataset>`` with this run's backbone architecture, hardware and seed."""
    overrides = [f"dataset={dataset}", "task=classify", "logger=csv", "callbacks=default"]
    pre = compose_train_config(overrides + _as_overrides(overrides_node(cfg, "source_overrides")))
    with open_dict(pre):
        pre.backbone = OmegaConf.merge(cfg.backbone, {"weights": None, "freeze": "none"})
        pre.trainer.precision = cfg.trainer.precision
        pre.precision_policy = cfg.get("precision_policy")
    inherit_run_settings(pre, cfg, run_dir, f"source_{dataset}")
    return pre


def pretrain_source(cfg: DictConfig, dataset: str, path: Path) -> Path:
    """Train the source representation and write it atomically to ``path`` (backbone weights only)."""
    import torch

    from transferrable.atomic import atomic_torch_save
    from transferrable.runner import train

    run_dir = path.with_suffix(".run")
    pre = _pretraining_config(cfg, dataset, run_dir)
    print(f"[source] no cached representation at {path}; pretraining {cfg.backbone._target_} on {dataset} "
          f"(task=classify, {pre.trainer.max_epochs} epochs) -> {run_dir}", flush=True)
    metrics = train(pre)
    ckpt = metrics.get("test_checkpoint")
    if not ckpt:
        raise RuntimeError(f"[source] pretraining on {dataset} produced no checkpoint in {run_dir}")
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = {k[len("backbone."):]: v for k, v in blob["state_dict"].items() if k.startswith("backbone.")}
    sidecar(path).unlink(missing_ok=True)  # the old manifest must not vouch for the new file mid-write
    atomic_torch_save(path, {
        "arch": blob.get("backbone_arch"),
        "state_dict": state,
        "source_dataset": dataset,
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, float)},
        "config_yaml": OmegaConf.to_yaml(pre.backbone),
    })
    write_sidecar(path, path.stem)  # after the file: its presence vouches for a complete one
    print(f"[source] cached {path} (test/acc={metrics.get('test/acc', float('nan')):.4f})", flush=True)
    return path


def resolve_source_weights(cfg: DictConfig) -> None:
    """Replace ``backbone.weights=source:<dataset>`` by the cached checkpoint, pretraining it if absent."""
    spec = cfg.backbone.get("weights")
    if isinstance(spec, str) and spec.startswith("bigan:"):  # an unsupervised (conv BiGAN) source instead
        from transferrable.bigan_source import resolve_bigan_weights

        resolve_bigan_weights(cfg)
        return
    if not (isinstance(spec, str) and spec.startswith(SOURCE_PREFIX)):
        return
    dataset = spec[len(SOURCE_PREFIX):]
    check_dataset_choice(spec, dataset, what="source dataset")
    path = source_checkpoint_path(cfg, dataset)
    if not usable_weights_file(path, path.stem, "source representation"):
        pretrain_source(cfg, dataset, path)
    else:
        log.info("using cached source representation %s", path)
    with open_dict(cfg):
        cfg.backbone.weights = str(path)
