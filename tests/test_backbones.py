"""Tap backbones: shapes, early stopping, freezing, checkpoint weights and their failure modes."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import timm  # noqa: F401 - imported up front so the fail-fast timings below do not include imports
import torch
import torchvision  # noqa: F401
from conftest import CONF_DIR
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from models.backbones import TAP_NAMES, CaffeNetMini, TapBackbone, TimmResNet, UnknownTapError
from models.weights import WeightsError, backbone_state_from_file

SMALL = dict(widths=[8, 16, 16, 16, 16], fc_dim=32)


def build(name: str, **overrides) -> TapBackbone:
    """Instantiate ``conf/backbone/<name>.yaml`` with overrides, as train.py would; a constructor's own
    error is re-raised unwrapped from Hydra's InstantiationException."""
    cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml"), overrides)
    try:
        return instantiate(cfg)
    except InstantiationException as err:
        raise err.__cause__ from None


# Per-sample tap shapes (C, H, W) / (D,) from the stage layout in models/backbones.py.
EXPECTED = {
    ("caffenet_mini", 32): {
        "conv1": (32, 16, 16), "conv2": (64, 8, 8), "conv3": (96, 8, 8), "conv4": (96, 8, 8),
        "conv5": (64, 8, 8), "pool5": (64 * 4 * 4,), "fc6": (512,), "fc7": (512,),
    },
    ("alexnet", 64): {  # 11x11/4 conv + 3/2 pool: 64 -> 15 -> 7, conv2 pool -> 3; pool5 -> 6x6 adaptive
        "conv1": (64, 7, 7), "conv2": (192, 3, 3), "conv3": (384, 3, 3), "conv4": (256, 3, 3),
        "conv5": (256, 3, 3), "pool5": (256 * 6 * 6,), "fc6": (4096,), "fc7": (4096,),
    },
    ("vgg16", 32): {  # blocks 1-4 end in a max-pool, block 5 does not; pool5 -> 7x7 adaptive
        "conv1": (64, 16, 16), "conv2": (128, 8, 8), "conv3": (256, 4, 4), "conv4": (512, 2, 2),
        "conv5": (512, 2, 2), "pool5": (512 * 7 * 7,), "fc6": (4096,), "fc7": (4096,),
    },
    ("resnet18", 32): {  # stem /4, layer2..4 each /2; pool5 = global average pool
        "conv1": (64, 8, 8), "conv2": (64, 8, 8), "conv3": (128, 4, 4), "conv4": (256, 2, 2),
        "conv5": (512, 1, 1), "pool5": (512,), "fc6": (512,), "fc7": (512,),
    },
    ("resnet50", 32): {
        "conv1": (64, 8, 8), "conv2": (256, 8, 8), "conv3": (512, 4, 4), "conv4": (1024, 2, 2),
        "conv5": (2048, 1, 1), "pool5": (2048,), "fc6": (512,), "fc7": (512,),
    },
}


@pytest.mark.parametrize(("name", "size"), list(EXPECTED))
def test_tap_shapes(name, size):
    torch.manual_seed(0)
    bb = build(name, input_size=size).eval()
    assert bb.tap_names == TAP_NAMES
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        taps = bb.forward_taps(x, list(TAP_NAMES))
        full = bb(x)
    assert list(taps) == list(TAP_NAMES)
    assert {k: tuple(v.shape[1:]) for k, v in taps.items()} == EXPECTED[(name, size)]
    assert all(v.shape[0] == 2 for v in taps.values())
    # forward() is the fc7 representation; post-ReLU taps are non-negative
    torch.testing.assert_close(full, taps["fc7"])
    assert all((taps[t] >= 0).all() for t in ("conv1", "conv5", "fc6", "fc7"))
    assert bb.feature_dim("pool5") == EXPECTED[(name, size)]["pool5"][0]


