"""The config rules (transferrable/core/config_schema.py): every numeric key of every config group has a range, every
shipped config passes, and a bad value is one ``error: <key>=<value>: expected ...`` line with exit 2 before
any work."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
from conftest import CONF_DIR, compose_train, point_paths_at
from hydra.core.global_hydra import GlobalHydra

import transferrable.run.runner as runner
import transferrable.run.source as source
from transferrable.core import config_rules
from transferrable.core import config_schema as schema
from transferrable.core.errors import ConfigError, exit_on_user_error

# one worker for the module: its tests compose the same ~76 option sets (conftest's compose cache is per worker)
pytestmark = pytest.mark.xdist_group("test_config_schema")

# Numeric keys that take any real number on purpose (no range to check): the R-CNN SVM's hard-negative score
# thresholds are SVM scores (their order, easy < hard, is a cross-check in config_schema).
UNBOUNDED = {"rcnn.svm.hard_threshold", "rcnn.svm.easy_threshold"}
ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("backbone", "dataset", "task", "experiment", "callbacks", "logger", "debug", "hardware")


def options() -> list[list[str]]:
    """One composition per option of every group (a task with its default dataset, each experiment)."""
    out = [[]]
    for group in GROUPS:
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            if (group, path.stem) != ("hardware", "slurm"):  # needs the submitit launcher plugin
                out.append([f"{group}={path.stem}"])
    for path in sorted((CONF_DIR / "task_backbone").glob("*.yaml")):
        task, backbone = path.stem.split("-", 1)
        out.append([f"task={task}", f"backbone={backbone}"])
    return out


def compose(overrides: list[str]):
    try:
        return compose_train(overrides)
    finally:
        GlobalHydra.instance().clear()


def is_numeric(value) -> bool:
    num = lambda v: isinstance(v, int | float) and not isinstance(v, bool)  # noqa: E731
    return num(value) or (isinstance(value, list) and bool(value) and all(num(v) for v in value))


def test_every_numeric_key_has_a_range():
    missing: dict[str, str] = {}
    for overrides in options():
        for path, value, _ in schema.leaves(compose(overrides)):
            if not is_numeric(value) or path in UNBOUNDED:
                continue
            rule = schema.rule_for(path)
            if rule is None or not any(c in rule.expected for c in "<>=[(") and "one of" not in rule.expected:
                missing.setdefault(path, " ".join(overrides) or "(defaults)")
    assert not missing, f"numeric keys without a range in the config rules: {missing}"
    assert len(schema.rules()) >= 15


@pytest.mark.parametrize("overrides", options(), ids=lambda o: " ".join(o) or "defaults")
def test_shipped_configs_pass(overrides):
    assert schema.problems(compose(overrides)) == []


# (key, the code's own choice list): each rule is built from the code's list (imported, never copied), so it accepts
# exactly its values. DeCAF's classifiers are a kind with or without "_dropout".
def _choice_lists():
    from engine.decaf.domain import SETTINGS
    from lightning_modules import rcnn, rcnn_segmentation
    from models import bigan_training, linear_classifiers, lrcn, lrcn_caption, video_description
    from models.rcnn import proposals, segments

    kinds = linear_classifiers.KINDS
    return [("bigan.objective", tuple(bigan_training.OBJECTIVES)), ("rcnn.feature_mode", rcnn.FEATURE_MODES),
            ("rcnn.layers", rcnn.FEATURE_LAYERS), ("rcnn.scoring", rcnn.SCORINGS),
            ("rcnn_segmentation.features", rcnn_segmentation.FEATURE_KINDS),
            ("rcnn_segmentation.layers", rcnn_segmentation.LAYERS),
            ("rcnn_segmentation.segments.colour_spaces", segments.COLOUR_SPACES),
            ("rcnn.proposals.mode", proposals.SS_MODES), ("rcnn.proposals.method", proposals.METHODS),
            ("video.input", tuple(video_description.INPUTS)), ("lrcn.variant", lrcn_caption.VARIANTS),
            ("lrcn.unit", lrcn_caption.UNITS), ("lrcn.image_input", lrcn_caption.IMAGE_INPUTS),
            ("lrcn.sequence_model", lrcn.SEQUENCE_MODELS), ("decaf_domain.settings", SETTINGS),
            ("decaf.classifiers", (*kinds, *(k + "_dropout" for k in kinds))), ("backbone.freeze", None)]


@pytest.mark.parametrize("key,choices", _choice_lists(), ids=lambda v: v if isinstance(v, str) else "")
def test_choice_rules_accept_exactly_the_codes_lists(key, choices):
    from models import backbones

    rule = schema.rule_for(key)
    if choices is None:  # the taps: one definition, imported by the backbones
        assert backbones.TAP_NAMES is config_rules.TAP_NAMES
        choices = ("none", "all", *config_rules.TAP_NAMES)
    for value in choices:
        assert rule.accepts(value) or rule.accepts([value]), (key, value)
    assert not rule.accepts("no_such_choice") and not rule.accepts(["no_such_choice"])
    assert all(str(c) in rule.describe() for c in choices)


def test_no_choice_list_is_restated():
    """The rule modules build every choice from the code's tuples: no literal copy of a code list survives."""
    sources = "".join(p.read_text() for p in [ROOT / "transferrable/core/config_rules.py",
                                              *sorted(ROOT.glob("engine/*/config.py"))])
    for _key, choices in _choice_lists():
        if choices and len(choices) > 1:
            literal = "(" + ", ".join(f'"{c}"' for c in choices) + ")"  # a whole tuple or OneOf(...) of them
            assert literal not in sources, f"{_key}: its choices are restated in a rule module {literal}"


