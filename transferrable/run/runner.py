"""Build a run from a composed config and execute it; ``train.py`` and ``eval.py`` are thin wrappers."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from engine.single_fit import plain_metrics
from transferrable.core.archives import extract_configured_archive
from transferrable.core.atomic import atomic_write_json
from transferrable.core.cache_lock import lock_timeout, set_lock_timeout
from transferrable.core.checkpoints import check_ckpt_path, load_weights_only, resolve_last
from transferrable.core.config_schema import validate
from transferrable.core.distributed import is_rank_aware
from transferrable.core.errors import ConfigError
from transferrable.core.precision import resolve_precision
from transferrable.core.wandb_logger import log_lineage
from transferrable.run import (
    backbone_limits,  # noqa: F401  (registers the backbone input-size check)
    source,  # source.resolve_source_weights is looked up per call (tests replace it)
)
from transferrable.run.compat import check_task_dataset
from transferrable.run.methods import METHODS  # noqa: F401  (registers every method's config keys)
from transferrable.run.nested_run import install_train, overrides_node
from transferrable.viz.tables import METRICS_FILE

log = logging.getLogger(__name__)


def instantiate_list(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs node (callbacks, loggers)."""
    from hydra.utils import instantiate

    if not node:
        return []
    return [instantiate(c) for c in node.values() if isinstance(c, DictConfig) and "_target_" in c]


def _command_line_keys() -> set[str]:
    """The keys set on this run's command line (``dataset.mean=[...]`` -> ``dataset.mean``), if Hydra knows them."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - no Hydra run (a config built in code): nothing was set explicitly
        return set()
    return {str(o).split("=", 1)[0].lstrip("+~") for o in overrides}


def _statistics_nodes(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """The dataset nodes a backbone reads: the task's ``dataset`` and a ``decaf_domain.target``."""
    nodes = [("dataset", cfg.get("dataset"))]
    if "decaf_domain" in cfg and cfg.decaf_domain.get("target") is not None:
        nodes.append(("decaf_domain.target", cfg.decaf_domain.target))
    return [(where, node) for where, node in nodes if node is not None and "mean" in node]


def _set_statistics(cfg: DictConfig, stats: tuple[list[float], list[float]], why: str) -> None:
    """``mean``/``std`` of every node of ``_statistics_nodes`` set to ``stats``; one given on the command line is kept."""
    explicit = _command_line_keys()
    with open_dict(cfg):
        for where, node in _statistics_nodes(cfg):
            for key, value in zip(("mean", "std"), stats, strict=True):
                if f"{where}.{key}" in explicit or list(node.get(key) or []) == value:
                    continue
                log.info("backbone.weights=%s: %s.%s %s -> %s (%s)", cfg.backbone.weights, where, key,
                         list(node.get(key) or []), value, why)
                node[key] = value


def apply_hub_normalisation(cfg: DictConfig) -> None:
    """With ``backbone.weights=hub``/``hub:<tag>`` the inputs are normalised as the hub weights were trained
    (ImageNet's mean/std for timm's and torchvision's, mean = std = 0.5 for EfficientNet-Lite's), not with the
    dataset's (or a task's) statistics: the task's dataset and a ``decaf_domain.target`` alike. A
    ``dataset.mean``/``dataset.std`` given on the command line is kept."""
    from hydra.utils import get_class

    from models.weights import is_hub_spec

    backbone = cfg.get("backbone")
    if not backbone or not is_hub_spec(backbone.get("weights")) or not _statistics_nodes(cfg):
        return
    try:
        stats = get_class(backbone._target_).hub_statistics(backbone)
    except (AttributeError, ImportError):  # a backbone class without hub weights
        return
    if stats is not None:
        _set_statistics(cfg, stats, "the hub weights' statistics")


def apply_source_normalisation(cfg: DictConfig) -> None:
    """With ``backbone.weights=source:<dataset>`` the inputs are normalised as that source was trained (its dataset
    config's mean/std), as the thesis feeds Caltech or VOC images to an ImageNet network with ImageNet's mean: the
    task's dataset and a ``decaf_domain.target`` alike. A ``dataset.mean``/``dataset.std`` given on the command line
    is kept."""
    weights = (cfg.get("backbone") or {}).get("weights")
    if not (isinstance(weights, str) and weights.startswith(source.SOURCE_PREFIX)):
        return
    stats = source.source_statistics(weights[len(source.SOURCE_PREFIX):], overrides_node(cfg, "source_overrides"))
    if stats is not None:
        _set_statistics(cfg, stats, "the source's statistics")


def build_datamodule(cfg: DictConfig):
    from hydra.utils import instantiate

    apply_hub_normalisation(cfg)
    apply_source_normalisation(cfg)
    return instantiate(cfg.dataset)