def test_forward_taps_stops_after_deepest_requested():
    bb = CaffeNetMini(32, **SMALL).eval()
    ran: list[str] = []
    for name, stage in bb.stages.items():
        stage.register_forward_hook(lambda m, i, o, name=name: ran.append(name))
    x = torch.randn(2, 3, 32, 32)
    out = bb.forward_taps(x, "conv2")
    assert list(out) == ["conv2"] and ran == ["conv1", "conv2"]

    ran.clear()
    out = bb.forward_taps(x, ["pool5", "conv1"])
    assert set(out) == {"conv1", "pool5"}
    assert ran == ["conv1", "conv2", "conv3", "conv4", "conv5", "pool5"]  # fc6/fc7 never ran
    assert out["pool5"].shape == (2, 16 * 4 * 4)


def test_unknown_tap_lists_available_taps():
    bb = CaffeNetMini(32, **SMALL)
    with pytest.raises(UnknownTapError) as err:
        bb.forward_taps(torch.zeros(1, 3, 32, 32), ["conv2", "fc8"])
    msg = str(err.value)
    assert "fc8" in msg and "available taps" in msg
    assert all(t in msg for t in TAP_NAMES)

    with pytest.raises(UnknownTapError, match=r"backbone.freeze='conv9'.*none, all or one of.*'fc7'"):
        CaffeNetMini(32, freeze="conv9", **SMALL)


# -- freezing -----------------------------------------------------------------------------------
def _bn_stats(bb: TapBackbone) -> dict[str, dict[str, torch.Tensor]]:
    return {
        stage: {n: b.clone() for n, b in bb.stages[stage].named_buffers() if "running" in n}
        for stage in bb.tap_names
    }


def _frozen_resnet():
    return TimmResNet("resnet18", input_size=32, fc_dim=32, freeze="conv3")


@pytest.mark.parametrize("make", [lambda: CaffeNetMini(32, freeze="conv3", **SMALL), _frozen_resnet],
                         ids=["caffenet_mini", "resnet18"])
