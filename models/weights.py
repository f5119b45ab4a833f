"""Where backbone weights come from: nothing (random), a hub (internet, or a pre-populated local cache), or a
checkpoint file.

Hub weights already in the local cache load without a network probe: timm's through the Hugging Face cache
(``HF_HUB_CACHE``, ``models--timm--<name>/snapshots/<rev>/model.safetensors``) when ``HF_HUB_OFFLINE=1``,
torchvision's from ``$TORCH_HOME/hub/checkpoints/<file>``, whose sha256 prefix (in its name) is checked first, so a
corrupt file is one line naming it. Inputs are normalised with the hub weights' own statistics
(``hub_statistics``; ``transferrable.run.runner.apply_hub_normalisation`` sets ``dataset.mean/std``).

``source:<dataset>`` (the suite's own pretrained representation) is resolved to a checkpoint path
before the backbone is built, by ``transferrable.run.source``.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path

import torch
from torch import nn

from transferrable.core.checkpoints import load_failure
from transferrable.core.errors import UserError

HUB_PREFIX = "hub"


class WeightsError(UserError, RuntimeError):
    """A one-line, user-facing problem with ``backbone.weights``."""


def hub_unavailable(arch: str, spec: str, why: str) -> WeightsError:
    return WeightsError(
        f"backbone.weights={spec!r} for '{arch}': {why}. Offline, use backbone=efficientnet_lite0 (ImageNet "
        f"weights installed with the suite), backbone.weights=source:<dataset> (the suite's own pretrained "
        f"representation, e.g. source:fashion_mnist), a checkpoint path, or null (random init)."
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


def hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` set as huggingface_hub understands it (1/ON/YES/TRUE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _require_online(arch: str, spec: str, host: str, cached_hint: str | None = None) -> None:
    # Hub clients retry for tens of seconds when offline; a one-second probe fails fast instead.
    if hf_offline() and host == "huggingface.co":
        raise hub_unavailable(arch, spec, "HF_HUB_OFFLINE=1 is set and the weights are not in the Hugging Face cache "
                                          f"({_hf_cache_dir()}), so hub weights cannot be downloaded")
    if not _internet_reachable(host):
        if cached_hint:
            raise hub_unavailable(arch, spec, f"no internet ({host} unreachable); the weights are cached at "
                                              f"{cached_hint}: set HF_HUB_OFFLINE=1 to use them")
        raise hub_unavailable(arch, spec, f"no internet ({host} unreachable), so hub weights cannot be downloaded")


def timm_hub_name(model_name: str, spec: str) -> str:
    """The timm model name a hub spec asks for: ``hub`` -> its default tag, ``hub:<tag>`` -> ``<name>.<tag>``."""
    return model_name if spec == HUB_PREFIX else f"{model_name}.{spec.split(':', 1)[1]}"


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants
    except ImportError:
        return "HF_HUB_CACHE"
    return str(constants.HF_HUB_CACHE)


def timm_cached_file(name: str) -> str | None:
    """The local Hugging Face cache file timm would load for ``name`` (``resnet18`` -> ``timm/resnet18.a1_in1k``'s
    ``model.safetensors``), or None when it is not cached (or timm has no hub weights for it)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown tag: create_model reports it
        return None
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, _, revision = hub_id.partition("@")
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for filename in files:
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def create_timm(model_name: str, spec: str | None, arch: str) -> nn.Module:
    """Build a timm model; ``spec='hub'`` or ``'hub:<timm tag>'`` loads pretrained weights (from the Hugging Face
    cache when they are there and ``HF_HUB_OFFLINE=1``, else downloaded)."""
    import timm

    if spec is None:
        return timm.create_model(model_name, pretrained=False)
    if not is_hub_spec(spec):
        raise ValueError(f"unexpected weights spec {spec!r} at construction (paths are loaded afterwards)")
    name = timm_hub_name(model_name, spec)
    cached = timm_cached_file(name)
    if not (cached and hf_offline()):
        _require_online(arch, spec, "huggingface.co", cached)
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear line
        if cached:
            raise WeightsError(f"backbone.weights={spec!r} for '{arch}': timm could not load the cached file {cached} "
                               f"({_first_line(err)}); delete {Path(cached).parents[2]} and retry") from err
        raise hub_unavailable(arch, spec, f"timm could not load '{name}' ({type(err).__name__})") from err


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def torchvision_weights(enum_name: str, spec: str):
    """The torchvision weights enum member a hub spec names (``hub`` -> ``DEFAULT``)."""
    import torchvision

    tag = "DEFAULT" if spec == HUB_PREFIX else spec.split(":", 1)[1]
    return getattr(torchvision.models, enum_name)[tag]


