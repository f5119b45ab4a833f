"""Where backbone weights come from: nothing (random), a hub (needs internet), or a checkpoint file.

``source:<dataset>`` (the suite's own pretrained representation) is resolved to a checkpoint path
before the backbone is built, by ``transferrable.source``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from torch import nn

from transferrable.checkpoints import load_failure
from transferrable.errors import UserError

HUB_PREFIX = "hub"


class WeightsError(UserError, RuntimeError):
    """A one-line, user-facing problem with ``backbone.weights``."""


def hub_unavailable(arch: str, spec: str, why: str) -> WeightsError:
    return WeightsError(
        f"backbone.weights={spec!r} for '{arch}': {why}. Offline, use backbone.weights=source:fashion_mnist "
        f"(the suite's own pretrained representation), a checkpoint path, or null (random init)."
    )


def is_hub_spec(spec: str | None) -> bool:
    return isinstance(spec, str) and (spec == HUB_PREFIX or spec.startswith(HUB_PREFIX + ":"))


def hub_only(spec: str | None) -> str | None:
    """The part of a weights spec applied at construction: hub specs only."""
    return spec if is_hub_spec(spec) else None


def _internet_reachable(host: str, timeout: float = 1.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _require_online(arch: str, spec: str, host: str) -> None:
    # Hub clients retry for tens of seconds when offline; a one-second probe fails fast instead.
    if os.environ.get("HF_HUB_OFFLINE") == "1" and host == "huggingface.co":
        raise hub_unavailable(arch, spec, "HF_HUB_OFFLINE=1 is set, so hub weights cannot be downloaded")
    if not _internet_reachable(host):
        raise hub_unavailable(arch, spec, f"no internet ({host} unreachable), so hub weights cannot be downloaded")


def create_timm(model_name: str, spec: str | None, arch: str) -> nn.Module:
    """Build a timm model; ``spec='hub'`` or ``'hub:<timm tag>'`` downloads pretrained weights."""
    import timm

    if spec is None:
        return timm.create_model(model_name, pretrained=False)
    if not is_hub_spec(spec):
        raise ValueError(f"unexpected weights spec {spec!r} at construction (paths are loaded afterwards)")
    _require_online(arch, spec, "huggingface.co")
    name = model_name if spec == HUB_PREFIX else f"{model_name}.{spec.split(':', 1)[1]}"
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear line
        raise hub_unavailable(arch, spec, f"timm could not load '{name}' ({type(err).__name__})") from err


def load_torchvision_hub(builder, enum_name: str, spec: str | None, arch: str, dropout: float) -> nn.Module:
    if spec is None:
        return builder(weights=None, dropout=dropout)
    if not is_hub_spec(spec):
        raise ValueError(f"unexpected weights spec {spec!r} at construction (paths are loaded afterwards)")
    import torchvision

    _require_online(arch, spec, "download.pytorch.org")
    tag = "DEFAULT" if spec == HUB_PREFIX else spec.split(":", 1)[1]
    try:
        weights = getattr(torchvision.models, enum_name)[tag]
        return builder(weights=weights, dropout=dropout)
    except Exception as err:  # noqa: BLE001
        raise hub_unavailable(arch, spec, f"torchvision could not load {enum_name}.{tag} ({type(err).__name__})") from err


def backbone_state_from_file(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read backbone weights from a suite checkpoint (``{'arch', 'state_dict'}``), a Lightning
    checkpoint (keys under ``backbone.``) or a bare state dict. Always ``weights_only=True``:
    a checkpoint can carry tensors and plain values, never code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"backbone.weights={str(path)!r}: no such checkpoint file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise WeightsError(
            f"backbone.weights={str(path)!r}: not a loadable weights-only checkpoint ({load_failure(err)})"
        ) from err
    arch = None
    if isinstance(blob, dict) and "state_dict" in blob:
        arch = blob.get("backbone_arch") or blob.get("arch")
        blob = blob["state_dict"]
    if not isinstance(blob, dict):
        raise WeightsError(f"backbone.weights={str(path)!r}: expected a state dict, found {type(blob).__name__}")
    if any(k.startswith("backbone.") for k in blob):
        blob = {k[len("backbone.") :]: v for k, v in blob.items() if k.startswith("backbone.")}
    return blob, arch


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a checkpoint into ``backbone``; another architecture gives one clear mismatch error."""
    state, arch = backbone_state_from_file(path)
    own_arch = getattr(backbone, "arch", type(backbone).__name__)
    if arch is not None and arch != own_arch:
        raise WeightsError(
            f"backbone.weights={str(path)!r} holds a '{arch}' backbone, but backbone is '{own_arch}'"
        )
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape_mismatch = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shape_mismatch:
        detail = (
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(shape_mismatch)} with other shapes (e.g. {shape_mismatch[:2]})"
        )
        raise WeightsError(
            f"backbone.weights={str(path)!r} does not match backbone '{own_arch}' "
            f"(input_size/width overrides must match the checkpoint): {detail}"
        )
    backbone.load_state_dict(state)
