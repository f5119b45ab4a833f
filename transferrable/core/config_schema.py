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

A leaf of the import graph but for ``transferrable.core.errors``: the standard library and omegaconf only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from transferrable.core.config_rules import (
    DATASET_RULES,
    RULES,
    TAIL_RULES,
    WRITABLE_PATHS,
    Rule,
    is_int,
)
from transferrable.core.errors import ConfigError


@dataclass
class _Registry:
    """What the methods' ``engine/<method>/config.py`` declared (``register_keys``), in import order."""

    rules: list[tuple[str, Rule]] = field(default_factory=list)
    cross_checks: list[Callable[[Callable[[str], Any]], list[str]]] = field(default_factory=list)
    dataset_nodes: list[str] = field(default_factory=lambda: ["dataset"])
    override_prefixes: list[str] = field(default_factory=lambda: ["source_overrides."])


_REGISTRY = _Registry()


def register_keys(rules: list[tuple[str, Rule]], cross_check: Callable[[Callable[[str], Any]], list[str]] | None = None,
                  dataset_nodes: tuple[str, ...] = (), override_prefixes: tuple[str, ...] = ()) -> None:
    """A method's config rules (``(pattern, Rule)``), its checks between keys (``cross_check(sel) -> messages``),
    the nodes of its config that hold a whole dataset config (checked with ``DATASET_RULES``) and the prefixes whose
    leaves are a nested run's overrides."""
    _REGISTRY.rules.extend(r for r in rules if r not in _REGISTRY.rules)
    if cross_check is not None and cross_check not in _REGISTRY.cross_checks:
        _REGISTRY.cross_checks.append(cross_check)
    _REGISTRY.dataset_nodes.extend(n for n in dataset_nodes if n not in _REGISTRY.dataset_nodes)
    _REGISTRY.override_prefixes.extend(p for p in override_prefixes if p not in _REGISTRY.override_prefixes)
    _RULE_OF.clear()


def rules() -> list[tuple[str, Rule]]:
    """Every rule, in matching order: the suite's, the registered methods', callbacks and loggers, generic names,
    then the dataset rules under every dataset node."""
    datasets = [(f"{node}.{key}", rule) for key, rule in DATASET_RULES.items() for node in _REGISTRY.dataset_nodes]
    return RULES + _REGISTRY.rules + TAIL_RULES + datasets


_RULE_OF: dict[str, Rule | None] = {}  # rule_for's answers (every leaf of every validation asks; cleared on register)


def rule_for(path: str) -> Rule | None:
    """The rule of a dotted config path (the first pattern of :func:`rules` that matches), or None."""
    if path not in _RULE_OF:
        _RULE_OF[path] = _match_rule(path)
    return _RULE_OF[path]


def _match_rule(path: str) -> Rule | None:
    for prefix in _REGISTRY.override_prefixes:  # another run's overrides: the rule of the key below the prefix
        if path.startswith(prefix):
            return rule_for(path[len(prefix):])
    for pattern, rule in rules():
        if fnmatchcase(path, pattern):
            return rule
    return None


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


def mappings_where_values_go(cfg: DictConfig, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, mapping)`` of every mapping given where a rule expects a value (``backbone.fc_dim={a:1}``): a node
    whose own path has a rule while none of its keys has one (``dataset.max_images: {train: N}`` has its rule)."""
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if path == "hydra" or str(key).startswith("_"):
            continue
        node = cfg._get_node(key)
        try:
            value = cfg[key]
        except Exception:  # noqa: BLE001 - unresolvable here
            continue
        if not isinstance(value, DictConfig) or node._is_interpolation():
            continue
        if len(value) and rule_for(path) is not None and not any(rule_for(f"{path}.{k}") for k in value.keys()):
            yield path, OmegaConf.to_container(value, resolve=False)
        else:
            yield from mappings_where_values_go(value, path + ".")


def problems(cfg: DictConfig) -> list[str]:
    """Every rule a value of ``cfg`` breaks, one message each (``<key>=<value>: expected ...``)."""
    found: dict[str, str] = {}
    for path, mapping in mappings_where_values_go(cfg):
        found[path] = f"{path}={mapping}: a mapping; expected {rule_for(path).describe()}"  # type: ignore[union-attr]
    for path, value, node in leaves(cfg):
        rule = rule_for(path)
        if rule is None or rule.accepts(value):
            continue
        where = _origin(cfg, path, node)
        why = rule.detail(value) if rule.detail is not None else None
        found.setdefault(where, f"{where}={show(value)}: {why + '; ' if why else ''}expected {rule.describe()}")
    return list(found.values()) + cross_checks(cfg)


def cross_checks(cfg: DictConfig) -> list[str]:
    """Rules between keys: min <= max, and the registered ones (each method's; the backbone's smallest input,
    computed from the network by ``transferrable/run/backbone_limits.py``)."""
    out: list[str] = []
    sel = lambda key: OmegaConf.select(cfg, key, default=None, throw_on_missing=False)  # noqa: E731
    for prefix in _REGISTRY.dataset_nodes:
        lo, hi = sel(f"{prefix}.min_objects"), sel(f"{prefix}.max_objects")
        if is_int(lo) and is_int(hi) and lo > hi:
            out.append(f"{prefix}.min_objects={lo}: expected at most {prefix}.max_objects={hi}")
    for check in _REGISTRY.cross_checks:
        out += check(sel)
    return out


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
