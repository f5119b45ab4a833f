"""``backbone.weights=hub`` exercised offline: the loading path a user with internet takes, fed from local caches.

- timm resolves hub weights through the Hugging Face cache. A cache written here (``HF_HUB_CACHE``,
  ``models--timm--<repo>/snapshots/<rev>/model.safetensors`` and ``refs/main``) holding seeded random weights of
  resnet18's shapes is loaded with ``HF_HUB_OFFLINE=1`` through the suite's config and backbone, and every tap is
  compared with a direct ``timm.create_model(pretrained=True)`` from the same cache.
- With hub weights the inputs are normalised with the hub's (ImageNet) statistics, whatever the dataset's are.
- torchvision's hub files are hash-checked only when downloaded; a corrupt cached alexnet file is one line naming
  the file and how to clear it (exit 2 through ``exit_on_user_error``), without any download.

vgg16's weights are 0.5 GB: its cache test is marked slow and skipped unless ``TRANSFERRABLE_SLOW_TESTS=1``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import compose_train
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from models.backbones import TAP_NAMES
from models.weights import WeightsError, timm_cached_file, torchvision_cached_file

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
REV = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the Hub's snapshots are named
slow = pytest.mark.skipif(os.environ.get("TRANSFERRABLE_SLOW_TESTS") != "1",
                          reason="writes 0.5 GB of vgg16 weights; set TRANSFERRABLE_SLOW_TESTS=1")


@pytest.fixture
def offline(monkeypatch):
    """No network whatever this machine has: every connection attempt fails, and the Hub client is offline."""

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, offline) -> Path:
    """An empty Hugging Face cache in ``tmp_path``: ``HF_HOME``/``HF_HUB_CACHE`` point at it (huggingface_hub reads
    them at import, so its constant is set too), and ``TORCH_HOME`` at an empty torch hub."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return cache


def hub_repo(model_name: str) -> str:
    """The Hugging Face repo timm loads ``model_name``'s default pretrained weights from."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    assert cfg.hf_hub_id and not cfg.hf_hub_filename, cfg  # loaded as <repo>/model.safetensors
    return cfg.hf_hub_id


def write_hf_cache(cache: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """``models--<org>--<name>/{refs/main, snapshots/<rev>/model.safetensors, config.json}``, as the Hub
    client leaves them after a download (real caches symlink into ``blobs/``; plain files resolve the same)."""
    from safetensors.torch import save_file

    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / REV
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REV)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"architecture": repo.split("/")[1].split(".")[0]}))
    return snapshot / "model.safetensors"


def seeded_state(model_name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of ``model_name``'s shapes, BatchNorm statistics included (so they matter)."""
    torch.manual_seed(seed)
    state = timm.create_model(model_name, pretrained=False).state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.normal_(0, 0.1)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 1.5)
        elif key.endswith("bn1.weight") or key.endswith("bn2.weight"):
            value.uniform_(0.5, 1.5)
    return state


def build_backbone(*overrides: str):
    """The backbone as train.py builds it: train.yaml composed with the overrides, ``cfg.backbone`` instantiated.
    A constructor's own error is re-raised unwrapped from Hydra's InstantiationException."""
    cfg = compose_train(["logger=none", "hardware=cpu", *overrides])
    try:
        return cfg, instantiate(cfg.backbone)
    except InstantiationException as err:
        raise err.__cause__ from None


# -- timm resnet18 through a pre-populated Hugging Face cache ----------------------------------------------------
def test_timm_resnet18_default_tag_is_the_a1_repo():
    """The repo written below is the one timm resolves ``resnet18`` (``backbone.weights=hub``) to."""
    assert hub_repo("resnet18") == "timm/resnet18.a1_in1k"


