"""Hydra configs: every option of every group composes and resolves, bad choices list the good ones."""

from __future__ import annotations

import pytest
from conftest import CONF_DIR, compose_train, point_paths_at
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import _locate
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF_DIR / g).glob("*.yaml"))]


def test_groups_are_the_documented_ones():
    assert set(GROUPS) == {
        "backbone", "callbacks", "dataset", "debug", "experiment", "hardware", "hparams_search", "logger",
        "paths", "task", "task_backbone", "task_backbone_dataset", "task_dataset",
    }
    assert len(OPTIONS) >= 20


def _targets(node, where=""):
    """Every ``_target_`` string in a config, with its key path."""
    if node._is_none() or node._is_missing() or node._is_interpolation():
        return
    if isinstance(node, DictConfig):
        for k in node:
            if k == "_target_":
                yield where, node[k]
            else:
                yield from _targets(node._get_node(k), f"{where}.{k}" if where else str(k))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _targets(node._get_node(i), f"{where}[{i}]")


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(group, option, tmp_path):
    cfg = point_paths_at(compose_train([f"{group}={option}"]), tmp_path)
    assert cfg.hydra.runtime.choices[group] == option
    # every interpolation resolves (paths, ${hydra:...}, ${backbone.input_size}, env defaults)
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    resolved = OmegaConf.to_container(plain, resolve=True, throw_on_missing=True)
    assert resolved["dataset"]["input_size"] == resolved["backbone"]["input_size"]
    assert resolved["paths"]["output_dir"] == str(tmp_path)
    assert resolved["task_name"]
    # every _target_ (including the Hydra plugins' launcher/sweeper) points at something importable
    targets = dict(_targets(cfg))
    # tasks that train have an optimiser; DeCAF's frozen features + scikit-learn classifiers have none
    trained = {"model.optimizer"} if "optimizer" in cfg.model else set()
    assert {"backbone", "dataset", "model", "trainer", *trained} <= set(targets)
    for where, target in targets.items():
        assert callable(_locate(target)), f"{group}={option}: {where}._target_={target}"
    for key in ("launcher", "sweeper"):
        assert callable(_locate(cfg.hydra[key]._target_))


def test_eval_config_composes(tmp_path):
    cfg = point_paths_at(compose_train(["ckpt_path=/x/last.ckpt"], config_name="eval"), tmp_path)
    assert cfg.ckpt_path == "/x/last.ckpt" and cfg.split == "test"
    assert OmegaConf.to_container(cfg.paths, resolve=True)["output_dir"] == str(tmp_path)


def test_defaults(tmp_path):
    cfg = point_paths_at(compose_train([]), tmp_path)
    choices = cfg.hydra.runtime.choices
    assert (choices.backbone, choices.dataset, choices.task, choices.hardware) == (
        "caffenet_mini", "fashion_mnist", "classify", "cpu")
    assert cfg.task_name == "classify"
    assert cfg.model._target_ == "lightning_modules.classify.ClassifyModule"
    # the task's checkpoint monitor wins over callbacks/default.yaml's (the task comes later in defaults)
    assert (cfg.callbacks.model_checkpoint.monitor, cfg.callbacks.model_checkpoint.mode) == ("val/acc", "max")
    assert cfg.model.scheduler.max_lr == cfg.model.optimizer.lr


def test_slurm_resolves_devices_from_the_launcher(tmp_path):
    cfg = point_paths_at(compose_train(["hardware=slurm", "hydra.launcher.nodes=2"]), tmp_path)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.strategy) == (4, 2, "ddp")
    assert cfg.hydra.launcher.tasks_per_node == 4


def test_optuna_search_space(tmp_path):
    cfg = point_paths_at(compose_train(["hparams_search=optuna"]), tmp_path)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.mode == RunMode.MULTIRUN and cfg.hydra.sweeper.direction == "maximize"
    assert cfg.optimized_metric == "val/acc"
    # every swept key exists in the composed config
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, key


def test_debug_modes(tmp_path):
    fdr = point_paths_at(compose_train(["debug=fdr"]), tmp_path)
    assert fdr.trainer.fast_dev_run is True and fdr.trainer.precision == "32-true"
    assert not fdr.logger and fdr.task_name == "debug"
    limit = compose_train(["debug=limit"])
    assert (limit.trainer.limit_train_batches, limit.trainer.max_epochs) == (5, 2)
    assert limit.hydra.runtime.choices.hardware == "cpu"


