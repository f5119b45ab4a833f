"""Every documented command runs: the ``python train.py ...`` / ``python eval.py ...`` lines of README.md,
docs/**/*.md and the comments of conf/**/*.yaml are collected, composed in-process, and pointed at tiny
directories written here in each real dataset's on-disk layout (VOC, VOC segmentation + SBD, COCO captions +
Karpathy JSON, Flickr30k, UCF101, Caltech-101 and Office-31 as image folders, MNIST / Fashion-MNIST IDX).

- every command composes (a multirun, ``-m`` or an experiment's sweep, composes its first job);
- every train command's DataModule is instantiated, and set up when its dataset is a real layout (the
  generated sets are written on first use elsewhere: tests/test_voc_scenes.py, test_ucf101_motion.py, ...);
- one command per task x real dataset pair that can run offline runs a tiny fit (``backbone.weights=null``, one
  epoch of one batch, tiny task sizes) through ``transferrable.run.runner.train``;
- commands that cannot run here (``backbone.weights=hub``, ``hardware=gpu|multi_gpu|slurm``, ``eval.py`` on a
  run directory, ``ckpt_path=<run>``) are composed and set up only, and listed as such.

A task config that sets keys of one dataset for every dataset (``task=rcnn dataset=voc`` once failed with
``unexpected keyword argument 'n_train'``) fails here in ``test_every_task_dataset_pair_instantiates``.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CONF_DIR, ROOT, compose_train, point_paths_at, tiny_overrides
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf, open_dict
from test_datamodules import make_idx_dataset, write_image
from test_rcnn_segmentation import write_shapes_voc
from test_voc_scenes import ann, make_voc

from transferrable.core.errors import ConfigError
from transferrable.run.compat import check_task_dataset, dataset_target, provided

# ------------------------------------------------------------------------------------------------------------
# collecting the commands
# ------------------------------------------------------------------------------------------------------------
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted(CONF_DIR.rglob("*.yaml"))]
_START = re.compile(r"python (train|eval)\.py\b")
_PLACEHOLDER = re.compile(r"<[^<>\n]*>")
PLACEHOLDER_TOKEN = "@PLACEHOLDER@"
_USAGE = re.compile(r"\[\w+=\w+ \.\.\.\]")
# placeholders that stand for a value, not a path
PLACEHOLDER_VALUES = {"<chosen>": "50"}


@dataclass
class Command:
    program: str  # train | eval
    args: list[str]
    where: list[str] = field(default_factory=list)  # file:line of each place it is documented

    @property
    def text(self) -> str:
        return " ".join([f"python {self.program}.py", *self.args])


def _lines(path: Path) -> list[str]:
    """The lines of a file that may hold commands: YAML comments (without '#'), every line of Markdown."""
    out = []
    for line in path.read_text().splitlines():
        if path.suffix == ".yaml":
            stripped = line.strip()
            out.append(stripped[1:].strip() if stripped.startswith("#") else "")
        else:
            out.append(line)
    return out


def _command_text(lines: list[str], i: int, start: int) -> str:
    """The command starting at ``lines[i][start:]``: up to a closing backtick (inline code), joined over
    backslash continuations."""
    line = lines[i]
    inline = line[:start].count("`") % 2 == 1
    text = line[start:]
    if inline:
        return text.split("`", 1)[0]
    while text.rstrip().endswith("\\") and i + 1 < len(lines):
        i += 1
        text = text.rstrip()[:-1] + " " + lines[i].strip()
    return text


def _args(text: str) -> list[str]:
    for ph, value in PLACEHOLDER_VALUES.items():
        text = text.replace(ph, value)
    text = _PLACEHOLDER.sub(PLACEHOLDER_TOKEN, text)
    text = re.split(r"\s{3,}(?=[^#\s])", text)[0]  # conf/eval.yaml: `command     what it does` (no '#')
    args = []
    for tok in shlex.split(text, comments=True):
        if tok in ("...", "\u2026"):
            continue
        m = re.fullmatch(r"\[(\w[\w.@]*=.*)\]", tok)  # [metrics=[...]]: an optional argument, shown
        args.append(m.group(1) if m else tok)
    return args


def collect_commands() -> list[Command]:
    found: dict[tuple, Command] = {}
    for path in DOC_FILES:
        lines = _lines(path)
        for i, line in enumerate(lines):
            for m in _START.finditer(line):
                text = _command_text(lines, i, m.end())
                if _USAGE.search(text):  # conf/train.yaml's `python train.py [group=option ...] [key=value ...]`
                    continue
                args = _args(text)
                key = (m.group(1), tuple(args))
                cmd = found.setdefault(key, Command(m.group(1), args))
                cmd.where.append(f"{path.relative_to(ROOT)}:{i + 1}")
    return list(found.values())


COMMANDS = collect_commands()
TRAIN = [c for c in COMMANDS if c.program == "train"]
EVAL = [c for c in COMMANDS if c.program == "eval"]


def test_commands_are_collected():
    """The collection finds the commands of every place they are documented in."""
    assert len(TRAIN) >= 60 and len(EVAL) >= 8, (len(TRAIN), len(EVAL))
    texts = {c.text for c in COMMANDS}
    for expected in ("python train.py", "python train.py task=rcnn", "python train.py -m experiment=rcnn_layers",
                     "python eval.py fuse=[@PLACEHOLDER@,@PLACEHOLDER@]"):
        assert expected in texts, expected
    sources = {w.split(":")[0] for c in COMMANDS for w in c.where}
    assert {"README.md", "docs/methods/rcnn.md", "conf/task/rcnn.yaml", "conf/eval.yaml"} <= sources
    # continuation lines are joined: the documented VOC command reaches its last override
    voc = [c for c in TRAIN if "dataset=voc" in c.args and "task=rcnn" in c.args]
    assert voc and any("backbone.weights=hub" in c.args for c in voc)


# ------------------------------------------------------------------------------------------------------------
# the tiny real-layout data root: /data/... in a command becomes <root>/...
# ------------------------------------------------------------------------------------------------------------
CAPTIONS = ["a red disc on a grey ground", "a blue box on a grey ground", "a red disc next to a blue box",
            "a grey ground with a red disc", "a blue box and a red disc"]


def _write_voc_detection(root: Path) -> Path:
    """VOCdevkit/VOC2007: JPEGImages/, Annotations/*.xml, ImageSets/Main/{train,val,trainval,test}.txt, with
    coloured boxes drawn where the annotations say."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    annotations, boxes = {}, {}
    for k in range(8):
        objs = []
        for j in range(1 + k % 2):
            x1, y1 = int(rng.integers(2, 30)), int(rng.integers(2, 20))
            objs.append((("cat", "dog")[(k + j) % 2], (x1, y1, x1 + int(rng.integers(14, 30)), y1 + int(rng.integers(12, 24))), 0))
        annotations[f"{k:06d}"] = ann(*objs, size=(64, 48))
        boxes[f"{k:06d}"] = objs
    make_voc(root, annotations, size=(64, 48))
    for image_id, objs in boxes.items():
        img = Image.fromarray(np.clip(rng.normal(110, 20, (48, 64, 3)), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for name, (x1, y1, x2, y2), _ in objs:
            draw.rectangle([x1, y1, min(x2, 63), min(y2, 47)], fill=(200, 40, 40) if name == "cat" else (40, 60, 200))
        img.save(root / "JPEGImages" / f"{image_id}.jpg")
    return root


def _write_sbd(root: Path, voc: Path) -> Path:
    """benchmark_RELEASE/dataset: img/, cls/, inst/ (.mat) and train.txt (SBD)."""
    from PIL import Image
    from scipy.io import savemat

    for sub in ("img", "cls", "inst"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    m = np.zeros((48, 64), np.uint8)
    m[10:30, 12:40] = 2
    for image_id in ("sbd0", "sbd1"):
        Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(root / "img" / f"{image_id}.jpg")
        savemat(root / "cls" / f"{image_id}.mat", {"GTcls": {"Segmentation": m}})
        savemat(root / "inst" / f"{image_id}.mat", {"GTinst": {"Segmentation": (m > 0).astype(np.uint8)}})
    (root / "train.txt").write_text("sbd0\nsbd1\n")
    return root


def _write_captions(root: Path, folder_of, n: dict[str, int]) -> list[dict]:
    """Images under ``root/<folder_of(split)>`` and their Karpathy entries (5 captions each)."""
    from PIL import Image

    images, sent = [], 0
    for split, count in n.items():
        for i in range(count):
            name = f"{split}_{i}.jpg"
            (root / folder_of(split)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((24, 32, 3), 40 + 20 * i, np.uint8)).save(root / folder_of(split) / name)
            sentences = []
            for c in CAPTIONS:
                sentences.append({"raw": c, "tokens": c.split(), "sentid": sent})
                sent += 1
            images.append({"filepath": folder_of(split), "filename": name, "split": split, "sentences": sentences,
                           "cocoid": len(images) + 1, "imgid": len(images)})
    return images


def _write_coco(root: Path) -> Path:
    """coco/: annotations/captions_{train,val}2014.json + train2014/ val2014/, and dataset_coco.json."""
    n = {"train": 6, "restval": 2, "val": 2, "test": 2}
    images = _write_captions(root, lambda s: "train2014" if s == "train" else "val2014", n)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for folder in ("train2014", "val2014"):
        mine = [im for im in images if im["filepath"] == folder]
        blob = {"images": [{"id": im["cocoid"], "file_name": im["filename"]} for im in mine],
                "annotations": [{"id": s["sentid"], "image_id": im["cocoid"], "caption": s["raw"]}
                                for im in mine for s in im["sentences"]]}
        (root / "annotations" / f"captions_{folder}.json").write_text(json.dumps(blob))
    (root / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    return root


def _write_flickr30k(root: Path) -> Path:
    """flickr30k/: dataset_flickr30k.json (Karpathy, no filepath) + flickr30k-images/."""
    images = _write_captions(root, lambda s: "flickr30k-images", {"train": 6, "val": 2, "test": 2})
    for im in images:
        del im["filepath"]
    (root / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    return root


def _write_image_classes(root: Path, classes: list[str], per_class: int) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"image_{i:04d}.jpg", value=30 * c + 7 * i, size=(20, 16))
    return root


@pytest.fixture(scope="session")
def data_root(tmp_path_factory, fmnist_dir) -> Path:
    """One directory holding every real layout the documented commands name under /data/ (or
    ${paths.data_dir})."""
    from datamodules.motion_generator import generate_motions

    root = tmp_path_factory.mktemp("data")
    voc07 = _write_voc_detection(root / "VOCdevkit" / "VOC2007")
    for year in ("VOC2011", "VOC2012"):
        write_shapes_voc(root / "VOCdevkit" / year, 8)
    _write_sbd(root / "benchmark_RELEASE" / "dataset", root / "VOCdevkit" / "VOC2011")
    _write_coco(root / "coco")
    _write_flickr30k(root / "flickr30k")
    ucf = generate_motions(tmp_path_factory.mktemp("ucf101"), progress=False, classes=["MoveLeft", "MoveRight"],
                           clips_per_group=1, num_frames=16, frame_size=24, seed=0, data_dir=fmnist_dir)
    (root / "UCF101").symlink_to(ucf, target_is_directory=True)
    _write_image_classes(root / "101_ObjectCategories", ["BACKGROUND_Google", "accordion", "airplanes"], 6)
    for domain in ("amazon", "webcam"):
        _write_image_classes(root / "office31" / domain / "images", ["back_pack", "bike", "calculator"], 6)
    make_idx_dataset(root / "mnist", per_class_train=6, per_class_test=3)
    assert (voc07 / "ImageSets" / "Main" / "trainval.txt").is_file()
    return root


# ------------------------------------------------------------------------------------------------------------
# composing a documented command against the data root
# ------------------------------------------------------------------------------------------------------------
REAL_LAYOUTS = {"voc", "voc_segmentation", "coco_captions", "flickr30k", "ucf101", "imagefolder", "mnist",
                "fashion_mnist", "digits"}
GENERATED = {"scenes", "scenes_segmentation", "scene_captions", "moving_objects", "video_tuples", "fractalnet",
             "fractalnet100", "fractalnet300", "fractal_caltech", "fractal_office", "fashion_clutter"}
OFFLINE_IMPOSSIBLE = [("backbone.weights=hub", "hub weights need the internet"),
                      ("hardware=gpu", "needs a GPU"), ("hardware=multi_gpu", "needs GPUs"),
                      ("hardware=slurm", "needs SLURM")]


def _rewrite(arg: str, data_root: Path, scratch: Path) -> str:
    """/data/... -> <data_root>/...; a placeholder -> a scratch path."""
    if "=" not in arg:
        return arg
    key, value = arg.split("=", 1)
    value = re.sub(r"(?<![\w.])/data/", f"{data_root}/", value)
    return f"{key}={value.replace(PLACEHOLDER_TOKEN, str(scratch / 'placeholder'))}"


def _first_job(args: list[str]) -> list[str]:
    """What ``-m`` runs first: the basic sweeper's first job (sweeps of the command line)."""
    parsed = OverridesParser.create().parse_overrides(args)
    return next(iter(BasicSweeper.split_arguments(parsed, None)))[0]


def compose_command(cmd: Command, data_root: Path, fmnist_dir: Path, scratch: Path, extra=()):
    """The composed config of a documented command, its first job if a multirun, paths in ``scratch``."""
    args = [_rewrite(a, data_root, scratch) for a in cmd.args if a not in ("-m", "--multirun")]
    args = _first_job(args)
    config = "eval" if cmd.program == "eval" else "train"
    base = [f"paths.data_dir={data_root}"]
    cfg = compose_train([*base, *args, *extra], config_name=config)
    if config == "train":
        # an experiment's own sweep (hydra.sweeper.params): its first job, for the keys the command leaves
        params = cfg.hydra.sweeper.get("params") if "params" in cfg.hydra.sweeper else None
        given = {a.split("=", 1)[0].lstrip("+~") for a in args}
        if params and cfg.hydra.sweeper._target_.endswith("BasicSweeper"):
            swept = [f"{k}={v}" for k, v in params.items() if k not in given]
            if swept:
                GlobalHydra.instance().clear()
                cfg = compose_train([*base, *args, *_first_job(swept), *extra], config_name=config)
        if cfg.hydra.runtime.choices.dataset == "fashion_mnist" and "dataset.data_dir" not in given:
            with open_dict(cfg):
                cfg.dataset.data_dir = str(fmnist_dir)
    return point_paths_at(cfg, scratch / "run", scratch.parent / "cache")


def _why_not_run(cmd: Command) -> str | None:
    if cmd.program == "eval":
        return "eval.py reads a run or sweep directory"
    for arg, why in OFFLINE_IMPOSSIBLE:
        if arg in cmd.args:
            return why
    if any(PLACEHOLDER_TOKEN in a for a in cmd.args):
        return "names a placeholder run"
    if any(a.startswith("hparams_search=") for a in cmd.args):
        return "an Optuna sweep"
    return None


def _datamodules(cfg):
    yield "dataset", cfg.hydra.runtime.choices.dataset, cfg.dataset
    if "decaf_domain" in cfg and "target" in cfg.decaf_domain:
        yield "decaf_domain.target", cfg.hydra.runtime.choices["dataset@decaf_domain.target"], cfg.decaf_domain.target


@pytest.mark.parametrize("cmd", TRAIN, ids=[c.text for c in TRAIN])
def test_train_command_composes_and_sets_up(cmd, data_root, fmnist_dir, tmp_path):
    cfg = compose_command(cmd, data_root, fmnist_dir, tmp_path)
    if not any(a.startswith("experiment=") or a in ("-m", "--multirun") for a in cmd.args):  # FITS' cheap reading
        assert task_and_dataset(cmd.args) == (cfg.task_name, cfg.hydra.runtime.choices.dataset), cmd.where
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_container(plain, resolve=True, throw_on_missing=True)  # every interpolation resolves
    check_task_dataset(cfg)
    for where, name, node in _datamodules(cfg):
        dm = instantiate(node)  # a key the DataModule does not take fails here
        if name in REAL_LAYOUTS:
            dm.prepare_data()
            dm.setup()
        else:
            assert name in GENERATED, f"{cmd.where}: {where}={name} is neither a real layout nor generated"


@pytest.mark.parametrize("cmd", EVAL, ids=[c.text for c in EVAL])
def test_eval_command_composes(cmd, data_root, fmnist_dir, tmp_path):
    cfg = compose_command(cmd, data_root, fmnist_dir, tmp_path)
    assert cfg.task_name == "eval"
    assert cfg.ckpt_path or cfg.report or cfg.fuse, cmd.where


def test_commands_that_are_composed_only_are_listed():
    """What cannot run offline, by reason (printed with -s), and that nothing real-data is left unrun for
    another reason."""
    skipped = {}
    for cmd in COMMANDS:
        why = _why_not_run(cmd)
        if why:
            skipped.setdefault(why, []).append(cmd.text)
    for why, texts in sorted(skipped.items()):
        what = "composed only" if why.startswith("eval.py") else "composed and set up only"
        print(f"{what} ({why}): {len(texts)}")
        for t in texts:
            print("   ", t)
    assert set(skipped) <= {"eval.py reads a run or sweep directory", "hub weights need the internet",
                            "needs a GPU", "needs GPUs", "needs SLURM", "names a placeholder run", "an Optuna sweep"}


# ------------------------------------------------------------------------------------------------------------
# tiny fits: one documented command per task x real dataset pair that can run offline
# ------------------------------------------------------------------------------------------------------------
FIT_OVERRIDES = {
    "rcnn": ["rcnn.proposals.mode=single", "rcnn.proposals.width=64", "rcnn.proposals.max_proposals=40",
             "rcnn.finetune.iterations=2", "rcnn.finetune.positives=4", "rcnn.finetune.background=12",
             "rcnn.layers=[fc7]", "rcnn.scoring=svm", "rcnn.draw_images=0", "rcnn.analysis=false",
             "rcnn.finetune_eval_batches=0", "rcnn.svm.max_iter=200", "rcnn.grayscale_source=false"],
    "classify": [], "bigan": [],
    "lrcn_activity": [],
    "lrcn_caption": ["lrcn.metrics.java=false", "lrcn.decoders=[greedy]", "lrcn.hidden=16", "lrcn.embed=16",
                     "dataset.vocab_min_count=1", "lrcn.show_images=0"],
}
FIT_COMMON = [o for o in tiny_overrides("unused") if not o.startswith("dataset.")] + [
    "backbone.weights=null", "dataset.batch_size=4", "dataset.eval_batch_size=4", "trainer.max_epochs=1", "++trainer.limit_train_batches=1", "++trainer.limit_val_batches=1",
    "++trainer.limit_test_batches=1"]


@functools.cache
def _yaml(config: Path) -> dict:
    return yaml.safe_load(config.read_text()) or {}


def _chain(config: Path):
    """A config, then (recursively) the configs of its own group that it extends (``- decaf`` in decaf_domain.yaml)."""
    yield _yaml(config)
    for entry in _yaml(config).get("defaults", []):
        if isinstance(entry, str) and entry != "_self_" and (config.parent / f"{entry}.yaml").is_file():
            yield from _chain(config.parent / f"{entry}.yaml")


def _group_default(config: Path, group: str) -> str | None:
    """The option a config (or one it extends) picks for ``group``: ``- group: x`` or ``- override /group: x``."""
    for node in _chain(config):
        for entry in node.get("defaults", []):
            for key, value in (entry.items() if isinstance(entry, dict) else ()):
                if key.removeprefix("override ").strip("/ ") == group:
                    return str(value)
    return None


def _own_or_extended(config: Path, key: str):
    """A top-level key of a config, or of a config it extends."""
    return next((node[key] for node in _chain(config) if key in node), None)


def task_and_dataset(args: list[str]) -> tuple[str, str]:
    """(task_name, dataset choice) of a plain train command, read from its overrides and the defaults lists
    without composing (a compose is ~0.5 s and collection would pay it for every command on every xdist worker).
    ``test_train_command_composes_and_sets_up`` checks it against the composed config for every command."""
    picks = dict(a.split("=", 1) for a in args if re.match(r"^\w+=", a))
    task = picks.get("task") or _group_default(CONF_DIR / "train.yaml", "task")
    task_name, dataset = task, _group_default(CONF_DIR / "train.yaml", "dataset")
    # in train.yaml's defaults order: the task, then the groups after it that may set task_name or the dataset
    for config in (CONF_DIR / "task" / f"{task}.yaml",
                   *(CONF_DIR / g / f"{picks[g]}.yaml" for g in ("experiment", "hparams_search", "debug") if g in picks)):
        task_name = _own_or_extended(config, "task_name") or task_name
        dataset = _group_default(config, "dataset") or dataset
    return str(task_name), picks.get("dataset", dataset)


def _fit_commands() -> list[Command]:
    """The first documented command of each task x real dataset pair that runs offline and has tiny sizes."""
    picked: dict[tuple[str, str], Command] = {}
    for cmd in TRAIN:
        if _why_not_run(cmd) or any(a.startswith(("experiment=", "ckpt_path=")) or "-m" == a for a in cmd.args):
            continue
        task, dataset = task_and_dataset(cmd.args)
        if task in FIT_OVERRIDES and dataset in REAL_LAYOUTS:
            picked.setdefault((task, dataset), cmd)
    return list(picked.values())


FITS = _fit_commands()


def test_rcnn_on_voc_is_documented_and_fit():
    assert any({"task=rcnn", "dataset=voc"} <= set(c.args) for c in FITS), [c.text for c in FITS]


@pytest.mark.parametrize("cmd", FITS, ids=[c.text for c in FITS])
def test_documented_command_fits_one_batch(cmd, data_root, fmnist_dir, tmp_path):
    from transferrable.run import runner

    probe = compose_command(cmd, data_root, fmnist_dir, tmp_path)
    task = probe.task_name
    GlobalHydra.instance().clear()
    cfg = compose_command(cmd, data_root, fmnist_dir, tmp_path, extra=[*FIT_COMMON, *FIT_OVERRIDES[task]])
    metrics = runner.train(cfg)
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert any(k.startswith("test/") for k in metrics), sorted(metrics)
    if task == "rcnn":  # fine-tuned on the VOC directory's train split, evaluated on its test split
        assert metrics["rcnn/finetuned"] is True and 0.0 <= metrics["test/mAP"] <= 1.0, metrics
        assert (tmp_path / "run" / "rcnn_results.json").is_file()


# ------------------------------------------------------------------------------------------------------------
# no task pushes one dataset's keys into another
# ------------------------------------------------------------------------------------------------------------
TASKS = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml"))


@pytest.mark.parametrize("task", TASKS)
def test_every_task_dataset_pair_instantiates(task, tmp_path):
    """For every dataset a task accepts (transferrable/run/compat.py) and every backbone, the composed dataset node
    is one its DataModule takes: a task (or task x backbone) config never sets keys of one dataset only."""
    # the default backbone, and every backbone with a task x backbone (x dataset) config of this task
    special = {p.stem.split("-")[1] for g in ("task_backbone", "task_backbone_dataset")
               for p in (CONF_DIR / g).glob(f"{task}-*.yaml")}
    backbones = ["caffenet_mini", *sorted(special)]
    default = compose_train([f"task={task}"])
    GlobalHydra.instance().clear()
    needs = set(getattr(get_class(default.model._target_), "REQUIRES_DATA", ()))
    fits = 0
    for dataset in DATASETS:
        target = dataset_target(dataset)
        if target and not needs <= provided(target):  # check_task_dataset refuses the pair: nothing to build
            continue
        for backbone in backbones:
            cfg = point_paths_at(compose_train([f"task={task}", f"dataset={dataset}", f"backbone={backbone}"]),
                                 tmp_path)
            GlobalHydra.instance().clear()
            try:
                check_task_dataset(cfg)
            except ConfigError:
                break
            instantiate(cfg.dataset)
            fits += 1
    assert fits >= len(backbones), task


def test_rcnn_dataset_settings_live_in_task_dataset_configs():
    """task=rcnn's scene counts apply to the generated scenes only (task_dataset), the larger networks' smaller scene
    sets to scenes x that backbone only (task_backbone_dataset); dataset=voc is conf/dataset/voc.yaml as it is. At
    run time the inputs are normalised as the weights were trained: a source:<dataset> representation's dataset
    statistics, or the hub weights' own."""
    from transferrable.run.runner import apply_hub_normalisation, apply_source_normalisation

    scenes = compose_train(["task=rcnn"]).dataset
    assert (scenes.n_train, scenes.n_val, scenes.n_test) == (200, 50, 100)
    GlobalHydra.instance().clear()
    vgg = compose_train(["task=rcnn", "backbone=vgg16"]).dataset
    assert (vgg.n_train, vgg.n_val, vgg.n_test) == (100, 20, 50)
    GlobalHydra.instance().clear()
    for backbone in ("caffenet_mini", "alexnet", "vgg16"):
        voc = compose_train(["task=rcnn", "dataset=voc", f"backbone={backbone}"]).dataset
        GlobalHydra.instance().clear()
        plain = compose_train(["dataset=voc", f"backbone={backbone}"]).dataset
        GlobalHydra.instance().clear()
        assert OmegaConf.to_container(voc) == OmegaConf.to_container(plain), backbone
    for source_dataset in ("fashion_mnist", "fractalnet"):
        cfg = compose_train(["task=rcnn", "dataset=voc", f"source_dataset={source_dataset}"])
        GlobalHydra.instance().clear()
        apply_source_normalisation(cfg)
        stats = compose_train([f"dataset={source_dataset}"]).dataset
        GlobalHydra.instance().clear()
        assert (list(cfg.dataset.mean), list(cfg.dataset.std)) == (list(stats.mean), list(stats.std))
    hub = compose_train(["task=rcnn", "dataset=voc", "backbone=alexnet", "backbone.weights=hub"])
    GlobalHydra.instance().clear()
    apply_hub_normalisation(hub)
    apply_source_normalisation(hub)  # not a source: nothing changes
    assert list(hub.dataset.mean) == [0.485, 0.456, 0.406] and list(hub.dataset.std) == [0.229, 0.224, 0.225]
