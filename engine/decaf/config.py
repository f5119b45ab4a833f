"""The ``decaf:`` and ``decaf_domain:`` keys' rules (task=decaf, task=decaf_domain), registered with the config schema;
``decaf_domain.target`` holds a whole second dataset config, checked with the dataset rules."""

from __future__ import annotations

from engine.decaf.domain import SETTINGS
from models.linear_classifiers import KINDS, SOLVERS
from transferrable.core.config_rules import (
                      COUNT,
                      DROPOUT,
                      POSITIVE,
                      SEED,
                      TAP_NAMES,
                      Int,
                      ListOf,
                      Match,
                      Num,
                      OneOf,
)
from transferrable.core.config_schema import register_keys

# a classifier name: a kind, or a kind with feature dropout (``svm_dropout``)
CLASSIFIERS = tuple(kind + suffix for suffix in ("", "_dropout") for kind in KINDS)
DECAF_FEATURE = Match(rf"(random:)?({'|'.join(TAP_NAMES)})|raw|hog",
                      f"a tap ({', '.join(repr(t) for t in TAP_NAMES)}), random:<tap>, raw or hog")

RULES = [
    # task=decaf / decaf_domain
    ("decaf.features", ListOf(DECAF_FEATURE, unique=True, bad_item="no tap {!r}")),
    ("decaf.classifiers", ListOf(OneOf(*CLASSIFIERS), unique=True, bad_item="unknown classifier {!r}")),
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
    ("decaf.solver", OneOf(*SOLVERS)),
    ("decaf.pool", OneOf("all", "given")),
    ("decaf.max_images", Int(1, nullable=True)),
    ("decaf.hog.*", COUNT),
    ("decaf.fit_threads", Int(1, nullable=True)),
    ("decaf.fit_workers", Int(1, nullable=True)),
    ("decaf.tsne.panels", ListOf(DECAF_FEATURE, unique=True, bad_item="no tap {!r}")),
    ("decaf.tsne.max_points", Int(2, nullable=True)),
    ("decaf.tsne.seed", SEED),
    ("decaf.tsne.max_iter", Int(250)),  # scikit-learn's TSNE refuses fewer
    ("decaf.tsne.perplexity", POSITIVE),
    ("decaf_domain.settings", ListOf(OneOf(*SETTINGS), unique=True)),
    ("decaf_domain.source_per_class", Int(1, nullable=True)),
    ("decaf_domain.target_per_class", COUNT),
    ("decaf_domain.directions", OneOf("both", "forward")),
]

register_keys(RULES, dataset_nodes=("decaf_domain.target",))
