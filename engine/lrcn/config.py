"""The ``lrcn:`` and ``video:`` keys' rules (task=lrcn_activity, lrcn_caption, lrcn_video_description), registered
with the config schema."""

from __future__ import annotations

from models.lrcn import SEQUENCE_MODELS
from models.lrcn_caption import IMAGE_INPUTS, UNITS, VARIANTS
from models.video_description import INPUTS
from transferrable.core.config_rules import COUNT, DROPOUT, NONNEG, POSITIVE, TAP, Int, ListOf, Match, OneOf
from transferrable.core.config_schema import register_keys

VIDEO_INPUTS = tuple(INPUTS)

RULES = [
    # task=lrcn_activity / lrcn_caption
    ("lrcn.sequence_model", OneOf(*SEQUENCE_MODELS)),
    ("lrcn.modality", OneOf("rgb", "flow")),
    ("lrcn.tap", TAP),
    ("lrcn.hidden*", COUNT),
    ("lrcn.embed", COUNT),
    ("lrcn.*dropout", DROPOUT),
    ("lrcn.frame_batch", COUNT),
    ("lrcn.variant", OneOf(*VARIANTS)),
    ("lrcn.unit", OneOf(*UNITS)),
    ("lrcn.image_input", OneOf(*IMAGE_INPUTS)),
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
]

register_keys(RULES)