@pytest.mark.parametrize("backbone", ["alexnet", "vgg16", "resnet18", "caffenet_mini"])
def test_min_input_size_is_computed_from_the_network(backbone):
    """The smallest input (models/input_limits.py) is where the real network starts to work: one pixel less and an
    unpadded layer fails (alexnet, vgg16) or a padded downsampling layer is left a 1x1 map (resnet, caffenet_mini)."""
    import torch
    from hydra.utils import instantiate

    from models.input_limits import smallest_input_size

    node = compose([f"backbone={backbone}"]).backbone
    cfg = {k: v for k, v in node.items()}
    least = smallest_input_size(cfg)
    assert least == {"alexnet": 63, "vgg16": 32, "resnet18": 17, "caffenet_mini": 5}[backbone]
    net = instantiate({**cfg, "input_size": least, "fc_dim": 8} if "fc_dim" in cfg else {**cfg, "input_size": least})
    assert all(min(s[1:]) >= 1 for s in net.tap_shapes(["conv5"]).values())
    smallest_map: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: smallest_map.append(min(i[0].shape[-2:])))
             for m in net.modules() if getattr(m, "stride", 1) not in (1, (1, 1))]
    try:
        net.eval()(torch.zeros(1, 3, least - 1, least - 1))
        assert min(smallest_map) < 2  # padded: ran, but a strided layer got a 1x1 map
    except RuntimeError:
        assert backbone in ("alexnet", "vgg16")  # unpadded pools: no output at all
    finally:
        for h in hooks:
            h.remove()


