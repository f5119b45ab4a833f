"""The cross-check of ``backbone.input_size`` against the smallest input the configured backbone can take, computed
from its layers (``models/input_limits.py``). It lives in the run layer because it builds the network (on the meta
device: shapes only), which the config schema (``transferrable/core``) must not import; importing this module
registers it with the schema, as each method's ``engine/<method>/config.py`` registers its own checks.

The same limit holds for ``dataset.input_size`` where the dataset's images go to the backbone as they are (its
default interpolates ``${backbone.input_size}``); a task whose model resizes them first (``task=bigan``: E sees
``backbone.input_size``) declares that node in ``RESIZED_BEFORE_BACKBONE``.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from transferrable.core.config_schema import register_keys, rule_for

# config nodes whose presence means the dataset's images are resized before the backbone sees them
RESIZED_BEFORE_BACKBONE = ("bigan",)


def _backbone_config(sel) -> dict[str, Any] | None:
    """The backbone node as plain values, when it is a ``TapBackbone`` whose every value passes its rule (a bad
    value is reported by its rule, not here)."""
    node = sel("backbone")
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    try:
        cfg = OmegaConf.to_container(node, resolve=True)
        from hydra.utils import get_class

        from models.backbones import TapBackbone

        if not issubclass(get_class(str(cfg["_target_"])), TapBackbone):
            return None
    except Exception:  # noqa: BLE001 - an unresolvable node or another kind of backbone: nothing to check here
        return None
    for key, value in cfg.items():
        rule = rule_for(f"backbone.{key}")
        if rule is not None and not rule.accepts(value):
            return None
    return cfg


def input_size_check(sel) -> list[str]:
    from models.input_limits import probe_net, size_is_usable, smallest_input_size

    cfg = _backbone_config(sel)
    if cfg is None:
        return []
    name = str(cfg["_target_"]).rsplit(".", 1)[-1]
    try:
        probe_net(cfg)
        size_is_usable(cfg, int(cfg.get("input_size") or 1))
    except Exception as err:  # noqa: BLE001 - values each rule accepts but the constructor refuses together
        cause = err.__cause__ or err  # Hydra's InstantiationException wraps the constructor's error
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        return [f"backbone={name}: cannot be built with these values ({type(cause).__name__}: {first})"]
    sizes = [("backbone.input_size", cfg.get("input_size"))]
    data_size = sel("dataset.input_size")
    if not any(sel(node) is not None for node in RESIZED_BEFORE_BACKBONE) and data_size != cfg.get("input_size"):
        sizes.append(("dataset.input_size", data_size))
    out = []
    for key, size in sizes:
        if isinstance(size, int) and not isinstance(size, bool) and size >= 1 and not size_is_usable(cfg, size):
            least = smallest_input_size(cfg)
            out.append(f"{key}={size}: expected an integer >= {least} for {name} (a smaller input leaves a "
                       "downsampling layer of its conv1..pool5 under 2x2 pixels)")
    return out


register_keys([], input_size_check)
