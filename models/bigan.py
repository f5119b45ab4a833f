"""BiGAN building blocks (thesis ch. 5): latent priors, encoder E, generator G, joint discriminator D(x, z).

Plain ``nn.Module``s; the training logic lives in ``lightning_modules/bigan.py``.

Two architectures, chosen by ``bigan.arch``:

    mlp   permutation-invariant MNIST (appendix 5.5.3.1): D, G, E have two hidden layers of 1024; the first
          is followed by the non-linearity, every later one by parameter-free batch norm and the
          non-linearity; leaky ReLU 0.2 in D and E, ReLU in G. Images are flat vectors.
    conv  ImageNet (appendix 5.5.3.2), sized for CPU: E = ``BiGANAlexNet`` (conv1..conv5 + fc6, fc7, BN and
          leaky ReLU at unsupervised training time; a ``TapBackbone``, so ``task=classify`` can load it),
          D and G = DCGAN stacks of four 5x5 stride-2 (de)convolutions with BN.

The joint discriminator takes ``x`` as its initial input; at every hidden layer after the first, ``z`` is
linearly projected to that layer's width (channels, broadcast over space, for conv layers) and added to
the layer's pre-activation (before batch norm and the non-linearity). Those projection weights start at
std 0.5, every other weight at N(0, 0.02) (appendix 5.5.3).

Latent codes: ``z ~ U(-1, 1)^d`` (``continuous``), or, beyond the thesis (ch. 6, Figure 6.1), a 10-way
one-hot scaled by ``alpha`` followed by ``d_cont`` uniform dims (``discrete``). An encoder predicts
*logits* for a code: ``2 * sigmoid(logit) - 1`` for uniform dims (the original code's mapping, so the
latent regressor's sigmoid cross-entropy target is ``(z + 1) / 2``), and a softmax over the categories.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import Pool5, TapBackbone
from models.weights import hub_unavailable, is_hub_spec

INIT_STD = 0.02
Z_PROJECTION_STD = 0.5


# -- latent priors ----------------------------------------------------------------------------------
class LatentPrior:
    """``continuous``: ``z ~ U(-1,1)^dim``. ``discrete``: ``[alpha * onehot(c), u]`` with ``c`` uniform over
    ``categories`` and ``u ~ U(-1,1)^dim`` (so the code has ``categories + dim`` entries)."""

    def __init__(self, kind: str = "continuous", dim: int = 50, categories: int = 10, alpha: float = 2.0):
        if kind not in ("continuous", "discrete"):
            raise ValueError(f"bigan.latent={kind!r}: expected continuous or discrete")
        if dim < 1:
            raise ValueError(f"bigan.latent_dim={dim}: expected >= 1")
        self.kind, self.dim = kind, int(dim)
        self.categories = int(categories) if kind == "discrete" else 0
        self.alpha = float(alpha)

    @property
    def code_dim(self) -> int:
        return self.categories + self.dim

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z, category index or None)."""
        u = torch.rand(n, self.dim, generator=generator, device=device) * 2 - 1
        if not self.categories:
            return u, None
        c = torch.randint(0, self.categories, (n,), generator=generator, device=device)
        return torch.cat([self.alpha * F.one_hot(c, self.categories).to(u.dtype), u], 1), c

    def grid(self, columns: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Figure 6.1: one row per category, one column per fixed continuous sample (rows x columns codes)."""
        if not self.categories:
            raise ValueError("the category grid needs bigan.latent=discrete")
        u = torch.rand(columns, self.dim, generator=generator) * 2 - 1
        onehot = self.alpha * torch.eye(self.categories)
        return torch.cat([onehot.repeat_interleave(columns, 0), u.repeat(self.categories, 1)], 1)

    def split(self, t: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(categorical part or None, continuous part) of a code or of encoder logits."""
        return (t[:, : self.categories], t[:, self.categories :]) if self.categories else (None, t)

    def logits_to_code(self, logits: torch.Tensor, straight_through: bool = True) -> torch.Tensor:
        """Encoder logits -> a code in the prior's support (differentiable).

        Uniform dims: ``2 * sigmoid - 1``. Categories: ``alpha * softmax``, or with ``straight_through`` the
        one-hot of the argmax in the forward pass and the softmax's gradient in the backward pass.
        """
        cat, cont = self.split(logits)
        u = 2 * torch.sigmoid(cont) - 1
        if cat is None:
            return u
        p = cat.softmax(1)
        if straight_through:
            hard = F.one_hot(p.argmax(1), self.categories).to(p.dtype)
            p = hard + p - p.detach()
        return torch.cat([self.alpha * p, u], 1)

    def regression_loss(self, logits: torch.Tensor, z: torch.Tensor, category: torch.Tensor | None) -> torch.Tensor:
        """Latent regressor loss, per sample, normalised by the code dimension (``--encode_normalize``):
        sigmoid cross-entropy between the uniform dims mapped to [0, 1] and the logits, plus softmax
        cross-entropy for the category."""
        cat_logits, cont = self.split(logits)
        _, z_cont = self.split(z)
        loss = F.binary_cross_entropy_with_logits(cont, latent_target(z_cont), reduction="none").sum(1)
        if cat_logits is not None:
            loss = loss + F.cross_entropy(cat_logits, category, reduction="none")
        return loss / (self.dim + (1 if self.categories else 0))


def latent_target(z: torch.Tensor) -> torch.Tensor:
    """The latent regressor's sigmoid cross-entropy target: ``z`` in [-1, 1] mapped to [0, 1]."""
    return (z + 1) / 2


# -- initialisation ---------------------------------------------------------------------------------
def dcgan_init(module: nn.Module, std: float = INIT_STD) -> None:
    """N(0, std) weights, zero biases, for every Linear/Conv/ConvTranspose; BN affine to (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ZProjection(nn.Module):
    """``z -> W z`` added to a hidden layer: a (N, C) vector, or (N, C, 1, 1) to broadcast over space."""

    def __init__(self, code_dim: int, width: int, spatial: bool, std: float = Z_PROJECTION_STD):
        super().__init__()
        self.linear = nn.Linear(code_dim, width, bias=False)
        self.spatial = spatial
        nn.init.normal_(self.linear.weight, 0.0, std)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.linear(z)
        return h[:, :, None, None] if self.spatial else h


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), -1)


# -- MLP (permutation-invariant) ----------------------------------------------------------------------
class MLPEncoder(nn.Module):
    """x (any shape, flattened) -> hidden layers -> linear code logits (no bias, as the original code)."""

    def __init__(self, in_dim: int, code_dim: int, hidden: Sequence[int] = (1024, 1024), leak: float = 0.2):
        super().__init__()
        dims = [int(in_dim), *map(int, hidden)]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=i == 0) for i, (a, b) in enumerate(zip(dims, dims[1:], strict=False)))
        self.norms = nn.ModuleList(nn.BatchNorm1d(d, affine=False) for d in dims[2:])
        self.act = nn.LeakyReLU(leak)
        self.out = nn.Linear(dims[-1], code_dim, bias=False)
        dcgan_init(self)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden layer, code logits)."""
        h = self.act(self.layers[0](_flat(x)))
        for layer, bn in zip(self.layers[1:], self.norms, strict=True):
            h = self.act(bn(layer(h)))
        return h, self.out(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[1]


class MLPGenerator(nn.Module):
    """z -> hidden layers (ReLU; parameter-free BN after the first) -> pixels through sigmoid or tanh."""

    def __init__(self, code_dim: int, out_shape: Sequence[int], hidden: Sequence[int] = (1024, 1024),
                 output: str = "sigmoid"):
        super().__init__()
        self.out_shape = tuple(int(s) for s in out_shape)
        dims = [int(code_dim), *map(int, hidden)]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=i == 0) for i, (a, b) in enumerate(zip(dims, dims[1:], strict=False)))
        self.norms = nn.ModuleList(nn.BatchNorm1d(d, affine=False) for d in dims[2:])
        self.out = nn.Linear(dims[-1], math.prod(self.out_shape))
        self.squash = output_activation(output)
        dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.layers[0](z))
        for layer, bn in zip(self.layers[1:], self.norms, strict=True):
            h = F.relu(bn(layer(h)))
        return self.squash(self.out(h)).reshape(len(z), *self.out_shape)