def build_model(cfg: DictConfig, num_classes: int):
    """Backbone first (weights already resolved to a file), then the task's LightningModule."""
    from hydra.utils import instantiate

    backbone = instantiate(cfg.backbone)
    model = instantiate(cfg.model, backbone=backbone, num_classes=num_classes)
    model.run_config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    return model


def apply_precision_policy(cfg: DictConfig) -> str:
    """Resolve ``trainer.precision: auto`` by CPU/GPU capability (``transferrable/core/precision.py``), once per run:
    the choice and its reason are logged and kept in the config (``precision_policy``), so W&B and the nested
    source pretraining see them too. An explicit precision is kept as it is."""
    requested = cfg.trainer.get("precision", "32-true")
    if cfg.get("precision_policy") and str(requested) != "auto":
        return str(requested)  # already resolved (a nested run inherits the resolved value)
    precision, reason = resolve_precision(requested, cfg.trainer.get("accelerator", "cpu"))
    with open_dict(cfg):
        cfg.trainer.precision = precision
        cfg.precision_policy = {"precision": precision, "reason": reason}
    log.info("precision: %s (%s)", precision, reason)
    return precision


def build_trainer(cfg: DictConfig, loggers: list | None = None):
    from hydra.utils import instantiate

    apply_precision_policy(cfg)
    if loggers is None:
        loggers = instantiate_list(cfg.get("logger"))
    callbacks = instantiate_list(cfg.get("callbacks"))
    if not loggers:  # Lightning refuses a learning-rate monitor without a logger to write to
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and test) the configured task; writes ``metrics.json`` in the run's output directory."""
    import lightning as L  # imported here for start-up speed, like every third-party import in this module

    apply_precision_policy(cfg)  # first: the nested source pretraining below inherits the resolved precision
    validate(cfg)  # every value in range, every paths.* directory writable (transferrable/core/config_schema.py)
    check_task_dataset(cfg)  # a task/dataset pair that cannot work fails here, before any pretraining
    set_lock_timeout(cfg.paths.get("cache_lock_timeout_s", lock_timeout()))  # how long a job waits for another's build
    resolve_last(cfg)  # ckpt_path=last: this run's last.ckpt, or a fresh start
    check_ckpt_path(cfg)  # so does a ckpt_path that is missing, not weights-only, or of another task/backbone
    extract_configured_archive(cfg)  # and an unsafe dataset.data_dir archive (a safe one is extracted once)
    datamodule = build_datamodule(cfg)  # a dataset config error costs seconds, not a source pretraining
    source.resolve_source_weights(cfg)  # may pretrain first; seed afterwards so this run is the same either way
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    model = build_model(cfg, datamodule.num_classes)
    pipeline = build_pipeline(cfg)
    loggers = instantiate_list(cfg.get("logger"))
    try:
        trainer = build_trainer(cfg, loggers)
        check_processes(cfg, trainer)
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        log_lineage(loggers, cfg)  # W&B artifacts: the weights this run starts from, its config
        metrics = dict(pipeline(cfg=cfg, trainer=trainer, datamodule=datamodule, model=model))
        for key, value in list(metrics.items()):
            if isinstance(value, float) and not math.isfinite(value):
                log.warning("metric %s is %s", key, value)
        metrics["precision"] = cfg.trainer.precision  # type: ignore[assignment]  # what the numbers were computed in
        output_dir = Path(cfg.paths.output_dir)
        if trainer.is_global_zero:  # under DDP every rank runs this; the (rank-reduced) results are written once
            atomic_write_json(output_dir / METRICS_FILE, metrics)
            _print_summary(cfg, trainer, metrics, output_dir)
        status = "success"
        return metrics
    except BaseException:
        status = "failed"
        raise
    finally:  # a crashing job of a multirun must not leave its logger (W&B run) open for the next job
        close_loggers(loggers, status)


def check_processes(cfg: DictConfig, trainer) -> None:
    """A pipeline not written for DDP (not marked ``rank_aware``) would run every stage (and write every cache) on
    every rank: it is refused in one line before any work."""
    from hydra.utils import get_method

    target = str((cfg.get("pipeline") or {}).get("_target_", "engine.single_fit.run"))
    if trainer.world_size > 1 and not is_rank_aware(get_method(target)):
        raise ConfigError(
            f"trainer.devices={cfg.trainer.get('devices')} (x trainer.num_nodes={cfg.trainer.get('num_nodes', 1)}): "
            f"the {cfg.get('task_name')} pipeline ({target}) runs on one process for now; every task's own pipeline "
            "(engine/<method>/) runs under DDP. Use trainer.devices=1.")