def torchvision_cached_file(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps ``url``: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?", 1)[0])


_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's HASH_REGEX: the sha256 prefix in a hub file's name


def _check_cached_hash(path: Path, arch: str, spec: str) -> None:
    """torch.hub checks the hash only when it downloads; a cached file is loaded as it is. Check it here."""
    match = _HASH_IN_NAME.search(path.name)
    if not match or not match.group(1):
        return
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    if not sha.hexdigest().startswith(match.group(1)):
        raise WeightsError(f"backbone.weights={spec!r} for '{arch}': the cached file {path} is corrupt (its sha256 "
                           f"does not start with {match.group(1)}); delete {path} and retry")


def load_torchvision_hub(builder, enum_name: str, spec: str | None, arch: str, dropout: float) -> nn.Module:
    if spec is None:
        return builder(weights=None, dropout=dropout)
    if not is_hub_spec(spec):
        raise ValueError(f"unexpected weights spec {spec!r} at construction (paths are loaded afterwards)")
    try:
        weights = torchvision_weights(enum_name, spec)
    except KeyError as err:
        raise hub_unavailable(arch, spec, f"torchvision has no {enum_name}.{err.args[0]}") from None
    cached = torchvision_cached_file(weights.url)
    if cached.is_file():  # loaded from the cache, no download: check what torch.hub would not
        _check_cached_hash(cached, arch, spec)
    else:
        _require_online(arch, spec, "download.pytorch.org")
    try:
        return builder(weights=weights, dropout=dropout)
    except Exception as err:  # noqa: BLE001
        if cached.is_file():
            raise WeightsError(f"backbone.weights={spec!r} for '{arch}': torchvision could not load the cached file "
                               f"{cached} ({_first_line(err)}); delete {cached} and retry") from err
        raise hub_unavailable(arch, spec, f"torchvision could not load {weights} ({type(err).__name__})") from err


def hub_statistics(kind: str, name: str, spec: str) -> tuple[list[float], list[float]] | None:
    """The input mean/std the hub weights were trained with (``kind``: ``timm`` with a model name, or
    ``torchvision`` with a weights enum name), or None when they cannot be told (unknown tag)."""
    try:
        if kind == "timm":
            import timm

            cfg = timm.models.get_pretrained_cfg(timm_hub_name(name, spec))
            mean, std = cfg.mean, cfg.std
        else:
            transform = torchvision_weights(name, spec).transforms()
            mean, std = transform.mean, transform.std
    except Exception:  # noqa: BLE001 - the backbone's own construction reports a bad spec in one line
        return None
    return [float(v) for v in mean], [float(v) for v in std]


def _load_checkpoint(path: str | Path):
    """The checkpoint's contents, ``weights_only=True``: a checkpoint can carry tensors and plain values, never code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"backbone.weights={str(path)!r}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise WeightsError(
            f"backbone.weights={str(path)!r}: not a loadable weights-only checkpoint ({load_failure(err)})"
        ) from err


def _state_and_arch(blob, path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    arch = None
    if isinstance(blob, dict) and "state_dict" in blob:
        arch = blob.get("backbone_arch") or blob.get("arch")
        blob = blob["state_dict"]
    if not isinstance(blob, dict):
        raise WeightsError(f"backbone.weights={str(path)!r}: expected a state dict, found {type(blob).__name__}")
    if any(k.startswith("backbone.") for k in blob):
        blob = {k[len("backbone.") :]: v for k, v in blob.items() if k.startswith("backbone.")}
    return blob, arch


def backbone_state_from_file(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read backbone weights from a suite checkpoint (``{'arch', 'state_dict'}``), a Lightning
    checkpoint (keys under ``backbone.``) or a bare state dict. Always ``weights_only=True``:
    a checkpoint can carry tensors and plain values, never code."""
    return _state_and_arch(_load_checkpoint(path), path)


# source datasets of grayscale images (replicated to RGB): a representation learnt on them never trained conv1's colour
GRAYSCALE_SOURCE_DATASETS = ("fashion_mnist", "mnist", "digits")


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a checkpoint into ``backbone``; another architecture gives one clear mismatch error. The backbone's
    ``source_dataset`` says which source representation it now holds (None: other weights)."""
    blob = _load_checkpoint(path)  # read once: the state and which source it is (transferrable/run/source.py records it)
    state, arch = _state_and_arch(blob, path)
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
    backbone.source_dataset = blob.get("source_dataset") if isinstance(blob, dict) else None


def fold_conv1_colour(backbone: torch.nn.Module) -> float:
    """Make the first 3-channel convolution colour-blind: each filter's R, G, B slices become their mean.

    A representation pretrained on grayscale images (Fashion-MNIST replicated to RGB) only ever saw R = G = B,
    so only the channel sum of each conv1 filter was trained; the differences between its channel slices are
    leftovers of the random initialisation. On grayscale inputs they cancel, but on coloured regions (the
    recoloured scene objects) they add untrained colour-opponent responses to every unit above. Replacing the
    slices by their mean leaves every response to a grayscale image unchanged and lets a colour image through
    as its channel mean. Returns the relative size of the removed part (0 when already folded)."""
    conv = next((m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 3), None)
    if conv is None:
        raise ValueError("fold_conv1_colour: the backbone has no 3-channel convolution")
    with torch.no_grad():
        w = conv.weight
        mean = w.mean(1, keepdim=True)
        removed = float((w - mean).norm() / w.norm().clamp_min(1e-12))
        w.copy_(mean.expand_as(w))
    return removed


def fold_grayscale_source(backbone: nn.Module, setting: bool | str | None = "auto") -> float | None:
    """``fold_conv1_colour`` when ``setting`` is true, or ``auto``/None and the backbone holds a source representation
    learnt on grayscale images (``GRAYSCALE_SOURCE_DATASETS``); returns the removed part, or None when not folded."""
    if setting in ("auto", None):
        setting = getattr(backbone, "source_dataset", None) in GRAYSCALE_SOURCE_DATASETS
    return fold_conv1_colour(backbone) if setting else None