class MLPDiscriminator(nn.Module):
    """D(x[, z]) -> one logit. With ``code_dim`` (joint/BiGAN), z is projected and added at every hidden
    layer after the first; without it, a plain GAN discriminator of the same shape."""

    def __init__(self, in_dim: int, code_dim: int | None = None, hidden: Sequence[int] = (1024, 1024),
                 leak: float = 0.2):
        super().__init__()
        dims = [int(in_dim), *map(int, hidden)]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=i == 0) for i, (a, b) in enumerate(zip(dims, dims[1:], strict=False)))
        self.norms = nn.ModuleList(nn.BatchNorm1d(d, affine=False) for d in dims[2:])
        self.act = nn.LeakyReLU(leak)
        self.out = nn.Linear(dims[-1], 1)
        dcgan_init(self)
        self.z_proj = None
        if code_dim:  # after dcgan_init: these keep their std 0.5
            self.z_proj = nn.ModuleList(ZProjection(code_dim, d, spatial=False) for d in dims[2:])

    @property
    def joint(self) -> bool:
        return self.z_proj is not None

    def forward_features(self, x: torch.Tensor, z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden layer, logit of 'real')."""
        if self.joint and z is None:
            raise ValueError("this joint discriminator needs z")
        h = self.act(self.layers[0](_flat(x)))
        for i, (layer, bn) in enumerate(zip(self.layers[1:], self.norms, strict=True)):
            a = layer(h)
            if self.joint:
                a = a + self.z_proj[i](z)
            h = self.act(bn(a))
        return h, self.out(h).squeeze(1)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(x, z)[1]


def output_activation(name: str) -> nn.Module:
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"generator output {name!r}: expected sigmoid or tanh")


# -- conv (DCGAN D and G) ---------------------------------------------------------------------------
def _check_dcgan_size(image_size: int) -> int:
    if image_size < 16 or image_size % 16:
        raise ValueError(f"bigan.image_size={image_size}: the conv D/G (four stride-2 layers) need a multiple of 16")
    return image_size // 16


class DCGANGenerator(nn.Module):
    """z -> FC to (8w, s, s) (BN, ReLU) -> three 5x5 stride-2 deconvs (BN, ReLU) -> a 5x5 stride-2 deconv to
    ``channels`` -> tanh/sigmoid; s = image_size / 16."""

    def __init__(self, code_dim: int, image_size: int = 32, channels: int = 1, width: int = 32, output: str = "tanh"):
        super().__init__()
        self.s0, w = _check_dcgan_size(image_size), int(width)
        self.fc = nn.Linear(code_dim, 8 * w * self.s0 * self.s0, bias=False)
        self.fc_bn = nn.BatchNorm1d(8 * w * self.s0 * self.s0)
        chans = [8 * w, 4 * w, 2 * w, w]
        self.ups = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(a, b, 5, 2, 2, output_padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(chans, chans[1:], strict=False)
        )
        self.out = nn.ConvTranspose2d(w, channels, 5, 2, 2, output_padding=1)
        self.squash = output_activation(output)
        self.width = w
        dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc_bn(self.fc(z))).reshape(len(z), 8 * self.width, self.s0, self.s0)
        for up in self.ups:
            h = up(h)
        return self.squash(self.out(h))


class DCGANDiscriminator(nn.Module):
    """Four 5x5 stride-2 convs (leaky ReLU; BN after all but the first) -> linear logit. Joint: z projected
    to each later conv's channels and added (broadcast over space) before BN."""

    def __init__(self, image_size: int = 32, channels: int = 1, code_dim: int | None = None, width: int = 32,
                 leak: float = 0.2):
        super().__init__()
        s0, w = _check_dcgan_size(image_size), int(width)
        chans = [channels, w, 2 * w, 4 * w, 8 * w]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 5, 2, 2, bias=i == 0) for i, (a, b) in enumerate(zip(chans, chans[1:], strict=False)))
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in chans[2:])
        self.act = nn.LeakyReLU(leak)
        self.out = nn.Linear(8 * w * s0 * s0, 1)
        dcgan_init(self)
        self.z_proj = None
        if code_dim:
            self.z_proj = nn.ModuleList(ZProjection(code_dim, c, spatial=True) for c in chans[2:])

    @property
    def joint(self) -> bool:
        return self.z_proj is not None

    def forward_features(self, x: torch.Tensor, z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.joint and z is None:
            raise ValueError("this joint discriminator needs z")
        h = self.act(self.convs[0](x))
        for i, (conv, bn) in enumerate(zip(self.convs[1:], self.norms, strict=True)):
            a = conv(h)
            if self.joint:
                a = a + self.z_proj[i](z)
            h = self.act(bn(a))
        h = _flat(h)
        return h, self.out(h).squeeze(1)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(x, z)[1]


# -- conv encoder: an AlexNet-shaped TapBackbone --------------------------------------------------------
class BiGANAlexNet(TapBackbone):
    """AlexNet-shaped conv1..conv5 (+ pool5, fc6, fc7), narrow for CPU, with leaky ReLU.

    ``batch_norm=True`` is the BiGAN encoder at unsupervised training time (conv -> BN -> leaky ReLU, no
    conv bias, no dropout). ``batch_norm=False`` is the layout for supervised use: conv (with bias) ->
    leaky ReLU, BN folded into the conv (``folded_state_dict``), which is what a ``task=classify
    backbone=bigan_alexnet backbone.weights=<encoder_backbone.pt>`` run loads. ``reinit_unfrozen``
    re-initialises every stage after ``freeze`` once the weights are loaded (Table 5.2: conv1..convN
    transferred and frozen, the rest trained from scratch).
    """

    arch = "bigan_alexnet"

    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 96, 96, 64),
        kernel_sizes: Sequence[int] = (5, 3, 3, 3, 3),
        conv1_stride: int = 1,
        fc_dim: int = 512,
        pool5_size: int = 4,
        dropout: float = 0.5,
        leak: float = 0.2,
        batch_norm: bool = False,
        init: str = "auto",
        reinit_unfrozen: bool = False,
        freeze: str | None = "none",
        norm_eval: bool = True,
        weights: str | None = None,
    ):
        super().__init__(input_size, freeze, norm_eval)
        if len(widths) != 5 or len(kernel_sizes) != 5:
            raise ValueError("bigan_alexnet needs 5 widths and 5 kernel_sizes (conv1..conv5)")
        self.in_channels, self.batch_norm = int(in_channels), bool(batch_norm)
        self.init = ("dcgan" if batch_norm else "kaiming") if init == "auto" else init
        if self.init not in ("dcgan", "kaiming"):
            raise ValueError(f"backbone.init={init!r}: expected auto, dcgan or kaiming")
        bn = self.batch_norm

        def unit(layer: nn.Module, width: int, norm: type[nn.Module]) -> list[nn.Module]:
            return [layer, norm(width), nn.LeakyReLU(leak)] if bn else [layer, nn.LeakyReLU(leak)]

        def conv(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
            return unit(nn.Conv2d(cin, cout, k, stride, k // 2, bias=not bn), cout, nn.BatchNorm2d)

        def fc(cin: int, cout: int) -> list[nn.Module]:
            return [*unit(nn.Linear(cin, cout, bias=not bn), cout, nn.BatchNorm1d), nn.Dropout(0.0 if bn else dropout)]

        w, k = list(widths), list(kernel_sizes)
        pool = lambda: nn.MaxPool2d(3, 2, 1)  # noqa: E731 - overlapping pooling, as in AlexNet
        self.stages.update(
            OrderedDict(
                conv1=nn.Sequential(*conv(self.in_channels, w[0], k[0], conv1_stride), pool()),
                conv2=nn.Sequential(*conv(w[0], w[1], k[1]), pool()),
                conv3=nn.Sequential(*conv(w[1], w[2], k[2])),
                conv4=nn.Sequential(*conv(w[2], w[3], k[3])),
                conv5=nn.Sequential(*conv(w[3], w[4], k[4])),
                pool5=Pool5(pool(), pool5_size),
                fc6=nn.Sequential(*fc(w[4] * pool5_size * pool5_size, fc_dim)),
                fc7=nn.Sequential(*fc(fc_dim, fc_dim)),
            )
        )
        self.reset_stages(self.tap_names)
        if is_hub_spec(weights):
            raise hub_unavailable(self.arch, weights, "bigan_alexnet has no hub weights (train one with task=bigan)")
        self._finish(weights)
        if reinit_unfrozen and weights is not None:
            self.reset_stages([n for n in self.tap_names if n not in self.frozen_stage_names()])

    def reset_stages(self, names: Sequence[str]) -> None:
        """Fresh initial weights for the named stages (N(0, 0.02) or Kaiming for leaky ReLU)."""
        for name in names:
            stage = self.stages[name]
            if self.init == "dcgan":
                dcgan_init(stage)
                continue
            for m in stage.modules():
                if isinstance(m, nn.Conv2d | nn.Linear):
                    nn.init.kaiming_normal_(m.weight, a=0.2, mode="fan_in", nonlinearity="leaky_relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.reset_parameters()
                    m.reset_running_stats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels and self.in_channels == 1:
            x = x[:, :1]
        return super().forward(x)

    def forward_taps(self, x: torch.Tensor, taps):
        if x.shape[1] != self.in_channels and self.in_channels == 1:
            x = x[:, :1]  # grayscale datasets arrive replicated to 3 channels
        return super().forward_taps(x, taps)

    def folded_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict for the ``batch_norm=False`` layout, each BN folded into the layer before it:
        ``W' = W * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``."""
        if not self.batch_norm:
            return {k: v.detach().clone() for k, v in self.state_dict().items()}
        return fold_batchnorm(self)


def fold_batchnorm(backbone: TapBackbone) -> dict[str, torch.Tensor]:
    """Fold every (Conv2d|Linear, BatchNorm) pair inside the stages of ``backbone`` into the layer's weight
    and bias; returns a state dict keyed as the same network without BN layers (Sequential indices after
    a removed BN shift down by one)."""
    out: dict[str, torch.Tensor] = {}
    for name, stage in backbone.stages.items():
        children = list(stage.named_children()) if isinstance(stage, nn.Sequential) else []
        if not children:
            for k, v in stage.state_dict().items():
                out[f"stages.{name}.{k}"] = v.detach().clone()
            continue
        j, i = 0, 0  # j: index in the BN-free layout
        while i < len(children):
            _, m = children[i]
            nxt = children[i + 1][1] if i + 1 < len(children) else None
            if isinstance(m, nn.Conv2d | nn.Linear) and isinstance(nxt, nn.modules.batchnorm._BatchNorm):
                w, b = fold_layer(m, nxt)
                out[f"stages.{name}.{j}.weight"], out[f"stages.{name}.{j}.bias"] = w, b
                i += 2
            else:
                for k, v in m.state_dict().items():
                    out[f"stages.{name}.{j}.{k}"] = v.detach().clone()
                i += 1
            j += 1
    return out


@torch.no_grad()
def fold_layer(layer: nn.Conv2d | nn.Linear, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``bn(layer(x))`` in eval mode as one layer."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * scale + (bn.bias if bn.affine else 0.0)
    shape = (-1,) + (1,) * (layer.weight.ndim - 1)
    return (layer.weight * scale.reshape(shape)).clone(), new_bias.clone()


class ConvEncoder(nn.Module):
    """E for ``arch=conv``: a ``BiGANAlexNet`` trunk (BN mode) up to fc7, then a linear layer to code logits."""

    def __init__(self, trunk: BiGANAlexNet, code_dim: int):
        super().__init__()
        if not isinstance(trunk, BiGANAlexNet) or not trunk.batch_norm:
            raise ValueError(
                "bigan.arch=conv trains its encoder as backbone=bigan_alexnet with backbone.batch_norm=true "
                f"(got {type(trunk).__name__}{'' if not isinstance(trunk, BiGANAlexNet) else ', batch_norm=false'})"
            )
        self.trunk = trunk
        self.out = nn.Linear(trunk.feature_dim("fc7"), code_dim, bias=False)
        dcgan_init(self.out)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk.forward_taps(x, ["fc7"])["fc7"]
        return h, self.out(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[1]


# -- batch-norm statistics ----------------------------------------------------------------------------
@torch.no_grad()
def reestimate_batchnorm(module: nn.Module, batches, forward) -> int:
    """Recompute every BN layer's running mean/var in ``module`` as the plain average over ``batches``
    (``forward(batch)`` runs the module in train mode; the original code's "deploy" BN pass). Returns the
    number of batches used; the module is left in eval mode."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        module.eval()
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = the mean over the batches seen
    module.train()
    n = 0
    try:
        for batch in batches:
            forward(batch)
            n += 1
    finally:
        for m, mom in zip(norms, momenta, strict=True):
            m.momentum = mom
        module.eval()
    return n
