"""The config rules: what each user-facing key accepts (``Rule`` and its constructors ``Int``, ``Num``, ``OneOf``,
``ListOf``, ...), the suite-wide keys' rules (seed, backbone, trainer, model, dataset, callbacks, loggers) and the
suite-wide choice lists. A method's own keys' rules are in ``engine/<method>/config.py``; matching and reporting are
``transferrable/core/config_schema.py``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The taps every backbone has (models/backbones.py imports this tuple: one definition).
TAP_NAMES: tuple[str, ...] = ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7")


# The suite-wide choice lists (declared here, the lowest layer that checks them; a method's own lists live in its
# code and its rules in engine/<method>/config.py import them).
AUGMENTS = ("none", "flip", "flip_crop", "resized_crop")


PRECISIONS = ("auto", "64-true", "64", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true",
              "bf16-true", "transformer-engine", "transformer-engine-float16")


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")


# The writable directories a run needs (checked before any work: a missing one is created later).
WRITABLE_PATHS = ("paths.output_dir", "paths.log_dir", "paths.cache_dir")


@dataclass(frozen=True)
class Rule:
    """``ok(value)`` is true for an accepted value; ``expected`` says what is accepted, for the message."""

    ok: Callable[[Any], bool]
    expected: str
    nullable: bool = False
    detail: Callable[[Any], str | None] | None = None  # what is wrong, e.g. "no tap 'fc8'" (before "expected")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        try:
            return bool(self.ok(value))
        except (TypeError, ValueError):
            return False

    def describe(self) -> str:
        return self.expected + (" (or null)" if self.nullable else "")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(x: float) -> str:
    return f"{x:g}"


def _bounds(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> tuple[Callable[[float], bool], str]:
    def inside(v: float) -> bool:
        return ((lo is None or (v > lo if lo_open else v >= lo))
                and (hi is None or (v < hi if hi_open else v <= hi)))

    if lo is not None and hi is not None:
        text = f"in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"{'>' if lo_open else '>='} {_fmt(lo)}"
    elif hi is not None:
        text = f"{'<' if hi_open else '<='} {_fmt(hi)}"
    else:
        text = ""
    return inside, text


def Int(lo: int | None = None, hi: int | None = None, nullable: bool = False) -> Rule:  # noqa: N802
    inside, text = _bounds(lo, hi, False, False)
    return Rule(lambda v: is_int(v) and inside(v), f"an integer {text}".rstrip(), nullable)


def Num(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,  # noqa: N802
        nullable: bool = False) -> Rule:
    inside, text = _bounds(lo, hi, lo_open, hi_open)
    return Rule(lambda v: is_num(v) and inside(v), f"a number {text}".rstrip(), nullable)


def OneOf(*choices: Any, nullable: bool = False) -> Rule:  # noqa: N802
    def ok(v: Any) -> bool:
        return any(v == c and type(v) is type(c) for c in choices)

    return Rule(ok, "one of " + ", ".join(str(c) for c in choices), nullable)


def Bool(nullable: bool = False) -> Rule:  # noqa: N802
    return Rule(lambda v: isinstance(v, bool), "true or false", nullable)


def Text(nullable: bool = False) -> Rule:  # noqa: N802
    return Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string", nullable)


def Match(pattern: str, expected: str, nullable: bool = False) -> Rule:  # noqa: N802
    rx = re.compile(pattern)
    return Rule(lambda v: isinstance(v, str) and rx.fullmatch(v) is not None, expected, nullable)


def ListOf(item: Rule, min_len: int = 1, length: int | None = None, scalar: bool = False,  # noqa: N802
           unique: bool = False, nullable: bool = False, bad_item: str | None = None) -> Rule:
    """A list of ``item``s (``scalar``: a single item is accepted too, as ``rcnn.scoring: svm``); ``bad_item``
    (e.g. ``"no tap {!r}"``) names the first item that is not accepted in the message."""

    def detail(v: Any) -> str | None:
        items = v if isinstance(v, list) else [v]
        bad = [x for x in items if not item.accepts(x)]
        return bad_item.format(bad[0]) if bad_item and bad else None

    def ok(v: Any) -> bool:
        if scalar and not isinstance(v, list):
            return item.accepts(v)
        if not isinstance(v, list):
            return False
        if (length is not None and len(v) != length) or len(v) < min_len:
            return False
        if unique and len({str(x) for x in v}) != len(v):
            return False
        return all(item.accepts(x) for x in v)

    count = str(length) if length is not None else ("one or more" if min_len >= 1 else "any number of")
    repeats = ", no repeats" if unique else ""
    text = (f"{item.describe()}, or a list of such values{repeats}" if scalar
            else f"a list of {count} values{repeats}, each {item.describe()}")
    return Rule(ok, text, nullable, detail)


def AnyOf(*rules: Rule, expected: str | None = None, nullable: bool = False) -> Rule:  # noqa: N802
    return Rule(lambda v: any(r.accepts(v) for r in rules),
                expected or " or ".join(r.describe() for r in rules), nullable)


FRACTION_OPEN_HI = Num(0, 1, hi_open=True)  # a share that must leave something: [0, 1)


PROB = Num(0, 1)


POSITIVE = Num(0, lo_open=True)


NONNEG = Num(0)


COUNT = Int(1)


SEED = Int(0, 2**32 - 1)


TAP = OneOf(*TAP_NAMES)


TAPS = ListOf(TAP, unique=True, bad_item="no tap {!r}")


DROPOUT = Num(0, 1, hi_open=True)


FREEZE = OneOf("none", "all", *TAP_NAMES, nullable=True)


LIMIT_BATCHES = AnyOf(Int(0), Num(0, 1), expected="an integer >= 0 (batches) or a fraction in [0, 1]", nullable=True)


# dataset rules, keyed below ``dataset.`` (and ``decaf_domain.target.``)
DATASET_RULES: dict[str, Rule] = {
    "batch_size": COUNT,
    "eval_batch_size": Int(1, nullable=True),
    "num_workers": Int(0),
    "input_size": COUNT,
    "val_fraction": FRACTION_OPEN_HI,
    "test_fraction": Num(0, 1, lo_open=True, hi_open=True),
    "train_per_class": Int(1, nullable=True),
    "max_train_samples": Int(1, nullable=True),
    "max_images": Int(1, nullable=True),
    "max_images.*": Int(1, nullable=True),  # coco_captions: {train: N, test: M}
    "seed": SEED,
    "scene_seed": SEED,
    "caption_seed": SEED,
    "motion_seed": SEED,
    "world_seed": SEED,
    "mean": ListOf(Num(0, 1), length=3),
    "std": ListOf(POSITIVE, length=3),
    "augment": OneOf(*AUGMENTS),
    "classes": ListOf(Rule(lambda v: isinstance(v, str | int) and str(v) != "", "a folder or class name"), unique=True,
                      nullable=True),
    "exclude_classes": ListOf(Rule(lambda v: isinstance(v, str | int), "a folder or class name"), min_len=0),
    "actions": ListOf(Text(), unique=True, nullable=True),
    # generated scenes / captions / videos
    "n_train": COUNT,
    "n_val": COUNT,
    "n_test": COUNT,
    "image_size": ListOf(Int(32), length=2),
    "min_objects": COUNT,
    "max_objects": COUNT,
    "void_width": Int(0),
    "jpeg_quality": Int(1, 100),
    "captions_per_image": COUNT,
    "val_images": Int(0),
    "vocab_min_count": COUNT,
    "max_caption_len": COUNT,
    "references": COUNT,
    "signal": NONNEG,
    "confusion": PROB,
    # the generated fractal world (datamodules/fractal_generator.py)
    "role": OneOf("imagenet", "caltech", "office"),
    "category_set": OneOf("source", "validation", "caltech", "office", nullable=True),
    "domain": OneOf("amazon", "webcam", "dslr", nullable=True),
    "n_classes": Int(2),
    "images_per_class": Int(2),
    "val_per_class": Int(0),
    "crop_size": Int(8),
    "in_memory": Bool(),
    # videos
    "split": OneOf(1, 2, 3),
    "modality": OneOf("rgb", "flow"),
    "frame_size": ListOf(Int(16), length=2),
    "max_frames": Int(1, nullable=True),
    "clip_length": COUNT,
    "test_stride": COUNT,
    "val_groups": Int(0),
    "flow.method": OneOf("farneback", "tvl1"),
    "flow.bound": POSITIVE,
    "bad_videos": OneOf("error", "skip"),
    "short_videos": OneOf("loop", "pad"),
    "n_groups": COUNT,
    "clips_per_group": COUNT,
    "num_frames": COUNT,
    "video_size": Int(16),
    "distractors": Int(0),
    "camera_jitter": NONNEG,
    "noise": NONNEG,
    "object_size": ListOf(Num(0, 1, lo_open=True), length=2),
}


RULES: list[tuple[str, Rule]] = [
    ("seed", SEED),
    # backbone
    ("backbone.input_size", COUNT),  # and at least what the network needs (transferrable/run/backbone_limits.py)
    ("backbone.freeze", FREEZE),
    ("backbone.pool5_size", COUNT),
    ("backbone.fc_dim", COUNT),
    ("backbone.dropout", DROPOUT),
    ("backbone.widths", ListOf(COUNT, length=5)),
    ("backbone.kernel_sizes", ListOf(COUNT, length=5)),
    ("backbone.conv1_stride", COUNT),
    ("backbone.in_channels", OneOf(1, 3)),
    ("backbone.leak", Num(0, 1, hi_open=True)),
    ("backbone.init", OneOf("auto", "dcgan", "kaiming")),
    # trainer
    ("trainer.max_epochs", AnyOf(Int(0), OneOf(-1), expected="an integer >= 0 (or -1: no limit)")),
    ("trainer.devices", AnyOf(Int(1), OneOf(-1), OneOf("auto"), Match(r"-1|\d+(,\d*)*", ""), ListOf(Int(0)),
                              expected="an integer >= 1, -1 (all), auto or a list of device ids")),
    ("trainer.num_nodes", COUNT),
    ("trainer.precision", Rule(lambda v: str(v) in PRECISIONS, "one of " + ", ".join(PRECISIONS))),
    ("trainer.accelerator", OneOf(*ACCELERATORS)),
    ("trainer.log_every_n_steps", COUNT),
    ("trainer.check_val_every_n_epoch", Int(1, nullable=True)),
    ("trainer.num_sanity_val_steps", Int(-1)),
    ("trainer.gradient_clip_val", Num(0, nullable=True)),
    ("trainer.accumulate_grad_batches", COUNT),
    ("trainer.limit_*_batches", LIMIT_BATCHES),
    ("trainer.overfit_batches", AnyOf(Int(0), Num(0, 1), expected="an integer >= 0 (batches) or a fraction in [0, 1]")),
    ("trainer.fast_dev_run", AnyOf(Bool(), Int(0), expected="true, false or an integer >= 0 (batches)")),
    ("trainer.deterministic", AnyOf(Bool(), OneOf("warn"), expected="true, false or warn", nullable=True)),
    # model (a task's own nodes come first where model.* interpolates them)
    ("model.head_tap", TAP),
    ("model.label_smoothing", Num(0, 1, hi_open=True)),
    ("model.optimizer.lr", POSITIVE),
    ("model.optimizer.momentum", Num(0, 1, hi_open=True)),
    ("model.optimizer.weight_decay", NONNEG),
    ("model.optimizer.betas", ListOf(Num(0, 1, hi_open=True), length=2)),
    ("model.scheduler.max_lr", POSITIVE),
    ("model.scheduler.pct_start", Num(0, 1, lo_open=True, hi_open=True)),
    ("model.scheduler.step_size", COUNT),
    ("model.scheduler.gamma", Num(0, 1, lo_open=True)),
    ("model.scheduler.final_lr", NONNEG),
    ("model.scheduler.decay_start", Num(0, 1)),
    ("model.seed", SEED),
    ("model.clip_length", COUNT),
    ("model.test_stride", COUNT),
]


# After the methods' rules (engine/<method>/config.py, registered below): callbacks and loggers.
TAIL_RULES: list[tuple[str, Rule]] = [
    # callbacks, loggers
    ("callbacks.tsne.taps", TAPS),
    ("callbacks.tsne.max_points", Int(2)),
    ("callbacks.tsne.split", OneOf("train", "val", "test")),
    ("callbacks.tsne.seed", SEED),
    ("callbacks.tsne.max_dim", COUNT),
    ("callbacks.tsne.perplexity", POSITIVE),
    ("callbacks.tsne.max_iter", Int(250)),
    ("callbacks.sample_grid.*", COUNT),
    ("callbacks.model_summary.max_depth", Int(-1)),
    ("callbacks.progress_bar.refresh_rate", Int(0)),
    ("logger.wandb.probe_timeout", POSITIVE),
    ("paths.cache_lock_timeout_s", POSITIVE),
    # generic names, last: what the specific rules above did not claim
    ("*_seed", SEED),
    ("*.seed", SEED),
]
