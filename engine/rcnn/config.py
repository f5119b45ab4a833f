"""The ``rcnn:`` and ``rcnn_segmentation:`` keys' rules (task=rcnn, task=rcnn_segmentation; ``*.proposals`` and
``*.finetune`` also cover the segmentation task's ``detection`` node), registered with the config schema."""

from __future__ import annotations

from lightning_modules.rcnn import FEATURE_LAYERS, FEATURE_MODES, SCORINGS
from lightning_modules.rcnn_segmentation import FEATURE_KINDS
from lightning_modules.rcnn_segmentation import LAYERS as SEG_LAYERS
from models.rcnn.proposals import METHODS as PROPOSAL_METHODS
from models.rcnn.proposals import SS_MODES
from models.rcnn.segments import COLOUR_SPACES
from transferrable.core.config_rules import (
    COUNT,
    NONNEG,
    POSITIVE,
    PROB,
    SEED,
    Int,
    ListOf,
    Num,
    OneOf,
    is_num,
)
from transferrable.core.config_schema import register_keys

RULES = [
    # task=rcnn and rcnn_segmentation's detection node (*.proposals, *.finetune)
    ("rcnn.layers", ListOf(OneOf(*FEATURE_LAYERS), unique=True, scalar=True, bad_item="no layer {!r}")),
    ("rcnn.scoring", ListOf(OneOf(*SCORINGS), unique=True, scalar=True)),
    ("rcnn.feature_mode", OneOf(*FEATURE_MODES)),
    ("*.finetune.windows", OneOf(*FEATURE_MODES)),
    ("*.proposals.method", OneOf(*PROPOSAL_METHODS)),
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
    ("rcnn_segmentation.features", ListOf(OneOf(*FEATURE_KINDS), unique=True, scalar=True)),
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
]


def cross_check(sel) -> list[str]:
    """Hard negatives score above ``hard_threshold`` and easy ones (evicted) below ``easy_threshold``: easy < hard."""
    easy, hard = sel("rcnn.svm.easy_threshold"), sel("rcnn.svm.hard_threshold")
    if is_num(easy) and is_num(hard) and easy >= hard:
        return [f"rcnn.svm.easy_threshold={easy}: expected below rcnn.svm.hard_threshold={hard}"]
    return []


register_keys(RULES, cross_check)