@pytest.mark.parametrize("group", ["backbone", "task", "dataset"])
def test_unknown_choice_lists_the_available_ones(group):
    with pytest.raises(MissingConfigException) as err:
        compose_train([f"{group}=nonexistent"])
    msg = str(err.value)
    assert f"Could not find '{group}/nonexistent'" in msg
    assert f"Available options in '{group}'" in msg
    for option in (f.stem for f in (CONF_DIR / group).glob("*.yaml")):
        assert option in msg


def _sweep_jobs(*overrides: str) -> list[list[str]]:
    """What ``train.py -m <overrides>`` runs: the basic sweeper's cartesian product of job overrides."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def test_freeze_sweep_is_accepted():
    jobs = _sweep_jobs("backbone.freeze=none,conv3,all", "backbone=caffenet_mini,resnet18")
    assert len(jobs) == 6
    seen = set()
    for job in jobs:
        cfg = compose_train([*job, "backbone.input_size=32", "backbone.weights=null"])
        bb = instantiate(cfg.backbone)
        frozen = bb.frozen_stage_names()
        expected = {"none": [], "conv3": ["conv1", "conv2", "conv3"], "all": list(bb.tap_names)}[cfg.backbone.freeze]
        assert frozen == expected
        seen.add((cfg.hydra.runtime.choices.backbone, cfg.backbone.freeze))
    assert len(seen) == 6


def test_freeze_ablation_experiment():
    cfg = compose_train(["experiment=freeze_ablation"])
    assert cfg.hydra.runtime.choices.dataset == "digits"
    assert cfg.backbone.weights == "source:fashion_mnist"
    assert cfg.hydra.mode == RunMode.MULTIRUN
    swept = cfg.hydra.sweeper.params["backbone.freeze"]
    jobs = _sweep_jobs(f"backbone.freeze={swept}")
    assert [j[0] for j in jobs] == [f"backbone.freeze={v}" for v in ("none", "conv3", "conv5", "fc7")]
    for job in jobs:  # each job composes and its freeze value is valid for the experiment's backbone
        jcfg = compose_train(["experiment=freeze_ablation", *job])
        bb = instantiate(OmegaConf.merge(jcfg.backbone, {"weights": None}))
        assert bb.frozen_stage_names()[-1:] == ([] if jcfg.backbone.freeze == "none" else [jcfg.backbone.freeze])


# -- incompatible task/dataset pairs are refused before any work ---------------------------------
def test_detection_task_on_a_dataset_without_boxes_fails_before_any_work(make_cfg, monkeypatch):
    import transferrable.run.source as source
    from transferrable.core.errors import ConfigError
    from transferrable.run.runner import train

    monkeypatch.setattr(source, "resolve_source_weights", lambda cfg: pytest.fail("pretraining started"))
    cfg = make_cfg("task=rcnn", "dataset=fashion_mnist")
    with pytest.raises(ConfigError) as err:
        train(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "task=rcnn needs a dataset with boxes" in msg and "FashionMNISTDataModule" in msg
    assert "'scenes'" in msg and "'voc'" in msg and "'mnist'" not in msg  # the datasets that would fit


def test_classification_task_on_a_detection_dataset_is_refused():
    from transferrable.core.errors import ConfigError
    from transferrable.run.compat import check_task_dataset

    with pytest.raises(ConfigError, match="needs a dataset with labels.*'fashion_mnist'"):
        check_task_dataset(compose_train(["dataset=scenes"]))
    check_task_dataset(compose_train([]))  # classify on Fashion-MNIST fits
    check_task_dataset(compose_train(["task=rcnn"]))  # and R-CNN on the generated scenes


def test_common_trainer_keys_are_plain_overrides():
    """strategy, fast_dev_run, limit_*_batches ... are in conf/train.yaml's trainer node: no ``+`` needed."""
    cfg = compose_train(["trainer.strategy=ddp", "trainer.fast_dev_run=true", "trainer.limit_train_batches=3",
                         "trainer.limit_val_batches=0.5", "trainer.num_nodes=2", "trainer.sync_batchnorm=true"])
    t = cfg.trainer
    assert (t.strategy, t.fast_dev_run, t.limit_train_batches, t.limit_val_batches, t.num_nodes) == \
        ("ddp", True, 3, 0.5, 2) and t.sync_batchnorm is True
