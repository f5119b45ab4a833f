"""Every user-facing config value checked before any work: types, ranges, enums, tap lists, writable paths.

A table of rules keyed by dotted config path (``RULES``), matched against every leaf of the composed config;
``*`` matches any run of characters, dots included, so ``*.finetune.lr`` covers ``rcnn.finetune.lr`` and
``rcnn_segmentation.detection.finetune.lr``; the first matching rule wins. Dataset rules apply to ``dataset.*``
and to the second dataset of ``task=decaf_domain`` (``decaf_domain.target.*``); ``source_overrides.X`` (the
nested source pretraining's overrides) is checked with X's rule. A value that comes from an interpolation
(``model.optimizer.lr: ${bigan.lr}``) is reported under the key it comes from, which is the one to override.

Why a rule table and not Hydra structured configs: the groups merge into shared nodes (``dataset`` takes keys
from each dataset option, the tasks and ``task_backbone``), nodes carry ``_target_``/``_partial_`` and
interpolations, and a few keys take several types (``trainer.limit_*``: int or fraction, ``rcnn.scoring``: a
name or a list). A dataclass per option would duplicate every YAML file and make the merges strict; the table
checks the composed result, whatever composed it, including a checkpoint's stored config (eval.py).

A bad value ends in one line and exit 2 (``ConfigError``)::

    error: dataset.batch_size=0: expected an integer >= 1

A leaf of the import graph but for ``transferrable.errors``: the standard library and omegaconf only.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from transferrable.errors import ConfigError

# The taps every backbone has (models/backbones.py imports this tuple: one definition).
TAP_NAMES: tuple[str, ...] = ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7")

# The smallest backbone.input_size for which every tap of a backbone has at least one pixel (measured with
# tap_shapes): AlexNet's 11x11 stride-4 conv1 and unpadded max-pools need 63 px, VGG's five 2x2 pools 32 px;
# caffenet_mini, bigan_alexnet and the ResNets pad every layer and work from 1 px.
MIN_INPUT_SIZE: dict[str, int] = {
    "models.backbones.TorchvisionAlexNet": 63,
    "models.backbones.TimmVGG16": 32,
}

# Copies of the code's own choice lists (tests/test_config_schema.py checks they are equal to the code's).
BIGAN_OBJECTIVES = ("bigan", "gan_discriminator", "latent_regressor", "joint_latent_regressor", "autoencoder_l2",
                    "autoencoder_l1")
RCNN_LAYERS = ("pool5", "fc6", "fc7")
RCNN_SCORINGS = ("svm", "softmax")
FEATURE_MODES = ("warp", "roi_pool")
SEG_FEATURES = ("full", "fg", "full+fg")
SEG_LAYERS = ("fc6", "fc7")
COLOUR_SPACES = ("rgb", "hsv", "lab")
SS_MODES = ("fast", "quality", "single")
DECAF_CLASSIFIERS = ("logreg", "svm", "logreg_dropout", "svm_dropout")
DECAF_SETTINGS = ("S", "T", "ST", "daume")
VIDEO_INPUTS = ("encoder_max", "max", "prob")
AUGMENTS = ("none", "flip", "flip_crop", "resized_crop")
PRECISIONS = ("auto", "64-true", "64", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true",
              "bf16-true", "transformer-engine", "transformer-engine-float16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")

# The writable directories a run needs (checked before any work: a missing one is created later).
WRITABLE_PATHS = ("paths.output_dir", "paths.log_dir", "paths.cache_dir")


# -- rules ------------------------------------------------------------------------------------------------------
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
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
    return Rule(lambda v: _is_int(v) and inside(v), f"an integer {text}".rstrip(), nullable)


def Num(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,  # noqa: N802
        nullable: bool = False) -> Rule:
    inside, text = _bounds(lo, hi, lo_open, hi_open)
    return Rule(lambda v: _is_num(v) and inside(v), f"a number {text}".rstrip(), nullable)


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
DECAF_FEATURE = Match(rf"(random:)?({'|'.join(TAP_NAMES)})|raw|hog",
                      f"a tap ({', '.join(repr(t) for t in TAP_NAMES)}), random:<tap>, raw or hog")
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
    ("backbone.input_size", COUNT),  # and at least MIN_INPUT_SIZE[backbone._target_] (check_input_size)
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
    # task=decaf / decaf_domain
    ("decaf.features", ListOf(DECAF_FEATURE, unique=True, bad_item="no tap {!r}")),
    ("decaf.classifiers", ListOf(OneOf(*DECAF_CLASSIFIERS), unique=True, bad_item="unknown classifier {!r}")),
    ("decaf.train_per_class", COUNT),
    ("decaf.shots", ListOf(COUNT, unique=True, nullable=True)),
    ("decaf.splits", COUNT),
    ("decaf.split_seed", SEED),
    ("decaf.val_fraction", Num(0, 1, lo_open=True, hi_open=True)),
    ("decaf.C_grid", ListOf(POSITIVE)),
    ("decaf.default_C", POSITIVE),
    ("decaf.cv_at", OneOf("largest", "each")),
    ("decaf.dropout_rate", DROPOUT),
    ("decaf.dropout_copies", COUNT),
    ("decaf.max_iter", COUNT),
    ("decaf.pool", OneOf("all", "given")),
    ("decaf.max_images", Int(1, nullable=True)),
    ("decaf.hog.*", COUNT),
    ("decaf.fit_threads", Int(1, nullable=True)),
    ("decaf.tsne.panels", ListOf(DECAF_FEATURE, unique=True, bad_item="no tap {!r}")),
    ("decaf.tsne.max_points", Int(2, nullable=True)),
    ("decaf.tsne.seed", SEED),
    ("decaf.tsne.max_iter", Int(250)),  # scikit-learn's TSNE refuses fewer
    ("decaf.tsne.perplexity", POSITIVE),
    ("decaf_domain.settings", ListOf(OneOf(*DECAF_SETTINGS), unique=True)),
    ("decaf_domain.source_per_class", Int(1, nullable=True)),
    ("decaf_domain.target_per_class", COUNT),
    ("decaf_domain.directions", OneOf("both", "forward")),
    # task=rcnn and rcnn_segmentation's detection node (*.proposals, *.finetune)
    ("rcnn.layers", ListOf(OneOf(*RCNN_LAYERS), unique=True, scalar=True, bad_item="no layer {!r}")),
    ("rcnn.scoring", ListOf(OneOf(*RCNN_SCORINGS), unique=True, scalar=True)),
    ("rcnn.feature_mode", OneOf(*FEATURE_MODES)),
    ("*.finetune.windows", OneOf(*FEATURE_MODES)),
    ("*.proposals.method", OneOf("selective_search", "sliding_window")),
    ("*.proposals.mode", OneOf(*SS_MODES)),
    ("*.proposals.width", COUNT),
    ("*.proposals.max_proposals", COUNT),
    ("*.proposals.min_size", NONNEG),
    ("*.context_pad", Int(0)),
    ("rcnn.roi_scale", POSITIVE),
    ("*.finetune.iterations", COUNT),
    ("*.finetune.max_images", Int(1, nullable=True)),
    ("*.finetune.roi_images", COUNT),
    ("*.finetune.positives", COUNT),
    ("*.finetune.background", Int(0)),
    ("*.finetune.fg_threshold", Num(0, 1, lo_open=True)),
    ("*.finetune.lr", POSITIVE),
    ("*.finetune.head_lr_mult", POSITIVE),
    ("*.finetune.momentum", Num(0, 1, hi_open=True)),
    ("*.finetune.weight_decay", NONNEG),
    ("*.finetune.step_epochs", COUNT),
    ("*.finetune.gamma", Num(0, 1, lo_open=True)),
    ("rcnn.svm.C", POSITIVE),
    ("rcnn.svm.bias_multiplier", POSITIVE),
    ("rcnn.svm.pos_weight", POSITIVE),
    ("rcnn.svm.neg_threshold", PROB),  # IoU below which a region is a negative
    ("rcnn.svm.hard_threshold", Num()),  # SVM scores: any real number (easy < hard is checked below)
    ("rcnn.svm.easy_threshold", Num()),
    ("rcnn.svm.retrain_limit", COUNT),
    ("rcnn.svm.max_cache", COUNT),
    ("*.feature_norm", POSITIVE),
    ("rcnn.svm.max_iter", COUNT),
    ("rcnn.bbox_reg.lam", NONNEG),
    ("rcnn.bbox_reg.min_iou", Num(0, 1, lo_open=True)),
    ("rcnn.nms_threshold", Num(0, 1, lo_open=True)),
    ("rcnn.max_per_image", COUNT),
    ("rcnn.svm_splits", ListOf(OneOf("train", "val"), unique=True)),
    ("*.max_train_images", Int(1, nullable=True)),
    ("*.max_val_images", Int(1, nullable=True)),
    ("*.max_test_images", Int(1, nullable=True)),
    ("*.feature_batch", COUNT),
    ("rcnn.feature_dtype", OneOf("float16", "float32")),
    ("*.draw_images", Int(0)),
    ("rcnn.draw_top", Int(0)),
    ("rcnn.draw_top_regions", Int(0)),
    ("rcnn.finetune_eval_batches", Int(0)),
    ("rcnn.pool5_units", ListOf(Int(0), nullable=True)),
    ("rcnn_segmentation.segments.colour_spaces", ListOf(OneOf(*COLOUR_SPACES), unique=True)),
    ("rcnn_segmentation.segments.scales", ListOf(POSITIVE)),
    ("rcnn_segmentation.segments.sigma", NONNEG),
    ("rcnn_segmentation.segments.min_size", Int(1)),
    ("rcnn_segmentation.segments.min_area", Num(0, 1, hi_open=True)),
    ("rcnn_segmentation.segments.max_regions", COUNT),
    ("rcnn_segmentation.segments.width", Int(1, nullable=True)),
    ("rcnn_segmentation.segments.seed", SEED),
    ("rcnn_segmentation.features", ListOf(OneOf(*SEG_FEATURES), unique=True, scalar=True)),
    ("rcnn_segmentation.layers", ListOf(OneOf(*SEG_LAYERS), unique=True, scalar=True)),
    ("rcnn_segmentation.quality", OneOf("instance", "class")),
    ("rcnn_segmentation.regressor", OneOf("svr", "ridge")),
    ("rcnn_segmentation.svr.C", POSITIVE),
    ("rcnn_segmentation.svr.epsilon", NONNEG),
    ("rcnn_segmentation.svr.loss", OneOf("squared_epsilon_insensitive", "epsilon_insensitive")),
    ("rcnn_segmentation.svr.max_iter", COUNT),
    ("rcnn_segmentation.ridge_alpha", POSITIVE),
    ("rcnn_segmentation.thresholds", ListOf(PROB, nullable=True)),
    ("rcnn_segmentation.finetune", OneOf("none", "detection")),
    ("rcnn_segmentation.val_fraction", Num(0, 1, lo_open=True, hi_open=True)),
    # task=lrcn_activity / lrcn_caption
    ("lrcn.sequence_model", OneOf("lstm", "none")),
    ("lrcn.modality", OneOf("rgb", "flow")),
    ("lrcn.tap", TAP),
    ("lrcn.hidden*", COUNT),
    ("lrcn.embed", COUNT),
    ("lrcn.*dropout", DROPOUT),
    ("lrcn.frame_batch", COUNT),
    ("lrcn.variant", OneOf("1u", "2u", "2f")),
    ("lrcn.unit", OneOf("lstm", "rnn")),
    ("lrcn.image_input", OneOf("every_step", "first_step")),
    ("lrcn.lr", POSITIVE),
    ("lrcn.weight_decay", NONNEG),
    ("lrcn.backbone_lr_scale", NONNEG),
    ("lrcn.max_len", COUNT),
    ("lrcn.decoders", ListOf(Match(r"greedy|beam[1-9]\d*|sample:[1-9]\d*:(\d+\.?\d*|\.\d+)",
                                   "greedy, beam<k> or sample:<N>:<T>"), unique=True)),
    ("lrcn.retrieval.images", COUNT),
    ("lrcn.retrieval.rows_per_batch", COUNT),
    ("lrcn.metrics.meteor", OneOf("all", "main", "none")),
    ("lrcn.show_images", Int(0)),
    # task=lrcn_video_description
    ("video.input", OneOf(*VIDEO_INPUTS)),
    ("video.hidden", COUNT),
    ("video.embed", COUNT),
    ("video.dropout", DROPOUT),
    ("video.lr", POSITIVE),
    ("video.beam", COUNT),
    ("video.max_len", COUNT),
    # task=bigan
    ("bigan.arch", OneOf("mlp", "conv")),
    ("bigan.objective", OneOf(*BIGAN_OBJECTIVES)),
    ("bigan.update", OneOf("simultaneous", "alternating")),
    ("bigan.latent", OneOf("continuous", "discrete")),
    ("bigan.latent_dim", COUNT),
    ("bigan.categories", Int(2)),
    ("bigan.alpha", POSITIVE),
    ("bigan.image_size", Int(1)),  # conv: a multiple of 16 (checked below)
    ("bigan.channels", OneOf(1, 3)),
    ("bigan.pixel_range", OneOf("auto", "unit", "symmetric")),
    ("bigan.hidden", ListOf(COUNT)),
    ("bigan.gan_width", COUNT),
    ("bigan.leak", Num(0, 1, hi_open=True)),
    ("bigan.lr", POSITIVE),
    ("bigan.final_lr", POSITIVE),
    ("bigan.decay_start", Num(0, 1)),
    ("bigan.betas", ListOf(Num(0, 1, hi_open=True), length=2)),
    ("bigan.weight_decay", NONNEG),
    ("bigan.jlr_weight", NONNEG),
    ("bigan.features", OneOf("auto", "encoder", "encoder_hidden", "discriminator")),
    ("bigan.knn_metric", OneOf("euclidean", "cosine")),
    ("bigan.bn_batches", Int(0)),
    ("bigan.probe_C", POSITIVE),
    ("bigan.probe_max_train", Int(1, nullable=True)),
    ("bigan.grid_upscale", COUNT),
    # callbacks, loggers
    ("callbacks.tsne.taps", TAPS),
    ("callbacks.tsne.max_points", Int(2)),
    ("callbacks.tsne.split", OneOf("train", "val", "test")),
    ("callbacks.tsne.seed", SEED),
    ("callbacks.tsne.max_dim", COUNT),
    ("callbacks.tsne.perplexity", POSITIVE),
    ("callbacks.tsne.max_iter", Int(250)),
    ("callbacks.sample_grid.*", COUNT),
    ("callbacks.bigan_grids.upscale", COUNT),
    ("callbacks.model_summary.max_depth", Int(-1)),
    ("callbacks.progress_bar.refresh_rate", Int(0)),
    ("logger.wandb.probe_timeout", POSITIVE),
    ("paths.cache_lock_timeout_s", POSITIVE),
    # generic names, last: what the specific rules above did not claim
    ("*_seed", SEED),
    ("*.seed", SEED),
]
for _key, _rule in DATASET_RULES.items():
    RULES += [(f"dataset.{_key}", _rule), (f"decaf_domain.target.{_key}", _rule)]

# Prefixes whose leaves are another run's overrides: checked with the rule of the key below the prefix.
OVERRIDE_PREFIXES = ("source_overrides.", "bigan_source_overrides.")


def rule_for(path: str) -> Rule | None:
    """The rule of a dotted config path (the first pattern of ``RULES`` that matches), or None."""
    for prefix in OVERRIDE_PREFIXES:
        if path.startswith(prefix):
            return rule_for(path[len(prefix):])
    for pattern, rule in RULES:
        if fnmatchcase(path, pattern):
            return rule
    return None


# -- walking the config -----------------------------------------------------------------------------------------
_PLAIN_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def _origin(cfg: DictConfig, path: str, node: Any) -> str:
    """The key a value comes from: ``model.optimizer.lr: ${bigan.lr}`` -> ``bigan.lr`` (followed to its end)."""
    seen = {path}
    while node is not None and node._is_interpolation():
        m = _PLAIN_INTERPOLATION.fullmatch(str(node._value()))
        if not m or m.group(1) in seen:
            break
        path = m.group(1)
        seen.add(path)
        try:
            node = _node_at(cfg, path)
        except Exception:  # noqa: BLE001 - a key the walk cannot follow: report the last one found
            break
    return path


def _node_at(cfg: DictConfig, path: str) -> Any:
    parent, _, key = path.rpartition(".")
    holder = OmegaConf.select(cfg, parent) if parent else cfg
    return holder._get_node(key) if isinstance(holder, DictConfig) else None


def leaves(cfg: DictConfig, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(dotted path, resolved value, node)`` of every leaf but ``hydra.*`` and ``_target_``-like keys; a list
    of scalars is one leaf; a node that interpolates a whole node (``model.cfg: ${bigan}``) is not walked. A
    value that does not resolve here (``${hydra:...}`` outside a run, ``???``) is skipped."""
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if path == "hydra" or str(key).startswith("_"):  # _target_, _partial_, _convert_: not user values
            continue
        node = cfg._get_node(key)
        try:
            value = cfg[key]
        except Exception:  # noqa: BLE001 - unresolvable here: not a value to check
            continue
        if isinstance(value, DictConfig):
            if not node._is_interpolation():  # model.cfg: ${bigan} is a copy of a node walked on its own
                yield from leaves(value, path + ".")
        elif isinstance(value, ListConfig):
            try:
                plain = OmegaConf.to_container(value, resolve=True)
            except Exception:  # noqa: BLE001
                continue
            if not any(isinstance(x, dict | list) for x in plain):
                yield path, plain, node
        else:
            yield path, value, node


