"""The suite's own source representation: ``backbone.weights=source:<dataset>``.

Offline there are no ImageNet weights, so the suite pretrains a backbone with ``task=classify`` on a
large labelled source dataset (Fashion-MNIST by default) and caches it. The cache key is the backbone's
architecture config (everything but weights/freeze) + the source dataset + the input size + the pretraining
recipe (epochs, optimiser, schedule, batch size, augmentation of ``task=classify``), so ``caffenet_mini`` at 28 px
pretrained on Fashion-MNIST is trained once and reused by every later task, and a changed recipe is a new entry.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from transferrable.core.artifact_cache import ArtifactCache, adopt_state_dict_file, digest
from transferrable.run.bigan_source import resolve_bigan_weights
from transferrable.run.nested_run import (
    _as_overrides,
    check_dataset_choice,
    compose_train_config,
    inherit_run_settings,
    overrides_node,
    run_nested,
)

log = logging.getLogger(__name__)

SOURCE_PREFIX = "source:"
# Backbone keys that do not change the learned weights' shapes or meaning.
_NOT_IN_KEY = ("weights", "freeze", "norm_eval")
CACHE_VERSION = 1  # of the entries' manifests (``<key>.pt.manifest.json``)


def source_key(backbone_cfg: DictConfig, dataset: str, source_overrides: DictConfig | dict | None = None,
               recipe: dict | None = None) -> str:
    """Architecture + source dataset + how it was pretrained (``source_overrides``, e.g. fewer epochs, and the
    composed ``recipe``, see ``pretraining_recipe``)."""
    arch = {k: v for k, v in OmegaConf.to_container(backbone_cfg, resolve=True).items() if k not in _NOT_IN_KEY}
    how = OmegaConf.to_container(source_overrides, resolve=True) if isinstance(source_overrides, DictConfig) else source_overrides
    parts = [arch, dataset] + ([how] if how else []) + ([{"recipe": recipe}] if recipe else [])
    name = str(arch.get("_target_", "backbone")).rsplit(".", 1)[-1].lower()
    return f"{name}-{dataset}-{arch.get('input_size', 'any')}px-{digest(parts, 10)}"


def source_cache(cfg: DictConfig) -> ArtifactCache:
    """``<cache_dir>/source``: one ``<source_key>.pt`` per representation, its manifest keyed by that name."""
    return ArtifactCache(cfg.paths.cache_dir, "source", CACHE_VERSION, what="source representation")


# what of the composed pretraining config decides the learned weights (besides the backbone and the dataset)
_RECIPE_DATASET_KEYS = ("batch_size", "augment", "val_fraction", "max_train_samples", "mean", "std")


def source_statistics(dataset: str, source_overrides: dict | None = None) -> tuple[list[float], list[float]] | None:
    """The mean/std the source ``dataset`` is normalised with when it is pretrained: its dataset config, with the
    run's ``source_overrides`` (e.g. bigan_transfer pretrains on [-1, 1] pixels) applied as pretraining applies them."""
    check_dataset_choice(SOURCE_PREFIX + dataset, dataset, what="source dataset")
    node = compose_train_config([f"dataset={dataset}"] + _as_overrides(source_overrides or {})).dataset
    if "mean" not in node or "std" not in node:
        return None
    return [float(v) for v in node.mean], [float(v) for v in node.std]


def pretraining_recipe(cfg: DictConfig, dataset: str) -> dict:
    """How ``task=classify dataset=<dataset>`` would pretrain now: epochs, the model's optimiser/schedule/head,
    and the dataset's batch size and augmentation (so a changed default recipe never reuses an old file)."""
    pre = _pretraining_config(cfg, dataset, Path("recipe"))
    model = {k: v for k, v in OmegaConf.to_container(pre.model, resolve=False).items()}
    data = {k: OmegaConf.to_container(pre.dataset, resolve=True).get(k) for k in _RECIPE_DATASET_KEYS}
    return {"epochs": pre.trainer.max_epochs, "model": model, "data": data}


def source_checkpoint_path(cfg: DictConfig, dataset: str) -> Path:
    key = source_key(cfg.backbone, dataset, cfg.get("source_overrides"), pretraining_recipe(cfg, dataset))
    return source_cache(cfg).path_for(key, name=f"{key}.pt")


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
    import torch  # imported here for start-up speed

    run_dir = path.with_suffix(".run")
    pre = _pretraining_config(cfg, dataset, run_dir)
    log.info(f"no cached representation at {path}; pretraining {cfg.backbone._target_} on {dataset} "
          f"(task=classify, {pre.trainer.max_epochs} epochs) -> {run_dir}")
    metrics = run_nested(pre)  # transferrable.run.runner.train, installed by the runner
    ckpt = metrics.get("test_checkpoint")
    if not ckpt:
        raise RuntimeError(f"[source] pretraining on {dataset} produced no checkpoint in {run_dir}")
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = {k[len("backbone."):]: v for k, v in blob["state_dict"].items() if k.startswith("backbone.")}
    # written atomically, then its manifest (keyed by the file's name): its presence vouches for a complete file
    with ArtifactCache(path.parent, version=CACHE_VERSION, what="source representation").writer(path, path.stem) as w:
        torch.save({
            "arch": blob.get("backbone_arch"),
            "state_dict": state,
            "source_dataset": dataset,
            "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, float)},
            "config_yaml": OmegaConf.to_yaml(pre.backbone),
        }, w.path)
    log.info(f"cached {path} (test/acc={metrics.get('test/acc', float('nan')):.4f})")
    return path


def resolve_source_weights(cfg: DictConfig) -> None:
    """Replace ``backbone.weights=source:<dataset>`` by the cached checkpoint, pretraining it if absent."""
    spec = cfg.backbone.get("weights")
    if isinstance(spec, str) and spec.startswith("bigan:"):  # an unsupervised (conv BiGAN) source instead
        resolve_bigan_weights(cfg)
        return
    if not (isinstance(spec, str) and spec.startswith(SOURCE_PREFIX)):
        return
    dataset = spec[len(SOURCE_PREFIX):]
    check_dataset_choice(spec, dataset, what="source dataset")
    path = source_checkpoint_path(cfg, dataset)
    # a file from before manifests is adopted when it loads; a damaged one warns (CacheWarning) and is retrained;
    # under the entry's lock, so parallel jobs pretrain it once (the others wait, then reuse it)
    _, built = source_cache(cfg).ensure(path, path.stem, lambda: pretrain_source(cfg, dataset, path),
                                        adopt=adopt_state_dict_file)
    if not built:
        log.info("using cached source representation %s", path)
    with open_dict(cfg):
        cfg.backbone.weights = str(path)
