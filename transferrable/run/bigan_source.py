"""``backbone.weights=bigan:<dataset>``: a conv BiGAN encoder as the source representation (Table 5.2).

Like ``source:<dataset>`` (``transferrable.run.source``) but unsupervised: ``task=bigan bigan.arch=conv`` is
trained on ``<dataset>`` with this run's ``bigan_alexnet`` architecture (BN on), its encoder is exported
with BN folded into the convolutions and cached under ``<cache_dir>/bigan/``; later runs with the same
architecture, dataset and ``bigan_source_overrides`` reuse it.

    python train.py task=classify backbone=bigan_alexnet backbone.in_channels=1 \
        backbone.weights=bigan:fashion_mnist backbone.freeze=conv3 backbone.reinit_unfrozen=true \
        +bigan_source_overrides='{trainer.max_epochs: 5, bigan.latent_dim: 200}'
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from transferrable.core.artifact_cache import ArtifactCache, adopt_state_dict_file, digest
from transferrable.run.nested_run import (
    _as_overrides,
    check_dataset_choice,
    compose_train_config,
    inherit_run_settings,
    overrides_node,
    run_nested,
)

log = logging.getLogger(__name__)

BIGAN_PREFIX = "bigan:"
# keys that differ between BiGAN training and supervised use but not in the learned conv weights
_NOT_IN_KEY = ("weights", "freeze", "norm_eval", "batch_norm", "reinit_unfrozen", "dropout", "init")
CACHE_VERSION = 1  # of the entries' manifests (``<name>.pt.manifest.json``)


def _overrides_node(cfg: DictConfig) -> dict:
    return overrides_node(cfg, "bigan_source_overrides")


def bigan_cache(cfg: DictConfig) -> ArtifactCache:
    """``<cache_dir>/bigan``: one encoder ``.pt`` per (architecture, dataset, overrides), its manifest keyed by the
    file's stem."""
    return ArtifactCache(cfg.paths.cache_dir, "bigan", CACHE_VERSION, what="BiGAN encoder")


def bigan_source_path(cfg: DictConfig, dataset: str) -> Path:
    arch = {k: v for k, v in OmegaConf.to_container(cfg.backbone, resolve=True).items() if k not in _NOT_IN_KEY}
    parts = [arch, dataset, _overrides_node(cfg)]
    name = f"bigan_alexnet-{dataset}-{arch.get('input_size', 'any')}px-{digest(parts, 10)}.pt"
    return bigan_cache(cfg).path_for(name, name=name)


def _pretraining_config(cfg: DictConfig, dataset: str, run_dir: Path) -> DictConfig:
    how = _overrides_node(cfg)
    overrides = [f"dataset={dataset}", "task=bigan", "bigan.arch=conv", "logger=csv", "callbacks=default",
                 *_as_overrides(how)]
    pre = compose_train_config(overrides)
    flat = set(_as_overrides(how))
    with open_dict(pre):
        arch = {k: v for k, v in OmegaConf.to_container(cfg.backbone, resolve=True).items() if k not in _NOT_IN_KEY}
        if not any(o.startswith("bigan.image_size=") for o in flat):
            pre.bigan.image_size = arch.get("input_size", pre.bigan.image_size)
        pre.bigan.channels = arch.get("in_channels", pre.bigan.channels)
        pre.backbone = OmegaConf.merge(pre.backbone, arch)
        pre.ckpt_path = None
    inherit_run_settings(pre, cfg, run_dir, f"bigan_source_{dataset}")  # precision stays fp32 (see task)
    return pre


def pretrain_bigan_source(cfg: DictConfig, dataset: str, path: Path) -> Path:
    run_dir = path.with_suffix(".run")
    pre = _pretraining_config(cfg, dataset, run_dir)
    log.info(f"no cached BiGAN encoder at {path}; training a conv BiGAN on {dataset} "
          f"({pre.trainer.max_epochs} epochs) -> {run_dir}")
    metrics = run_nested(pre)  # transferrable.run.runner.train, installed by the runner
    exported = metrics.get("encoder_checkpoint")
    if not exported or not Path(exported).is_file():
        raise RuntimeError(f"[source] BiGAN training on {dataset} exported no encoder in {run_dir}")
    ArtifactCache(path.parent, version=CACHE_VERSION, what="BiGAN encoder").write_bytes(
        path, path.stem, Path(exported).read_bytes())  # atomically, then its manifest
    log.info(f"cached {path} (BiGAN test/knn1_acc={metrics.get('test/knn1_acc', float('nan')):.4f})")
    return path


def resolve_bigan_weights(cfg: DictConfig) -> None:
    """Replace ``backbone.weights=bigan:<dataset>`` by the cached encoder checkpoint, training it if absent."""
    spec = str(cfg.backbone.get("weights"))
    dataset = spec[len(BIGAN_PREFIX):]
    check_dataset_choice(spec, dataset)
    if "BiGANAlexNet" not in str(cfg.backbone.get("_target_")):
        raise ValueError(f"backbone.weights={spec!r} needs backbone=bigan_alexnet (the conv BiGAN encoder)")
    path = bigan_source_path(cfg, dataset)
    _, built = bigan_cache(cfg).ensure(path, path.stem, lambda: pretrain_bigan_source(cfg, dataset, path),
                                       adopt=adopt_state_dict_file)  # damaged: warned, retrained; once across jobs
    if not built:
        log.info("using cached BiGAN encoder %s", path)
    with open_dict(cfg):
        cfg.backbone.weights = str(path)
