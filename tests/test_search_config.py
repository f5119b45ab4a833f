"""Bad config values found by search (issue 29): hypothesis draws values for every numeric and choice key of every
config group, for every task and backbone, including boundaries, wrong types and combinations.

Each drawn value either passes the runner's validation path and works, or stops there with one ``ConfigError`` line
naming the key (train.py prints it as ``error: ...`` with exit 2) -- never another exception (a traceback, exit 1).
"Works" is checked in three tiers, as far as two shared cores allow:

- every drawn value: the validation path in-process (``train()`` up to, not including, the DataModule);
- every accepted backbone or input-size value: the backbone built on the meta device and run at the size the
  dataset delivers, every tap (shapes only, no weights: milliseconds);
- a fixed-seed sample of accepted values: end to end at the tiniest size (``train()``), finite metrics.

The keys are enumerated from the composed configs and the registered rules, not listed here.
"""

from __future__ import annotations

import contextlib
import math
import re
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, compose_train, point_paths_at, tiny_overrides
from hydra.core.global_hydra import GlobalHydra
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf, open_dict

import transferrable.run.runner as runner
from models.input_limits import probe_net
from transferrable.core import config_schema as schema
from transferrable.core.archives import extract_configured_archive
from transferrable.core.checkpoints import check_ckpt_path
from transferrable.core.errors import ConfigError, find_user_error, one_line
from transferrable.run.compat import check_task_dataset

SEARCH = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
TASKS = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))
BACKBONES = sorted(p.stem for p in (CONF_DIR / "backbone").glob("*.yaml"))
QUIET = ["logger=none", "hardware=cpu", "trainer.precision=32-true", "seed=0"]
SKIP_KEYS = ("paths.", "hydra.", "logger.")  # paths have their own writability tests; loggers are off here


@cache
def composed(overrides: tuple[str, ...]) -> DictConfig:
    """One composition per option (cached: Hydra's compose costs ~0.3 s), its outputs in a temporary folder."""
    try:
        cfg = compose_train([*QUIET, *overrides])
    finally:
        GlobalHydra.instance().clear()
    out = Path(tempfile.mkdtemp(prefix="search-"))
    return point_paths_at(cfg, out / "run", out / "cache")


def compositions() -> list[tuple[str, ...]]:
    """Every task with its default backbone and dataset, every backbone with task=classify, every task x backbone
    file."""
    out = [(f"task={t}",) for t in TASKS] + [(f"backbone={b}",) for b in BACKBONES]
    for path in sorted((CONF_DIR / "task_backbone").glob("*.yaml")):
        task, backbone = path.stem.split("-", 1)
        out.append((f"task={task}", f"backbone={backbone}"))
    return out


def searchable(rule: schema.Rule, value) -> bool:
    """A numeric or choice key (a number, a list of numbers, or a rule with a fixed set of choices)."""
    num = lambda v: isinstance(v, int | float) and not isinstance(v, bool)  # noqa: E731
    return (num(value) or (isinstance(value, list) and bool(value) and all(num(v) for v in value))
            or "one of" in rule.expected or "true or false" in rule.expected)


@cache
def keys() -> list[tuple[tuple[str, ...], str]]:
    """``(composition, key)`` for every searchable key, each key under the first composition that has it."""
    seen: dict[str, tuple[str, ...]] = {}
    for overrides in compositions():
        for path, value, _ in schema.leaves(composed(overrides)):
            rule = schema.rule_for(path)
            if rule is not None and not path.startswith(SKIP_KEYS) and searchable(rule, value):
                seen.setdefault(path, overrides)
    return [(o, k) for k, o in sorted(seen.items())]


# -- values to try ----------------------------------------------------------------------------------------------
_NUMBER = r"-?\d+(?:\.\d+)?(?:e-?\d+)?"


def boundaries(rule: schema.Rule) -> list:
    """Each bound of the rule's description, one step either side, and the bound itself (int and float)."""
    out: list = []
    for text in re.findall(_NUMBER, rule.expected):
        b = float(text)
        out += [b, b - 1, b + 1, b - 1e-9, b + 1e-9]
        if b.is_integer():
            out += [int(b), int(b) - 1, int(b) + 1]
    return out


def choices(rule: schema.Rule) -> list:
    m = re.search(r"one of (.*?)(?: \(or null\)|, or a list|$)", rule.expected)
    if not m:
        return []
    out: list = []
    for c in m.group(1).split(", "):
        out.append(c)
        if re.fullmatch(r"-?\d+", c):
            out.append(int(c))
    return out