def build_pipeline(cfg: DictConfig):
    """The task's pipeline: ``cfg.pipeline``, a ``_partial_`` ``engine.<method>.run`` (default: fit, then test)."""
    from hydra.utils import instantiate

    from engine import single_fit

    return instantiate(cfg.pipeline) if cfg.get("pipeline") else single_fit.run


def close_loggers(loggers: list, status: str) -> None:
    """Finalize every logger and finish the W&B run, whatever happened (called from ``finally``)."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        try:
            lg.finalize(status)
        except Exception as err:  # closing must not mask the run's own error
            log.warning("could not finalize logger %s: %s", type(lg).__name__, err)
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish(exit_code=0 if status == "success" else 1)


# Source pretraining (transferrable.run.source, bigan_source) runs a nested train(); they sit below this module, so
# it hands them train here. Late-bound: a patched ``runner.train`` (tests) is what nested runs call too.
install_train(lambda pre: train(pre))


def _print_summary(cfg: DictConfig, trainer, metrics: dict, output_dir: Path) -> None:
    lines = [f"run directory : {output_dir}"]
    cb = trainer.checkpoint_callback
    if cb is not None and cb.dirpath:
        lines.append(f"checkpoints   : {cb.dirpath} (best: {Path(cb.best_model_path).name or '-'})")
    lines.append(f"metrics       : {output_dir / METRICS_FILE}")
    from lightning.pytorch.loggers import WandbLogger

    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            run = lg.experiment
            where = getattr(run, "dir", None) or lg.save_dir
            mode = "offline (upload later with `wandb sync`)" if run.offline else "online"
            lines.append(f"W&B run       : {Path(where).parent if where else lg.save_dir} [{mode}]")
        else:
            lines.append(f"{type(lg).__name__:<13} : {lg.log_dir}")
    shown = {k: v for k, v in metrics.items() if k.startswith("test/") and isinstance(v, int | float)}
    more = 0
    if len(shown) > 12:  # e.g. DeCAF's per feature/classifier/N metrics: the headline ones only
        top = {k: v for k, v in shown.items() if k.count("/") == 1}
        more, shown = len(shown) - len(top), top
    if shown:
        lines.append("test metrics  : " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items()))
                     + (f" (+{more} more in {METRICS_FILE})" if more else ""))
    print("\n".join(lines), flush=True)


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, float]:
    """Rebuild the run stored inside a checkpoint and test it; metrics JSON goes next to the checkpoint."""
    ckpt_path = Path(os.path.expanduser(str(cfg.ckpt_path)))
    blob = load_weights_only(ckpt_path)  # weights-only: a crafted pickle is refused, never run
    if not isinstance(blob, dict) or "run_config_yaml" not in blob:
        raise ConfigError(f"ckpt_path={str(ckpt_path)!r}: not a checkpoint written by this suite's train.py")
    run_cfg = OmegaConf.create(blob["run_config_yaml"])
    with open_dict(run_cfg):
        run_cfg.backbone.weights = None  # the checkpoint's state_dict supplies every weight
        run_cfg.dataset = OmegaConf.merge(run_cfg.dataset, cfg.get("dataset") or {})
        run_cfg.trainer = OmegaConf.merge(run_cfg.trainer, cfg.get("trainer") or {})
        run_cfg.trainer.default_root_dir = str(ckpt_path.parent)
        run_cfg.trainer.logger = False
    if cfg.get("split", "test") not in ("test", "val"):
        raise ConfigError(f"split={cfg.get('split')}: expected test or val")
    validate(run_cfg, paths=False)  # the checkpoint's config with this command's dataset/trainer overrides
    datamodule = build_datamodule(run_cfg)
    model = build_model(run_cfg, datamodule.num_classes)
    import lightning as L

    apply_precision_policy(run_cfg)

    trainer = L.Trainer(**{k: v for k, v in OmegaConf.to_container(run_cfg.trainer).items() if k != "_target_"})
    split = cfg.get("split", "test")
    runner = trainer.test if split == "test" else trainer.validate
    results = runner(model, datamodule=datamodule, ckpt_path=str(ckpt_path), weights_only=True)
    if split == "test" and run_cfg.get("test_outputs"):  # a task's files of a test (e.g. LRCN's video scores)
        from hydra.utils import instantiate

        instantiate(run_cfg.test_outputs)(trainer=trainer, datamodule=datamodule, model=model,
                                          output_dir=ckpt_path.parent)
    metrics = plain_metrics(results[0] if results else {})
    out = ckpt_path.with_name(ckpt_path.stem + f".{split}_metrics.json")
    atomic_write_json(out, {"checkpoint": str(ckpt_path), "split": split, **metrics})
    log.info("metrics written to %s", out)
    return metrics