def test_resnet18_hub_weights_load_from_the_hf_cache_offline(hf_cache):
    state = seeded_state("resnet18")
    path = write_hf_cache(hf_cache, hub_repo("resnet18"), state)
    assert timm_cached_file("resnet18") == str(path)

    t0 = time.perf_counter()
    cfg, backbone = build_backbone("backbone=resnet18", "backbone.weights=hub", "backbone.input_size=64")
    assert time.perf_counter() - t0 < 30
    backbone.eval()
    reference = timm.create_model("resnet18", pretrained=True).eval()  # the same cache, the same process

    # the cached weights were loaded, not a random init: stem + layer1..4 hold exactly the file's tensors
    own = backbone.state_dict()
    stage_of = {"conv1": ("conv1.", "bn1."), "conv2": ("layer1.",), "conv3": ("layer2.",), "conv4": ("layer3.",),
                "conv5": ("layer4.",)}
    n = 0
    for key, value in state.items():
        for stage, prefixes in stage_of.items():
            for p in prefixes:
                if key.startswith(p):
                    sub = key[len(p):] if stage != "conv1" else f"{['conv1.', 'bn1.'].index(p)}.{key[len(p):]}"
                    assert torch.equal(own[f"stages.{stage}.{sub}"], value), key
                    n += 1
    assert n == len([k for k in state if not k.startswith("fc.")])

    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        taps = backbone.forward_taps(x, list(TAP_NAMES))
        r = reference
        expected = {}
        h = r.maxpool(r.act1(r.bn1(r.conv1(x))))
        expected["conv1"] = h
        for tap, layer in zip(("conv2", "conv3", "conv4", "conv5"), (r.layer1, r.layer2, r.layer3, r.layer4),
                              strict=True):
            h = layer(h)
            expected[tap] = h
        expected["pool5"] = r.forward_head(h, pre_logits=True)
        features = r.forward_features(x)
    for tap in ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5"):
        assert taps[tap].shape == expected[tap].shape, tap
        torch.testing.assert_close(taps[tap], expected[tap], rtol=1e-5, atol=1e-5, msg=tap)
    torch.testing.assert_close(taps["conv5"], features, rtol=1e-5, atol=1e-5)  # timm's own feature path
    # fc6/fc7 are layers the suite adds to ResNets (models/backbones.py): random with hub weights, 512-D
    assert taps["fc6"].shape == taps["fc7"].shape == (2, cfg.backbone.fc_dim)
    assert not any(k.startswith("fc.") for k in own)  # timm's 1000-way classifier is not part of the backbone