WRONG_TYPES = [None, "", "abc", "1", True, False, [], [1], [1, 2, 3], {"a": 1}, float("nan"), float("inf"),
               -float("inf"), 2**40, -(2**40), 0, -1, 0.5, 1e-12, 1.5]


def values_for(rule: schema.Rule, current) -> st.SearchStrategy:
    near = []
    if isinstance(current, int | float) and not isinstance(current, bool):
        near = [current, current * 2, current // 2 if isinstance(current, int) else current / 2, -current]
    elif isinstance(current, list) and current:
        near = [current, current[:-1], current + current[-1:], [0 for _ in current], [-1 for _ in current],
                [x * 1000 for x in current if isinstance(x, int | float)]]
    pool = boundaries(rule) + choices(rule) + near + WRONG_TYPES
    return st.one_of(st.sampled_from(pool), st.integers(-3, 300), st.floats(-2, 2, allow_nan=False))


# -- the checks -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def with_values(cfg: DictConfig, values: dict):
    """``cfg`` with ``values`` set (interpolations replaced), restored afterwards: a copy per draw costs 0.2 s."""
    saved = {}
    for key in [*values, "trainer.precision"]:
        parent, _, leaf = key.rpartition(".")
        holder = OmegaConf.select(cfg, parent) if parent else cfg
        node = holder._get_node(leaf) if isinstance(holder, DictConfig) and leaf in holder else None
        saved.setdefault(key, node._value() if node is not None else _ABSENT)
    try:
        with open_dict(cfg):
            for key, value in values.items():
                OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        yield cfg
    finally:
        with open_dict(cfg):
            cfg.pop("precision_policy", None)
            for key, raw in saved.items():
                if raw is _ABSENT:
                    parent, _, leaf = key.rpartition(".")
                    (OmegaConf.select(cfg, parent) if parent else cfg).pop(leaf, None)
                else:
                    OmegaConf.update(cfg, key, raw, merge=False, force_add=True)


_ABSENT = object()


def validation_path(cfg: DictConfig) -> None:
    """What ``runner.train`` runs before it builds the DataModule."""
    runner.apply_precision_policy(cfg)
    schema.validate(cfg)
    check_task_dataset(cfg)
    check_ckpt_path(cfg)
    extract_configured_archive(cfg)


def backbone_runs(cfg: DictConfig) -> None:
    """The configured backbone, built on the meta device (models/input_limits.py's cached probe: BatchNorm left out,
    which keeps shapes), runs every tap at the size the dataset delivers."""
    node = OmegaConf.to_container(cfg.backbone, resolve=True)
    size = cfg.dataset.get("input_size", node["input_size"])
    if "bigan" in cfg:  # E sees backbone.input_size (the model resizes)
        size = node["input_size"]
    net = probe_net(node)
    channels = int(getattr(net, "in_channels", 3))
    net.eval().forward_taps(torch.zeros(2, channels, size, size, device="meta"), list(net.tap_names))


def outcome(values: dict, base: DictConfig) -> str | None:
    """None when the values pass and work; the ConfigError line when they are refused. Anything else fails."""
    with with_values(base, values) as cfg:
        try:
            validation_path(cfg)
        except Exception as err:  # noqa: BLE001 - sorted below: only a one-line user error may stop here
            user = find_user_error(err)
            assert isinstance(user, ConfigError), f"{values}: {type(err).__name__} escapes validation: {err}"
            line = one_line(user)
            assert "\n" not in line and "expected" in line, (values, line)
            named = [k for k in values if k in line or k.rsplit(".", 1)[-1] in line]
            assert named, f"{values}: the line names none of the keys: {line}"
            return line
        if any(k.startswith(("backbone.", "dataset.input_size")) for k in values) and "_target_" in cfg.backbone:
            try:
                backbone_runs(cfg)  # an accepted size or width must give a network that runs
            except Exception as err:  # noqa: BLE001
                pytest.fail(f"{values} passed validation but the backbone fails: {type(err).__name__}: {err}"[:400])
    return None


def test_every_searchable_key_is_found():
    """The search covers every group: the counts are what the composed configs and the registered rules give."""
    found = [k for _, k in keys()]
    groups = {k.split(".", 1)[0] for k in found}
    assert {"backbone", "dataset", "trainer", "model", "rcnn", "lrcn", "bigan", "decaf", "callbacks"} <= groups
    assert len(found) >= 150, len(found)


def test_every_key_at_its_boundaries_and_wrong_types():
    """Not drawn: every key at its shipped value, its out-of-range boundaries and choices, and a wrong type (the
    hypothesis tests below draw and combine)."""
    refused = accepted = 0
    for n, (overrides, key) in enumerate(keys()):
        base = composed(overrides)
        rule = schema.rule_for(key)
        current = OmegaConf.select(base, key)
        assert outcome({key: current}, base) is None, (key, current)  # the shipped value passes
        tried = [v for v in boundaries(rule) if not rule.accepts(v)][:1] + choices(rule)[:1]
        for value in [*tried, WRONG_TYPES[n % len(WRONG_TYPES)]]:
            if outcome({key: value}, base) is None:
                accepted += 1
            else:
                refused += 1
    assert refused >= len(keys()) and accepted >= 10, (refused, accepted)


GROUPS = ("backbone", "dataset", "trainer", "model", "method")


def in_group(key: str, group: str) -> bool:
    head = key.split(".", 1)[0]
    return head == group or (group == "method" and head not in (*GROUPS, "callbacks", "seed"))


@pytest.mark.parametrize("group", GROUPS)
def test_drawn_values_and_combinations(group):
    """One to three keys of a group drawn together (same composition), any values: pass and work, or one line."""
    chosen = [(o, k) for o, k in keys() if in_group(k, group)]
    assert chosen

    @SEARCH
    @given(st.data())
    def search(data):
        overrides, first = data.draw(st.sampled_from(chosen))
        same = [k for o, k in chosen if o == overrides]
        picked = [first] + data.draw(st.lists(st.sampled_from(same), max_size=2, unique=True))
        base = composed(overrides)
        values = {k: data.draw(values_for(schema.rule_for(k), OmegaConf.select(base, k))) for k in dict.fromkeys(picked)}
        outcome(values, base)

    search()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_at_drawn_sizes(backbone):
    """Any input size for any backbone (backbone and dataset sizes apart): refused in one line, or a network that
    runs every tap. The limit is the network's own (models/input_limits.py)."""
    base = composed((f"backbone={backbone}",))

    @settings(max_examples=12, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(st.integers(1, 96), st.one_of(st.none(), st.integers(1, 96)))
    def search(size, data_size):
        values = {"backbone.input_size": size}
        if data_size is not None:
            values["dataset.input_size"] = data_size
        outcome(values, base)

    search()


# -- end to end: a fixed sample of accepted values, tiniest size ----------------------------------------------------
MINI = ["backbone.widths=[8,16,16,16,16]", "backbone.fc_dim=32"]
E2E: dict[str, list[str]] = {  # per task: a run of seconds (tests/test_determinism.py's sizes)
    "classify": [*MINI],
    "bigan": ["task=bigan", "bigan.hidden=[32,32]", "bigan.latent_dim=8", "bigan.bn_batches=2",
              "bigan.probe_max_train=200", "trainer.max_epochs=1"],
}
E2E_VALUES: dict[str, list[tuple[str, list]]] = {  # per task: keys whose accepted values are drawn for the run
    "classify": [("backbone.input_size", [5, 9, 17, 28]), ("backbone.pool5_size", [1, 2, 5]),
                 ("backbone.kernel_sizes", [[1, 1, 1, 1, 1], [7, 5, 3, 3, 1]]), ("backbone.conv1_stride", [1, 2, 3]),
                 ("model.label_smoothing", [0.0, 0.5, 0.99]), ("dataset.batch_size", [1, 3, 400]),
                 ("backbone.dropout", [0.0, 0.9]), ("backbone.freeze", ["all", "fc7", "conv1"])],
    "bigan": [("bigan.latent_dim", [1, 3]), ("bigan.hidden", [[1, 1], [64, 8]]), ("dataset.batch_size", [1, 7, 400])],
}


@pytest.mark.parametrize("task", list(E2E))
def test_sample_of_accepted_values_runs_end_to_end(task, fmnist_dir, tmp_path):
    """Three fixed draws of accepted values per task run end to end: finite metrics, or one ConfigError line."""
    import random

    rng = random.Random(29)
    for i in range(3):
        values = {k: rng.choice(v) for k, v in rng.sample(E2E_VALUES[task], 3)}
        overrides = [*tiny_overrides(fmnist_dir), *E2E[task]]
        cfg = point_paths_at(compose_train(overrides), tmp_path / f"run{i}", tmp_path / "cache")
        GlobalHydra.instance().clear()
        with open_dict(cfg):
            for key, value in values.items():
                OmegaConf.update(cfg, key, value, merge=False)
        try:
            metrics = runner.train(cfg)
        except Exception as err:  # noqa: BLE001
            user = find_user_error(err)
            assert isinstance(user, ConfigError), f"{values}: {type(err).__name__} after validation: {err}"
            continue
        numbers = {k: v for k, v in metrics.items() if k.startswith("test/") and isinstance(v, float)}
        assert numbers and all(math.isfinite(v) for v in numbers.values()), (values, numbers)