# -- one line, exit 2, before any work --------------------------------------------------------------------------
BAD = [  # (overrides, the line train.py prints after "error: ")
    (["dataset.batch_size=0"], "dataset.batch_size=0: expected an integer >= 1"),
    (["model.optimizer.lr=-1"], "model.optimizer.lr=-1: expected a number > 0"),
    (["dataset.eval_batch_size=-4"], "dataset.eval_batch_size=-4: expected an integer >= 1 (or null)"),
    (["dataset.val_fraction=1.0"], "dataset.val_fraction=1.0: expected a number in [0, 1)"),
    (["dataset.num_workers=-1"], "dataset.num_workers=-1: expected an integer >= 0"),
    (["dataset.augment=flips"], "dataset.augment=flips: expected one of none, flip, flip_crop, resized_crop"),
    (["dataset.mean=[0.5,0.5]"], "dataset.mean=[0.5,0.5]: expected a list of 3 values, each a number in [0, 1]"),
    (["dataset.std=[0.3,0,0.3]"], "dataset.std=[0.3,0,0.3]: expected a list of 3 values, each a number > 0"),
    (["trainer.max_epochs=-3"], "trainer.max_epochs=-3: expected an integer >= 0 (or -1: no limit)"),
    (["trainer.limit_train_batches=1.5"],
     "trainer.limit_train_batches=1.5: expected an integer >= 0 (batches) or a fraction in [0, 1] (or null)"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1: expected a number >= 0 (or null)"),
    (["model.optimizer.momentum=1.5"], "model.optimizer.momentum=1.5: expected a number in [0, 1)"),
    (["model.optimizer.weight_decay=-0.1"], "model.optimizer.weight_decay=-0.1: expected a number >= 0"),
    (["model.head_tap=fc9"], "model.head_tap=fc9: expected one of conv1, conv2, conv3, conv4, conv5, pool5, fc6, fc7"),
    (["backbone.freeze=conv9"],
     "backbone.freeze=conv9: expected one of none, all, conv1, conv2, conv3, conv4, conv5, pool5, fc6, fc7 (or null)"),
    (["backbone.dropout=1"], "backbone.dropout=1: expected a number in [0, 1)"),
    (["backbone.widths=[8,16,16]"], "backbone.widths=[8,16,16]: expected a list of 5 values, each an integer >= 1"),
    (["backbone=alexnet", "backbone.input_size=32"],
     "backbone.input_size=32: expected an integer >= 63 for TorchvisionAlexNet"),
    (["backbone=vgg16", "backbone.input_size=28"], "backbone.input_size=28: expected an integer >= 32 for TimmVGG16"),
    (["seed=-1"], "seed=-1: expected an integer in [0, 4.29497e+09]"),
    (["task=rcnn", "rcnn.layers=[fc9]"],
     "rcnn.layers=[fc9]: no layer 'fc9'; expected one of pool5, fc6, fc7, or a list of such values, no repeats"),
    (["task=rcnn", "rcnn.finetune.lr=0"], "rcnn.finetune.lr=0: expected a number > 0"),
    (["task=rcnn", "rcnn.nms_threshold=2"], "rcnn.nms_threshold=2: expected a number in (0, 1]"),
    (["task=rcnn", "+source_overrides.trainer.max_epochs=-5"],
     "source_overrides.trainer.max_epochs=-5: expected an integer >= 0 (or -1: no limit)"),
    (["task=bigan", "bigan.lr=-1"], "bigan.lr=-1: expected a number > 0"),  # model.optimizer.lr: ${bigan.lr}
    (["task=bigan", "bigan.arch=conv", "bigan.image_size=28"],
     "bigan.image_size=28: expected a multiple of 16 with bigan.arch=conv"),
    (["task=decaf", "decaf.features=[fc6,hug]"],
     "decaf.features=[fc6,hug]: no tap 'hug'; expected a list of one or more values, no repeats, each a tap "
     "('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'pool5', 'fc6', 'fc7'), random:<tap>, raw or hog"),
    (["task=decaf", "decaf.splits=0"], "decaf.splits=0: expected an integer >= 1"),
    (["task=lrcn_activity", "lrcn.feature_dropout=1.0"], "lrcn.feature_dropout=1.0: expected a number in [0, 1)"),
    (["task=lrcn_caption", "lrcn.decoders=[beam0]"],
     "lrcn.decoders=[beam0]: expected a list of one or more values, no repeats, each greedy, beam<k> or "
     "sample:<N>:<T>"),
    (["task=lrcn_video_description", "video.beam=0"], "video.beam=0: expected an integer >= 1"),
    (["callbacks=tsne", "callbacks.tsne.taps=[conv1,fc9]"], "callbacks.tsne.taps=[conv1,fc9]: no tap 'fc9'; expected a list"),
    (["task=rcnn", "dataset.min_objects=7"], "dataset.min_objects=7: expected at most dataset.max_objects=6"),
]


def run_wrapped(cfg) -> tuple[int, str]:
    """``runner.train(cfg)`` under train.py's wrapper: (exit code, stderr)."""

    @exit_on_user_error
    def main():
        return runner.train(cfg)

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, stderr.getvalue()


@pytest.fixture
def no_work(monkeypatch):
    monkeypatch.setattr(source, "resolve_source_weights", lambda cfg: pytest.fail("pretraining started"))
    monkeypatch.setattr(runner, "build_datamodule", lambda cfg: pytest.fail("data loading started"))
    monkeypatch.setattr(runner, "extract_configured_archive", lambda cfg: pytest.fail("extraction started"))
    monkeypatch.setattr(runner, "check_task_dataset", lambda cfg: None)  # the value check comes first anyway


@pytest.mark.parametrize("overrides,line", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_value_is_one_line_before_any_work(overrides, line, tmp_path, no_work):
    cfg = point_paths_at(compose_train(["logger=none", *overrides]), tmp_path / "run")
    code, err = run_wrapped(cfg)
    assert code == 2 and err.startswith(f"error: {line}") and err.count("\n") == 1, err


def test_several_bad_values_in_one_line(make_cfg, no_work):
    code, err = run_wrapped(make_cfg("dataset.batch_size=0", "model.optimizer.lr=-1"))
    assert code == 2 and err.count("\n") == 1
    assert "dataset.batch_size=0" in err and "(and 1 more: model.optimizer.lr=-1: expected a number > 0)" in err


# -- unwritable paths -------------------------------------------------------------------------------------------
# Tests run as root, where a chmod'ed read-only directory stays writable; so the "file in the way" case uses a
# path below a regular file, and the permission case replaces os.access (as a non-root user would see it).
@pytest.mark.parametrize("key", config_rules.WRITABLE_PATHS)
def test_path_below_a_file_names_the_override(key, make_cfg, no_work, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = make_cfg()
    cfg.paths[key.split(".")[1]] = str(blocker / "sub")
    code, err = run_wrapped(cfg)
    assert code == 2 and err == f"error: {key}={blocker / 'sub'}: not writable ({blocker} is a file, not a directory)\n"


def test_read_only_directory_names_the_override(make_cfg, no_work, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(ro) else real(p, mode, **kw))
    cfg = make_cfg()
    cfg.paths.cache_dir = str(ro / "cache")
    code, err = run_wrapped(cfg)
    assert code == 2 and err == f"error: paths.cache_dir={ro / 'cache'}: not writable (no write permission on {ro})\n"


def test_evaluate_checkpoint_checks_the_merged_config(make_cfg, tmp_path):
    import torch
    from omegaconf import OmegaConf

    cfg = make_cfg()
    ckpt = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}, "run_config_yaml": OmegaConf.to_yaml(cfg, resolve=True)}, ckpt)
    eval_cfg = OmegaConf.create({"ckpt_path": str(ckpt), "split": "test", "dataset": {"batch_size": 0},
                                 "trainer": {}})
    with pytest.raises(ConfigError, match=r"^dataset.batch_size=0: expected an integer >= 1$"):
        runner.evaluate_checkpoint(eval_cfg)