def test_freeze_up_to_a_tap(make):
    torch.manual_seed(0)
    bb = make()
    frozen, trainable = ["conv1", "conv2", "conv3"], ["conv4", "conv5", "fc6", "fc7"]
    assert bb.frozen_stage_names() == frozen
    for name in frozen:
        assert all(not p.requires_grad for p in bb.stages[name].parameters()), name
    for name in trainable:
        assert all(p.requires_grad for p in bb.stages[name].parameters()), name

    bb.train()  # as Lightning does at every epoch start: frozen BN must stay in eval mode
    for name in bb.tap_names:
        bns = [m for m in bb.stages[name].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert all(m.training == (name in trainable) for m in bns), name

    params0 = {k: v.detach().clone() for k, v in bb.named_parameters()}
    stats0 = _bn_stats(bb)
    opt = torch.optim.SGD([p for p in bb.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 3, 32, 32) * 2 + 1  # off the BN init statistics, so running stats must move
    bb(x).square().mean().backward()
    opt.step()

    for k, p in bb.named_parameters():
        stage = k.split(".")[1]
        if stage in frozen:
            assert p.grad is None, k
            assert torch.equal(p, params0[k]), k
    assert any(not torch.equal(p, params0[k]) for k, p in bb.stages["conv4"].named_parameters(prefix="stages.conv4"))
    stats1 = _bn_stats(bb)
    for stage in frozen:
        assert stats0[stage], stage
        assert all(torch.equal(stats0[stage][n], stats1[stage][n]) for n in stats0[stage]), stage
    for stage in ("conv4", "conv5"):
        assert any(not torch.equal(stats0[stage][n], stats1[stage][n]) for n in stats0[stage] if "mean" in n), stage

    bb.apply_freeze("none")
    assert all(p.requires_grad for p in bb.parameters())
    assert all(m.training for m in bb.modules())


def test_freeze_all_is_deterministic_and_gradient_free():
    torch.manual_seed(0)
    bb = CaffeNetMini(32, freeze="all", **SMALL).train()
    assert bb.frozen_stage_names() == list(TAP_NAMES)
    assert not any(p.requires_grad for p in bb.parameters())
    stats0 = _bn_stats(bb)
    x = torch.randn(4, 3, 32, 32) * 3
    a, b = bb(x), bb(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # dropout and BN batch statistics are off
    assert not a.requires_grad
    assert all(torch.equal(stats0[s][n], v) for s, d in _bn_stats(bb).items() for n, v in d.items())


def test_classify_module_optimises_only_trainable_params():
    from functools import partial

    from lightning_modules.classify import ClassifyModule

    bb = CaffeNetMini(32, freeze="conv5", **SMALL)
    model = ClassifyModule(bb, num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.1))
    opt = model.configure_optimizers()
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    expected = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_opt == expected
    assert id(model.head.weight) in in_opt and id(bb.stages.fc6[0].weight) in in_opt
    assert not any(id(p) in in_opt for p in bb.stages.conv5.parameters())
    assert model.head.in_features == 32  # fc7 width

    with pytest.raises(UnknownTapError, match="available taps"):
        ClassifyModule(bb, num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.1), head_tap="fc8")


# -- weights from checkpoints -------------------------------------------------------------------
@pytest.fixture
def trained_mini():
    """A small caffenet_mini whose BN statistics moved away from their init."""
    torch.manual_seed(0)
    bb = CaffeNetMini(32, **SMALL).train()
    with torch.no_grad():
        bb(torch.randn(8, 3, 32, 32) * 2 + 1)
    return bb.eval()


def _save_formats(bb: TapBackbone, tmp_path: Path) -> dict[str, Path]:
    sd = bb.state_dict()
    lightning = {
        "epoch": 3,
        "global_step": 12,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.weight": torch.zeros(10, 32)},
        "backbone_arch": bb.arch,
        "hyper_parameters": {"num_classes": 10, "head_tap": "fc7"},
    }
    blobs = {"suite": {"arch": bb.arch, "state_dict": sd}, "lightning": lightning, "bare": sd}
    paths = {}
    for name, blob in blobs.items():
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(blob, paths[name])
    return paths


@pytest.mark.parametrize("fmt", ["suite", "lightning", "bare"])
def test_weights_round_trip(trained_mini, tmp_path, fmt):
    path = _save_formats(trained_mini, tmp_path)[fmt]
    torch.manual_seed(123)  # a different random init, so only the checkpoint can make outputs agree
    loaded = CaffeNetMini(32, weights=str(path), **SMALL).eval()
    fresh = CaffeNetMini(32, **SMALL).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained_mini(x), rtol=0, atol=0)
        assert not torch.allclose(fresh(x), trained_mini(x))
    for k, v in trained_mini.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    # freezing is applied after loading
    frozen = CaffeNetMini(32, weights=str(path), freeze="conv2", **SMALL)
    assert not any(p.requires_grad for p in frozen.stages.conv2.parameters())
    assert all(p.requires_grad for p in frozen.stages.conv3.parameters())