def show(value: Any) -> str:
    """A value as it would be written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


def problems(cfg: DictConfig) -> list[str]:
    """Every rule a value of ``cfg`` breaks, one message each (``<key>=<value>: expected ...``)."""
    found: dict[str, str] = {}
    for path, value, node in leaves(cfg):
        rule = rule_for(path)
        if rule is None or rule.accepts(value):
            continue
        where = _origin(cfg, path, node)
        why = rule.detail(value) if rule.detail is not None else None
        found.setdefault(where, f"{where}={show(value)}: {why + '; ' if why else ''}expected {rule.describe()}")
    return list(found.values()) + cross_checks(cfg)


def cross_checks(cfg: DictConfig) -> list[str]:
    """Rules between keys: sizes the backbone's taps need, min <= max, a conv BiGAN's image size."""
    out: list[str] = []
    sel = lambda key: OmegaConf.select(cfg, key, default=None, throw_on_missing=False)  # noqa: E731
    target, size = sel("backbone._target_"), sel("backbone.input_size")
    least = MIN_INPUT_SIZE.get(str(target), 1)
    if _is_int(size) and 1 <= size < least:
        out.append(f"backbone.input_size={size}: expected an integer >= {least} for {str(target).rsplit('.', 1)[-1]} "
                   f"(smaller inputs leave its conv5/pool5 taps without a pixel)")
    for prefix in ("dataset", "decaf_domain.target"):
        lo, hi = sel(f"{prefix}.min_objects"), sel(f"{prefix}.max_objects")
        if _is_int(lo) and _is_int(hi) and lo > hi:
            out.append(f"{prefix}.min_objects={lo}: expected at most {prefix}.max_objects={hi}")
    if sel("bigan.arch") == "conv" and _is_int(sel("bigan.image_size")) and sel("bigan.image_size") % 16:
        out.append(f"bigan.image_size={sel('bigan.image_size')}: expected a multiple of 16 with bigan.arch=conv "
                   f"(four stride-2 layers)")
    easy, hard = sel("rcnn.svm.easy_threshold"), sel("rcnn.svm.hard_threshold")
    if _is_num(easy) and _is_num(hard) and easy >= hard:
        out.append(f"rcnn.svm.easy_threshold={easy}: expected below rcnn.svm.hard_threshold={hard}")
    return out


# -- writable directories ---------------------------------------------------------------------------------------
def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` (a directory, created later if missing) cannot be written, or None when it can."""
    p = Path(os.path.expanduser(str(path)))
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"no write permission on {probe}" if probe != p else "no write permission"
    return None


def path_problems(cfg: DictConfig, keys: tuple[str, ...] = WRITABLE_PATHS) -> list[str]:
    out = []
    for key in keys:
        try:
            value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        except Exception:  # noqa: BLE001 - ${hydra:...} outside a run
            continue
        if value is None:
            continue
        reason = unwritable_reason(value)
        if reason:
            out.append(f"{key}={value}: not writable ({reason})")
    return out


def validate(cfg: DictConfig, paths: bool = True) -> None:
    """Raise one ``ConfigError`` line for the first bad value of ``cfg`` (naming how many others there are)."""
    found = problems(cfg) + (path_problems(cfg) if paths else [])
    if found:
        more = f" (and {len(found) - 1} more: {'; '.join(found[1:3])}{'; ...' if len(found) > 3 else ''})" \
            if len(found) > 1 else ""
        raise ConfigError(found[0] + more)
