"""Backbones with AlexNet-style named feature taps and a freeze knob.

Every architecture is cut into the same eight stages, run in order:

    conv1 .. conv5   convolutional stages (each ends after its ReLU; conv1/conv2 include their max-pool)
    pool5            the last max-pool, then adaptive average pooling to ``pool5_size`` (so fc6 adapts
                     to any ``input_size``)
    fc6, fc7         fully connected layers (post-ReLU, dropout in train mode)

How the stages map onto each architecture:

    caffenet_mini    AlexNet/CaffeNet shape, narrow for CPU: 5 conv layers (+BN), 2 fc layers
    alexnet          torchvision ``features[0:3] | [3:6] | [6:8] | [8:10] | [10:12] | [12] + avgpool``,
                     ``classifier[0:3]`` = fc6, ``classifier[3:6]`` = fc7
    vgg16            timm ``features`` split at its max-pools: conv1 = block1 (+pool1) ... conv4 = block4
                     (+pool4), conv5 = block5 convs, pool5 = pool5 + adaptive pool to 7x7; timm's
                     ``pre_logits`` ConvMlp becomes fc6 (7x7 conv as Linear) and fc7 (1x1 conv as Linear)
    resnet18/50      timm: conv1 = stem (conv, BN, ReLU, max-pool), conv2..conv5 = layer1..layer4,
                     pool5 = global average pool (``pool5_size`` 1). ResNets have no fc6/fc7, so two fc
                     layers are *added*; they are trained by the suite's own pretraining, but start random
                     with hub weights (use ``pool5`` as the pretrained representation there).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from models.weights import (
    WeightsError,
    create_timm,
    hub_only,
    hub_statistics,
    hub_unavailable,
    is_hub_spec,
    load_backbone_weights,
    load_torchvision_hub,
)
from transferrable.core.config_rules import (
    TAP_NAMES as TAP_NAMES,  # defined beside the rules that check tap names
)
from transferrable.core.errors import UserError

log = logging.getLogger(__name__)


class UnknownTapError(UserError, ValueError):
    """A tap name that is not one of ``TAP_NAMES``."""


class UntrainedTapWarning(UserWarning):
    """A tap read as a fixed feature whose layers the weights never trained (EfficientNet's added fc6/fc7): a
    random projection, fine as a deliberate control (decaf.md#fig23_left_lite0), a trap otherwise."""


def _fc(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(inplace=True), nn.Dropout(dropout))


class Pool5(nn.Sequential):
    """Optional max-pool, then adaptive average pooling to a fixed grid, flattened."""

    def __init__(self, pool: nn.Module | None, size: int):
        layers = [pool] if pool is not None else []
        super().__init__(*layers, nn.AdaptiveAvgPool2d(size), nn.Flatten(1))


class TapBackbone(nn.Module):
    """Base class: an ordered ``ModuleDict`` of stages named by ``TAP_NAMES``.

    Subclasses fill ``self.stages`` and set ``self.arch``. ``forward_taps`` returns the requested
    activations and stops after the deepest one, so asking for ``pool5`` never runs the fc layers.
    """

    arch: str = "backbone"
    # taps whose layers the loaded weights did not train (added at random): reading them frozen reads noise
    untrained_taps: tuple[str, ...] = ()

    @classmethod
    def hub_statistics(cls, cfg) -> tuple[list[float], list[float]] | None:
        """The input mean/std of this architecture's hub weights for backbone config ``cfg`` (its ``weights`` a hub
        spec); None where there are no hub weights."""
        return None

    def __init__(self, input_size: int, freeze: str | None = "none", norm_eval: bool = True):
        super().__init__()
        self.input_size = int(input_size)
        self.freeze_spec = "none" if freeze in (None, False) else str(freeze)
        self.norm_eval = norm_eval
        self.stages = nn.ModuleDict()

    # -- taps -----------------------------------------------------------------------------------
    @property
    def tap_names(self) -> tuple[str, ...]:
        return tuple(self.stages.keys())

    def check_taps(self, taps: Sequence[str]) -> None:
        unknown = [t for t in taps if t not in self.stages]
        if unknown:
            raise UnknownTapError(
                f"backbone '{self.arch}' has no tap(s) {unknown}; available taps: {list(self.stages)}"
            )

    def warn_untrained(self, taps: Sequence[str], what: str) -> None:
        """One warning line when a frozen read of ``taps`` (the config key ``what``) reads layers the weights never
        trained, naming the deepest trained tap as the alternative."""
        bad = [t for t in taps if t in self.untrained_taps]
        if bad:
            import warnings

            trained = [t for t in self.tap_names if t not in self.untrained_taps]
            warnings.warn(
                f"{what}: {bad} of backbone '{self.arch}' are added at random (its weights do not train them) and are "
                f"read untrained, as random projections; the pretrained representation is {what}=[{trained[-1]}]",
                UntrainedTapWarning, stacklevel=2)

    def forward_taps(self, x: torch.Tensor, taps: Sequence[str] | str) -> dict[str, torch.Tensor]:
        taps = [taps] if isinstance(taps, str) else list(taps)
        self.check_taps(taps)
        wanted, last = set(taps), max(self.tap_names.index(t) for t in taps)
        out: dict[str, torch.Tensor] = {}
        for i, (name, stage) in enumerate(self.stages.items()):
            x = stage(x)
            if name in wanted:
                out[name] = x
            if i == last:
                break
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate representation (fc7), as a classifier head expects."""
        for stage in self.stages.values():
            x = stage(x)
        return x

    @torch.no_grad()
    def tap_shapes(self, taps: Sequence[str] | None = None) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of each tap for this ``input_size`` (one dummy forward in eval mode)."""
        taps = list(taps or self.tap_names)
        was_training = self.training
        self.eval()
        try:
            x = torch.zeros(1, 3, self.input_size, self.input_size)
            return {k: tuple(v.shape[1:]) for k, v in self.forward_taps(x, taps).items()}
        finally:
            self.train(was_training)

    def feature_dim(self, tap: str) -> int:
        shape = self.tap_shapes([tap])[tap]
        n = 1
        for s in shape:
            n *= s
        return n

    def _finish(self, weights: str | None) -> None:
        """Load a checkpoint given as ``weights`` (hub weights were taken at construction), then freeze."""
        if weights is not None and not is_hub_spec(weights):
            if str(weights).startswith("source:"):
                raise WeightsError(
                    f"backbone.weights={weights!r} must be resolved to a checkpoint first "
                    "(train.py/eval.py do this via transferrable.run.source.resolve_source_weights)"
                )
            load_backbone_weights(self, weights)
        self.apply_freeze()

    # -- freezing -------------------------------------------------------------------------------
    def frozen_stage_names(self) -> list[str]:
        spec = self.freeze_spec
        if spec == "none":
            return []
        if spec == "all":
            return list(self.tap_names)
        if spec not in self.stages:
            raise UnknownTapError(
                f"backbone.freeze={spec!r} is not valid for '{self.arch}'; expected none, all or one of "
                f"{list(self.stages)}"
            )
        return list(self.tap_names[: self.tap_names.index(spec) + 1])

    def apply_freeze(self, spec: str | None = None) -> None:
        """Freeze stages up to ``spec`` (inclusive); ``none`` unfreezes everything."""
        if spec is not None:
            self.freeze_spec = str(spec)
        frozen = set(self.frozen_stage_names())
        for name, stage in self.stages.items():
            for p in stage.parameters():
                p.requires_grad_(name not in frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> TapBackbone:
        super().train(mode)
        if mode and self.norm_eval:
            # Frozen stages keep BatchNorm in eval mode, so running statistics do not move either.
            for name in self.frozen_stage_names():
                for m in self.stages[name].modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout):
                        m.eval()
        return self


class CaffeNetMini(TapBackbone):
    """AlexNet/CaffeNet-shaped network sized for CPU: conv1..conv5 (BN+ReLU), pool5, fc6, fc7."""

    arch = "caffenet_mini"

    def __init__(
        self,
        input_size: int = 32,
        widths: Sequence[int] = (32, 64, 96, 96, 64),
        kernel_sizes: Sequence[int] = (5, 3, 3, 3, 3),
        conv1_stride: int = 1,
        fc_dim: int = 512,
        pool5_size: int = 4,
        dropout: float = 0.5,
        freeze: str | None = "none",
        norm_eval: bool = True,
        weights: str | None = None,
    ):
        super().__init__(input_size, freeze, norm_eval)
        if len(widths) != 5 or len(kernel_sizes) != 5:
            raise ValueError("caffenet_mini needs 5 widths and 5 kernel_sizes (conv1..conv5)")

        def conv(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w, k = list(widths), list(kernel_sizes)
        pool = lambda: nn.MaxPool2d(3, 2, 1)  # noqa: E731 - overlapping pooling, as in AlexNet
        self.stages.update(
            OrderedDict(
                conv1=nn.Sequential(*conv(3, w[0], k[0], conv1_stride), pool()),
                conv2=nn.Sequential(*conv(w[0], w[1], k[1]), pool()),
                conv3=nn.Sequential(*conv(w[1], w[2], k[2])),
                conv4=nn.Sequential(*conv(w[2], w[3], k[3])),
                conv5=nn.Sequential(*conv(w[3], w[4], k[4])),
                pool5=Pool5(pool(), pool5_size),
                fc6=_fc(w[4] * pool5_size * pool5_size, fc_dim, dropout),
                fc7=_fc(fc_dim, fc_dim, dropout),
            )
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if is_hub_spec(weights):
            raise hub_unavailable(self.arch, weights, "caffenet_mini has no hub weights")
        self._finish(weights)


class TorchvisionAlexNet(TapBackbone):
    """torchvision's AlexNet cut into the named stages (hub weights: ``weights: hub``)."""

    arch = "alexnet"

    @classmethod
    def hub_statistics(cls, cfg) -> tuple[list[float], list[float]] | None:
        return hub_statistics("torchvision", "AlexNet_Weights", cfg["weights"])

    def __init__(
        self,
        input_size: int = 64,
        pool5_size: int = 6,
        dropout: float = 0.5,
        freeze: str | None = "none",
        norm_eval: bool = True,
        weights: str | None = None,
    ):
        super().__init__(input_size, freeze, norm_eval)
        import torchvision  # imported here for start-up speed

        net = load_torchvision_hub(torchvision.models.alexnet, "AlexNet_Weights", hub_only(weights), self.arch, dropout)
        f, c = net.features, net.classifier
        if pool5_size != 6:  # the hub fc6 expects 256x6x6; another grid needs a fresh fc6
            c[1] = nn.Linear(256 * pool5_size**2, c[1].out_features)
        self.stages.update(
            OrderedDict(
                conv1=f[0:3],
                conv2=f[3:6],
                conv3=f[6:8],
                conv4=f[8:10],
                conv5=f[10:12],
                pool5=Pool5(f[12], pool5_size),
                fc6=nn.Sequential(c[1], c[2], c[0]),
                fc7=nn.Sequential(c[4], c[5], c[3]),
            )
        )
        if hub_only(weights) is None:
            # trained from scratch: torchvision's AlexNet keeps PyTorch's default init, under which its eight
            # layers without batch norm barely learned on Fashion-MNIST (loss 2.2-2.3 after 120-160 steps at
            # lr 0.01 and 0.1, measured); He init for the convs and N(0, 0.01) for the fc layers, as
            # torchvision's VGG does
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)
        self._finish(weights)


class TimmVGG16(TapBackbone):
    arch = "vgg16"

    @classmethod
    def hub_statistics(cls, cfg) -> tuple[list[float], list[float]] | None:
        return hub_statistics("timm", cfg.get("model_name", "vgg16"), cfg["weights"])

    def __init__(
        self,
        input_size: int = 64,
        pool5_size: int = 7,
        fc_dim: int = 4096,
        dropout: float = 0.5,
        freeze: str | None = "none",
        norm_eval: bool = True,
        weights: str | None = None,
        model_name: str = "vgg16",
    ):
        super().__init__(input_size, freeze, norm_eval)
        net = create_timm(model_name, hub_only(weights), self.arch)
        f = net.features
        pools = [i for i, m in enumerate(f) if isinstance(m, nn.MaxPool2d)]
        if len(pools) != 5:
            raise ValueError(f"timm model {model_name} does not have VGG's five max-pools")
        starts = [0] + [p + 1 for p in pools[:4]]
        blocks = [f[starts[i] : pools[i] + 1] for i in range(4)] + [f[starts[4] : pools[4]]]
        fc6, fc7 = nn.Linear(512 * pool5_size**2, fc_dim), nn.Linear(fc_dim, fc_dim)
        pl = getattr(net, "pre_logits", None)
        if pl is not None and pool5_size == 7 and pl.fc1.out_channels == fc_dim:
            with torch.no_grad():  # timm keeps fc6/fc7 as convolutions: reuse their weights as Linear
                fc6.weight.copy_(pl.fc1.weight.reshape(fc_dim, -1))
                fc6.bias.copy_(pl.fc1.bias)
                fc7.weight.copy_(pl.fc2.weight.reshape(fc_dim, -1))
                fc7.bias.copy_(pl.fc2.bias)
        self.stages.update(
            OrderedDict(
                conv1=blocks[0],
                conv2=blocks[1],
                conv3=blocks[2],
                conv4=blocks[3],
                conv5=blocks[4],
                pool5=Pool5(f[pools[4]], pool5_size),
                fc6=nn.Sequential(fc6, nn.ReLU(inplace=True), nn.Dropout(dropout)),
                fc7=nn.Sequential(fc7, nn.ReLU(inplace=True), nn.Dropout(dropout)),
            )
        )
        self._finish(weights)


class TimmResNet(TapBackbone):
    arch = "resnet"

    @classmethod
    def hub_statistics(cls, cfg) -> tuple[list[float], list[float]] | None:
        return hub_statistics("timm", cfg.get("model_name", "resnet18"), cfg["weights"])

    def __init__(
        self,
        model_name: str = "resnet18",
        input_size: int = 64,
        pool5_size: int = 1,
        fc_dim: int = 512,
        dropout: float = 0.5,
        freeze: str | None = "none",
        norm_eval: bool = True,
        weights: str | None = None,
    ):
        super().__init__(input_size, freeze, norm_eval)
        self.arch = model_name
        net = create_timm(model_name, hub_only(weights), model_name)
        c5 = net.num_features
        self.stages.update(
            OrderedDict(
                conv1=nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool),
                conv2=net.layer1,
                conv3=net.layer2,
                conv4=net.layer3,
                conv5=net.layer4,
                pool5=Pool5(None, pool5_size),
                fc6=_fc(c5 * pool5_size**2, fc_dim, dropout),
                fc7=_fc(fc_dim, fc_dim, dropout),
            )
        )
        self._finish(weights)