def test_checkpoint_of_another_architecture_is_refused(trained_mini, tmp_path):
    paths = _save_formats(trained_mini, tmp_path)
    # declared architecture differs
    with pytest.raises(WeightsError) as err:
        TimmResNet("resnet18", input_size=32, weights=str(paths["suite"]))
    msg = str(err.value)
    assert "holds a 'caffenet_mini' backbone, but backbone is 'resnet18'" in msg and "\n" not in msg

    # bare state dict of resnet18 into resnet50: no declared arch, so keys/shapes decide
    torch.save(TimmResNet("resnet18", input_size=32, fc_dim=32).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(WeightsError) as err:
        TimmResNet("resnet50", input_size=32, fc_dim=32, weights=str(tmp_path / "r18.pt"))
    msg = str(err.value)
    assert "does not match backbone 'resnet50'" in msg and "missing" in msg and "\n" not in msg


@pytest.mark.parametrize("fmt", ["suite", "lightning", "bare"])
def test_checkpoint_with_other_widths_is_refused(trained_mini, tmp_path, fmt):
    path = _save_formats(trained_mini, tmp_path)[fmt]
    with pytest.raises(WeightsError) as err:
        CaffeNetMini(32, widths=[8, 16, 24, 16, 16], fc_dim=32, weights=str(path))
    msg = str(err.value)
    assert "does not match backbone 'caffenet_mini'" in msg
    assert "input_size/width overrides must match the checkpoint" in msg
    assert "0 missing" in msg and "0 unexpected" in msg and "with other shapes" in msg
    assert "stages.conv3" in msg and "\n" not in msg


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(WeightsError, match="no such checkpoint file"):
        CaffeNetMini(32, weights=str(tmp_path / "nope.ckpt"), **SMALL)


def test_unresolved_source_spec_is_refused():
    with pytest.raises(WeightsError, match="must be resolved to a checkpoint first"):
        CaffeNetMini(32, weights="source:fashion_mnist", **SMALL)


class _CreatesFile:
    """Unpickling this would create a file: a weights-only load must refuse it without running it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_checkpoint_is_refused_without_executing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"stages.conv1.0.weight": _CreatesFile(marker)}}, evil)
    assert not marker.exists()
    with pytest.raises(WeightsError) as err:
        CaffeNetMini(32, weights=str(evil), **SMALL)
    assert "not a loadable weights-only checkpoint" in str(err.value)
    with pytest.raises(WeightsError):
        backbone_state_from_file(evil)
    assert not marker.exists()


# -- hub weights offline ------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch):
    """No network whatever this machine has: every connection attempt fails like it does offline."""

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name", ["caffenet_mini", "alexnet", "vgg16", "resnet18", "resnet50"])
@pytest.mark.parametrize("spec", ["hub", "hub:tv_in1k"])
def test_hub_weights_fail_fast_offline(offline, name, spec):
    t0 = time.perf_counter()
    with pytest.raises(WeightsError) as err:
        build(name, weights=spec, input_size=64)
    elapsed = time.perf_counter() - t0
    msg = str(err.value)
    assert elapsed < 1.0, f"{name}: took {elapsed:.2f}s to fail"
    assert "\n" not in msg
    assert "source:fashion_mnist" in msg
    assert f"backbone.weights={spec!r}" in msg


def test_timm_hub_without_hf_offline_probes_network(offline, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match=r"no internet \(huggingface.co unreachable\).*source:fashion_mnist"):
        build("resnet18", weights="hub", input_size=32)
    assert time.perf_counter() - t0 < 1.0



def test_cli_reports_a_weights_error_as_one_line(offline, capsys):
    """train.py's error handler sees through Hydra's InstantiationException to the WeightsError."""
    from transferrable.core.errors import exit_on_user_error

    cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "backbone" / "resnet18.yaml"), {"weights": "hub"})
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(lambda: instantiate(cfg))()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: backbone.weights='hub' for 'resnet18'") and "\n" not in err

    # any other failure to build a config object is one line too (issue 29: Hydra's own errors at the entry points)
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(lambda: instantiate({"_target_": "models.backbones.CaffeNetMini", "widths": [1]}))()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "could not be built" in err and "\n" not in err


def test_alexnet_from_scratch_uses_he_init_so_signal_reaches_fc7():
    """torchvision's AlexNet has no init of its own; from scratch the suite gives its convs He init (fan_out)
    and its fc layers N(0, 0.01), as torchvision's VGG: the conv5 response keeps its scale through the stack."""
    import math

    from models.backbones import TorchvisionAlexNet

    torch.manual_seed(0)
    net = TorchvisionAlexNet(input_size=64, pool5_size=2).eval()
    conv1 = net.stages["conv1"][0]
    fan_out = conv1.out_channels * conv1.kernel_size[0] * conv1.kernel_size[1]
    assert abs(float(conv1.weight.std()) - math.sqrt(2 / fan_out)) < 0.1 * math.sqrt(2 / fan_out)
    assert float(net.stages["fc6"][0].weight.std()) == pytest.approx(0.01, rel=0.05)
    with torch.no_grad():
        taps = net.forward_taps(torch.randn(8, 3, 64, 64), ["conv1", "conv5"])
    assert float(taps["conv5"].std()) > 0.2 * float(taps["conv1"].std())