def test_resnet18_hub_tag_loads_its_own_repo(hf_cache):
    """``hub:<tag>`` -> ``timm/resnet18.<tag>``; another tag's cache is not used for it."""
    write_hf_cache(hf_cache, "timm/resnet18.a1_in1k", seeded_state("resnet18", 0))
    with pytest.raises(WeightsError) as err:
        build_backbone("backbone=resnet18", "backbone.weights=hub:tv_in1k")
    assert "\n" not in str(err.value) and "not in the Hugging Face cache" in str(err.value)

    state = seeded_state("resnet18", 1)
    write_hf_cache(hf_cache, "timm/resnet18.tv_in1k", state)
    _, backbone = build_backbone("backbone=resnet18", "backbone.weights=hub:tv_in1k")
    assert torch.equal(backbone.stages.conv2[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_hf_cache_with_a_damaged_file_is_one_line(hf_cache):
    path = write_hf_cache(hf_cache, hub_repo("resnet18"), seeded_state("resnet18"))
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(WeightsError) as err:
        build_backbone("backbone=resnet18", "backbone.weights=hub")
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert msg.endswith(f"delete {hf_cache / 'models--timm--resnet18.a1_in1k'} and retry")


def test_cached_timm_weights_without_hf_offline_say_how_to_use_them(hf_cache, monkeypatch):
    """Without HF_HUB_OFFLINE the Hub client would try the network first; with no network the line says to set it."""
    from huggingface_hub import constants

    path = write_hf_cache(hf_cache, hub_repo("resnet18"), seeded_state("resnet18"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    t0 = time.perf_counter()
    with pytest.raises(WeightsError) as err:
        build_backbone("backbone=resnet18", "backbone.weights=hub")
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert "\n" not in msg and f"cached at {path}: set HF_HUB_OFFLINE=1" in msg


@slow
def test_vgg16_hub_weights_load_from_the_hf_cache_offline(hf_cache):
    state = seeded_state("vgg16")
    write_hf_cache(hf_cache, hub_repo("vgg16"), state)
    _, backbone = build_backbone("backbone=vgg16", "backbone.weights=hub", "backbone.input_size=32")
    reference = timm.create_model("vgg16", pretrained=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval().forward_taps(x, "conv5")["conv5"],
                                   reference.features[:-1](x))


# -- normalisation follows the weights ---------------------------------------------------------------------------
def _datamodule(make_cfg, *overrides):
    from transferrable.run.runner import build_datamodule

    cfg = make_cfg(*overrides)
    return cfg, build_datamodule(cfg)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "vgg16", "alexnet"])
@pytest.mark.parametrize("weights", ["hub", "hub:tv_in1k"])
def test_hub_weights_switch_the_inputs_to_imagenet_statistics(make_cfg, backbone, weights):
    if backbone == "alexnet" and weights != "hub":
        weights = "hub:IMAGENET1K_V1"
    base = make_cfg(f"backbone={backbone}")
    assert list(base.dataset.mean) != IMAGENET_MEAN  # Fashion-MNIST's own statistics without hub weights
    cfg, dm = _datamodule(make_cfg, f"backbone={backbone}", f"backbone.weights={weights}")
    assert list(dm.mean) == pytest.approx(IMAGENET_MEAN) and list(dm.std) == pytest.approx(IMAGENET_STD)
    assert list(cfg.dataset.mean) == pytest.approx(IMAGENET_MEAN)  # what the run records (run_config_yaml)


def test_the_images_are_normalised_with_the_hub_statistics(make_cfg):
    """The tensors the DataModule delivers: the same image, normalised with Fashion-MNIST's statistics without hub
    weights and with ImageNet's with them."""
    _, plain = _datamodule(make_cfg, "backbone=resnet18", "backbone.input_size=32")
    _, hub = _datamodule(make_cfg, "backbone=resnet18", "backbone.weights=hub", "backbone.input_size=32")
    x_plain, y_plain = plain.val_dataloader().dataset[0]
    x_hub, y_hub = hub.val_dataloader().dataset[0]
    assert y_plain == y_hub and x_hub.shape == x_plain.shape == (3, 32, 32)
    shape = (3, 1, 1)
    pixels = x_plain * torch.tensor([0.353] * 3).view(shape) + torch.tensor([0.286] * 3).view(shape)
    expected = (pixels - torch.tensor(IMAGENET_MEAN).view(shape)) / torch.tensor(IMAGENET_STD).view(shape)
    torch.testing.assert_close(x_hub, expected, rtol=1e-4, atol=1e-4)


def test_explicit_dataset_statistics_win_over_the_hub(make_cfg):
    cfg, dm = _datamodule(make_cfg, "backbone=resnet18", "backbone.weights=hub", "dataset.mean=[0.5,0.5,0.5]")
    assert list(dm.mean) == [0.5, 0.5, 0.5]
    assert list(dm.std) == pytest.approx(IMAGENET_STD)


@pytest.mark.parametrize("weights", [None, "source:fashion_mnist"])
def test_other_weights_keep_the_dataset_statistics(make_cfg, weights):
    cfg, dm = _datamodule(make_cfg, "backbone=resnet18", f"backbone.weights={weights or 'null'}")
    assert list(dm.mean) == pytest.approx([0.286] * 3) and list(dm.std) == pytest.approx([0.353] * 3)


# -- torchvision alexnet: a corrupt cached file --------------------------------------------------------------------
def _corrupt_alexnet(tmp_path, monkeypatch, content: bytes) -> Path:
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.AlexNet_Weights.DEFAULT.url
    assert url.endswith("/alexnet-owt-7be5be79.pth")
    path = torchvision_cached_file(url)
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    return path


def _valid_but_wrong_checkpoint() -> bytes:
    import io

    import torchvision

    buf = io.BytesIO()
    torch.save(torchvision.models.alexnet(weights=None).features[0].state_dict(), buf)
    return buf.getvalue()


@pytest.mark.parametrize("content", ["garbage", "truncated_zip", "other_weights"])
def test_corrupt_cached_alexnet_is_one_line_naming_the_file(tmp_path, monkeypatch, offline, capsys, content):
    from transferrable.core.errors import exit_on_user_error

    blob = {"garbage": b"not a checkpoint\n" * 10, "truncated_zip": _valid_but_wrong_checkpoint()[:500],
            "other_weights": _valid_but_wrong_checkpoint()}[content]
    path = _corrupt_alexnet(tmp_path, monkeypatch, blob)
    expected = (f"error: backbone.weights='hub' for 'alexnet': the cached file {path} is corrupt (its sha256 does "
                f"not start with 7be5be79); delete {path} and retry")

    t0 = time.perf_counter()
    with pytest.raises(WeightsError) as err:
        build_backbone("backbone=alexnet", "backbone.weights=hub")
    assert time.perf_counter() - t0 < 5  # no download attempt (socket.create_connection refuses anyway)
    assert f"error: {err.value}" == expected

    # through train.py's handler: one line on stderr, exit 2
    cfg = compose_train(["backbone=alexnet", "backbone.weights=hub"])
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(lambda: instantiate(cfg.backbone))()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == expected
    assert path.read_bytes() == blob  # left for the user to delete, as the line says


def test_alexnet_without_a_cached_file_still_fails_fast_offline(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match=r"no internet \(download.pytorch.org unreachable\)") as err:
        build_backbone("backbone=alexnet", "backbone.weights=hub")
    # no retries: a download attempt costs ~46 s offline; the bound leaves room for a loaded machine (xdist workers)
    assert time.perf_counter() - t0 < 10.0 and "\n" not in str(err.value)
    assert not (tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth").exists()


def test_a_cached_alexnet_file_that_passes_the_hash_check_is_loaded(tmp_path, monkeypatch, offline):
    """A file named with its sha256 prefix (a file's real hash cannot be forged here, so the name follows the file)
    goes through torchvision's own loading from the cache: the backbone holds its tensors."""
    import hashlib

    import torchvision
    from torchvision.models import AlexNet_Weights

    torch.manual_seed(0)
    state = torchvision.models.alexnet(weights=None).state_dict()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    tmp = tmp_path / "alexnet.pth"
    torch.save(state, tmp)
    prefix = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    url = f"https://download.pytorch.org/models/alexnet-owt-{prefix}.pth"
    monkeypatch.setattr(AlexNet_Weights.IMAGENET1K_V1.value, "url", url)
    path = torchvision_cached_file(url)
    path.parent.mkdir(parents=True)
    tmp.rename(path)
    _, backbone = build_backbone("backbone=alexnet", "backbone.weights=hub")
    assert torch.equal(backbone.stages.conv1[0].weight, state["features.0.weight"])
    assert torch.equal(backbone.stages.fc7[0].weight, state["classifier.4.weight"])


def test_hub_specs_are_documented_as_loading_from_a_cache():
    """README and the backbone configs say where cached hub weights are found."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "HF_HUB_OFFLINE=1" in readme and "TORCH_HOME" in readme


def test_source_weights_bring_their_source_statistics(make_cfg):
    """backbone.weights=source:<dataset> normalises the task's images as that source was trained (here the
    generated ImageNet-role source, ImageNet's statistics, on Fashion-MNIST); the command line still wins."""
    cfg, dm = _datamodule(make_cfg, "backbone.weights=source:fractalnet")
    assert list(dm.mean) == pytest.approx(IMAGENET_MEAN) and list(dm.std) == pytest.approx(IMAGENET_STD)
    assert list(cfg.dataset.mean) == pytest.approx(IMAGENET_MEAN)


def test_source_statistics_follow_the_source_overrides(make_cfg):
    """A source pretrained with other statistics (bigan_transfer's supervised row: pixels in [-1, 1] through
    source_overrides) is fed the task's images the same way, not with its dataset config's defaults."""
    cfg, dm = _datamodule(make_cfg, "experiment=bigan_transfer", "hydra.mode=RUN",
                          "backbone.weights=source:fashion_mnist")
    assert list(dm.mean) == pytest.approx([0.5] * 3) and list(dm.std) == pytest.approx([0.5] * 3)


def test_the_design_card_command_stops_offline_naming_the_alternatives(hf_cache, tmp_path, monkeypatch, capsys):
    """``python train.py task=rcnn backbone=vgg16`` means R-CNN on the hub's ImageNet VGG16: offline, without cached
    weights, train() stops before any source pretraining or scene generation, with one line (exit 2) naming the
    offline alternatives."""
    from conftest import point_paths_at

    from transferrable.core.errors import exit_on_user_error
    from transferrable.run import runner, source

    cfg = point_paths_at(compose_train(["task=rcnn", "backbone=vgg16", "logger=none"]), tmp_path / "run")
    assert cfg.backbone.weights == "hub" and cfg.backbone.model_name == "vgg16_bn"
    pretrained = []
    monkeypatch.setattr(source, "pretrain_source", lambda *a, **k: pretrained.append(a))
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(runner.train)(cfg)
    assert time.perf_counter() - t0 < 30  # imports (lightning, timm) only: ~10 s on 2 loaded cores, not a pretraining
    assert exit_info.value.code == 2 and not pretrained
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: backbone.weights='hub' for 'vgg16': HF_HUB_OFFLINE=1 is set") and "\n" not in err
    assert "backbone=efficientnet_lite0" in err and "backbone.weights=source:<dataset>" in err
    assert not (tmp_path / "run" / "cache").exists() or not any((tmp_path / "run" / "cache").rglob("*.npy"))
