"""The bad-input matrix (issue #10): one case per kind of bad input, across datasets and tasks.

Every case asserts one of two documented behaviours:

- **error**: a one-line message of a type ``transferrable/core/errors.py`` prints as ``error: ...`` without a
  traceback (``find_user_error``), naming the file or override and what was expected; or
- **policy**: the documented skip / clip / loop / convert policy, with its count in the DataModule's ``summary``
  (or the cache's ``stats``);

and, where a run or cache was started, that nothing is left looking complete (no ``metrics.json``, no manifest).
``CASES`` is the README's "Bad-input matrix" table (``test_readme_lists_every_case`` keeps them in step).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_train
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf
from PIL import Image
from test_datamodules import make_tree, write_image
from test_rcnn_segmentation import _write_voc as write_segmentation_voc
from test_ucf101_motion import ACTIONS
from test_voc_scenes import ann, make_voc

import transferrable.run.runner as runner
import transferrable.run.source as source
from datamodules.base import DatasetError, read_image
from datamodules.coco_captions import COCOCaptionsDataModule
from datamodules.fashion_mnist import FashionMNISTDataModule
from datamodules.imagefolder import ImageFolderDataModule
from datamodules.motion_generator import generate_motions
from datamodules.ucf101 import UCF101DataModule
from datamodules.voc import VOCDetectionDataModule
from datamodules.voc_segmentation import VOCSegmentationDataModule
from transferrable.core.errors import (
    ConfigError,
    NonFiniteLossError,
    exit_on_user_error,
    find_user_error,
    one_line,
)

MINI = ["backbone.widths=[8,16,16,16,16]", "backbone.fc_dim=32"]


@dataclass
class Ctx:
    tmp: Path
    fmnist_dir: Path
    make_cfg: Callable
    monkeypatch: pytest.MonkeyPatch
    caplog: pytest.LogCaptureFixture


def one_line_error(err: BaseException, *names: str) -> str:
    """``err`` is printed by train.py/eval.py as one line (a user error type) that names ``names``."""
    assert find_user_error(err) is not None, f"{type(err).__name__} would print a traceback: {err}"
    msg = one_line(err)
    assert "\n" not in msg and msg.strip(), msg
    for name in names:
        assert str(name) in msg, (name, msg)
    return msg


def no_work(ctx: Ctx) -> None:
    """Fail the test if any pretraining or data loading starts."""
    ctx.monkeypatch.setattr(source, "resolve_source_weights", lambda cfg: pytest.fail("pretraining started"))
    ctx.monkeypatch.setattr(runner, "build_datamodule", lambda cfg: pytest.fail("data loading started"))


def no_metrics(cfg) -> None:
    assert not (Path(cfg.paths.output_dir) / runner.METRICS_FILE).exists()


# -- tiny layouts -----------------------------------------------------------------------------------------------
def image_folder(root: Path) -> Path:
    make_tree(root / "train", {"a": 3, "b": 3})
    make_tree(root / "test", {"a": 1, "b": 1})
    return root


def folder_dm(root: Path, **kw) -> ImageFolderDataModule:
    return ImageFolderDataModule(data_dir=str(root), input_size=16, batch_size=2, eval_batch_size=8, **kw)


def voc(ctx: Ctx, **annotations: str) -> Path:
    return make_voc(ctx.tmp / "VOC2099", annotations or {"a": ann(("dog", (2, 2, 20, 20), 0))})


def coco(root: Path, captions: dict[str, list[str]]) -> Path:
    """A COCO captions layout: annotations/captions_{train,val}2014.json + train2014/, val2014/ (8x8 JPEGs)."""
    (root / "annotations").mkdir(parents=True)
    for split, n in (("train", 3), ("val", 2)):
        (root / f"{split}2014").mkdir()
        images, anns = [], []
        for i in range(n):
            name = f"COCO_{split}2014_{i:012d}.jpg"
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / f"{split}2014" / name)
            images.append({"id": i, "file_name": name})
            anns += [{"image_id": i, "id": 10 * i + j, "caption": c.format(i=i)} for j, c in enumerate(captions[split])]
        (root / "annotations" / f"captions_{split}2014.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


def coco_dm(root: Path, **kw) -> COCOCaptionsDataModule:
    return COCOCaptionsDataModule(**{"data_dir": root, "val_images": 1, "vocab_min_count": 1, "input_size": 8, **kw})


CAPTIONS = {"train": ["a dog on the left", "a cat on the right"], "val": ["a dog on the left"]}


@pytest.fixture(scope="module")
def short_videos(tmp_path_factory, fmnist_dir) -> Path:
    """A generated UCF101 layout whose videos (10 frames) are shorter than a 16-frame clip."""
    return generate_motions(tmp_path_factory.mktemp("ucf"), progress=False, classes=ACTIONS, clips_per_group=1,
                            num_frames=10, frame_size=24, seed=0, data_dir=fmnist_dir)


def ucf_dm(root: Path, cache: Path, **kw) -> UCF101DataModule:
    return UCF101DataModule(data_dir=root, frame_size=[24, 24], input_size=20, cache_dir=cache, progress=False,
                            val_groups=2, batch_size=4, **kw)


def suite_checkpoint(ctx: Ctx, *overrides: str) -> Path:
    """A checkpoint as train.py writes it (state dict + the run's resolved config), without training."""
    cfg = ctx.make_cfg(*overrides, out="other")
    path = ctx.tmp / "other.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "run_config_yaml": OmegaConf.to_yaml(cfg, resolve=True)}, path)
    return path


# -- the cases --------------------------------------------------------------------------------------------------
def corrupt_jpeg(ctx: Ctx) -> None:
    root = image_folder(ctx.tmp / "folder")
    bad = root / "test" / "b" / "zz.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 corrupt JPEG" + bytes(20) + b"\xff\xd9")  # whole-looking: passes the scan
    dm = folder_dm(root)
    dm.setup()
    with pytest.raises(DatasetError) as err:
        dm.splits["test"][len(dm.splits["test"]) - 1]
    one_line_error(err.value, bad, "expected a JPEG/PNG/BMP image")


def zero_byte_image(ctx: Ctx) -> None:
    root = voc(ctx)
    (root / "JPEGImages" / "a.jpg").write_bytes(b"")
    with pytest.raises(DatasetError) as err:  # found by the scan at setup, not when an epoch reaches it
        VOCDetectionDataModule(root).setup()
    one_line_error(err.value, root / "JPEGImages" / "a.jpg", "empty file (0 bytes)")


def cmyk_jpeg_converted(ctx: Ctx) -> None:
    path = ctx.tmp / "cmyk.jpg"
    Image.new("CMYK", (6, 4), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    img = read_image(str(path))
    assert img.dtype == np.uint8 and img.shape == (4, 6, 3)
    assert img[..., 0].min() > 200 and img[..., 1:].max() < 60  # converted to RGB red, not refused


def png16_converted(ctx: Ctx) -> None:
    path = ctx.tmp / "deep.png"
    Image.fromarray(np.full((4, 6), 0x8000, np.uint16)).save(path)  # 16-bit grayscale
    img = read_image(str(path))
    assert img.dtype == np.uint8 and img.shape == (4, 6, 3) and int(img[0, 0, 0]) == 128  # 0x8000 >> 8
    root = image_folder(ctx.tmp / "folder")
    shutil.copy(path, root / "train" / "a" / "deep.png")
    dm = folder_dm(root)
    dm.setup()
    items = [dm.splits[s][i][0] for s in ("train", "val") for i in range(len(dm.splits[s]))]
    assert all(x.shape == (3, 16, 16) and x.dtype == torch.float32 for x in items)


def malformed_voc_xml(ctx: Ctx) -> None:
    root = voc(ctx)
    (root / "Annotations" / "a.xml").write_text("<annotation><object><name>dog</name>")
    with pytest.raises(DatasetError) as err:
        VOCDetectionDataModule(root).setup()
    one_line_error(err.value, root / "Annotations" / "a.xml", "malformed VOC annotation")


def malformed_coco_json(ctx: Ctx) -> None:
    root = coco(ctx.tmp / "coco", CAPTIONS)
    bad = root / "annotations" / "captions_train2014.json"
    bad.write_text(bad.read_text()[:-5])
    with pytest.raises(DatasetError) as err:
        coco_dm(root).setup()
    one_line_error(err.value, bad, "is not valid JSON")
    bad.write_text(json.dumps({"images": []}))  # valid JSON, not a captions file
    with pytest.raises(DatasetError) as err:
        coco_dm(root).setup()
    one_line_error(err.value, bad, "expected a COCO captions JSON with 'images' and 'annotations'")


def box_out_of_bounds(ctx: Ctx) -> None:
    dm = VOCDetectionDataModule(voc(ctx, a=ann(("dog", (-5, 2, 50, 20), 0))))  # image is 40x30
    dm.setup()
    assert dm.summary["clipped_boxes"] == 1 and dm.records("train")[0].boxes.tolist() == [[0, 1, 40, 20]]


def zero_area_box(ctx: Ctx) -> None:
    dm = VOCDetectionDataModule(voc(ctx, a=ann(("dog", (10, 10, 9, 20), 0), ("cat", (1, 1, 8, 8), 0))))
    with ctx.caplog.at_level(logging.WARNING):
        dm.setup()
    assert dm.summary["zero_area_boxes"] == 1 and dm.summary["objects"] == 1 and "zero area" in ctx.caplog.text


def unknown_class_name(ctx: Ctx) -> None:
    root = voc(ctx, a=ann(("unicorn", (1, 1, 5, 5), 0), ("dog", (1, 1, 9, 9), 0)))
    dm = VOCDetectionDataModule(root)
    dm.setup()
    assert dm.summary["unknown_class_objects"] == 1 and dm.summary["unknown_classes"] == {"unicorn": 1}
    with pytest.raises(DatasetError) as err:
        VOCDetectionDataModule(root, strict_classes=True).setup()
    one_line_error(err.value, root / "Annotations" / "a.xml", "class 'unicorn' is not in the class list")


def split_names_missing_image(ctx: Ctx) -> None:
    root = voc(ctx)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("a\nghost\n")
    with pytest.raises(DatasetError) as err:
        VOCDetectionDataModule(root).setup()
    one_line_error(err.value, root / "JPEGImages" / "ghost.jpg", "listed in ImageSets/Main but missing")


def split_names_missing_video(ctx: Ctx, videos: Path) -> None:
    root = shutil.copytree(videos, ctx.tmp / "ucf")
    (root / "UCF-101" / "MoveRight" / "v_MoveRight_g03_c01.avi").unlink()
    with pytest.raises(DatasetError) as err:
        ucf_dm(root, ctx.tmp / "cache").setup()
    one_line_error(err.value, "MoveRight/v_MoveRight_g03_c01.avi", "which is not under")


def undecodable_video(ctx: Ctx, videos: Path) -> None:
    root = shutil.copytree(videos, ctx.tmp / "ucf")
    bad = root / "UCF-101" / "MoveLeft" / "v_MoveLeft_g01_c01.avi"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(DatasetError) as err:
        ucf_dm(root, ctx.tmp / "c1").setup()
    one_line_error(err.value, bad.name, "unreadable video")
    dm = ucf_dm(root, ctx.tmp / "c2", bad_videos="skip")
    dm.setup()
    assert dm.summary["bad_videos_skipped"] == 1


def clip_shorter_than_clip_length(ctx: Ctx, videos: Path) -> None:
    dm = ucf_dm(videos, ctx.tmp / "cache")  # 10-frame videos, clip_length 16
    dm.setup()
    assert dm.summary["short_policy"] == "loop" and dm.summary["short_videos"] == len(list(videos.rglob("*.avi")))
    video, _, _ = dm.splits["test"][0]
    assert video.shape[0] == 16 and torch.equal(video[10], video[0])  # looped from the start


def caption_only_unknown_words(ctx: Ctx) -> None:
    captions = {**CAPTIONS, "train": [*CAPTIONS["train"], "zyzzyva{i} qwxq{i}"]}  # rare: once each
    dm = coco_dm(coco(ctx.tmp / "coco", captions), vocab_min_count=2)  # the rare words stay out
    dm.setup()
    assert dm.summary["unknown_only_captions_not_trained"] == 3  # one per training image
    assert all(any(t != dm.vocab.unk for t in ids) for _, ids in dm.train_pairs)


def empty_after_filtering(ctx: Ctx) -> None:
    root = coco(ctx.tmp / "coco", CAPTIONS)
    with pytest.raises(DatasetError) as err:  # every word is rarer than vocab_min_count: nothing to train on
        coco_dm(root, vocab_min_count=100).setup()
    one_line_error(err.value, f"dataset.data_dir={root}", "vocab_min_count=100")
    with pytest.raises(DatasetError) as err:
        folder_dm(image_folder(ctx.tmp / "folder"), exclude_classes=["a"]).setup()
    one_line_error(err.value, "fewer than 2 classes")


def worker_crash(ctx: Ctx) -> None:
    root = image_folder(ctx.tmp / "folder")
    bad = root / "test" / "b" / "zz.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 corrupt" + bytes(20) + b"\xff\xd9")  # whole-looking: passes the scan
    dm = folder_dm(root, num_workers=1)
    with pytest.raises(DatasetError) as err:
        for _ in dm.test_dataloader():
            pass
    assert "DataLoader worker" in str(err.value)  # PyTorch's re-raise carries the worker's traceback ...
    msg = one_line_error(err.value, bad, "unreadable image file")  # ... train.py prints the line that matters
    assert msg.endswith("(raised in DataLoader worker process 0)")

    @exit_on_user_error
    def main():  # as train.py's main
        raise err.value

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and stderr.getvalue() == f"error: {msg}\n"


def worker_crash_in_transform(ctx: Ctx) -> None:
    root = image_folder(ctx.tmp / "folder")
    odd = write_image(root / "test" / "b" / "odd.png", size=(5, 7))  # a valid image the transform trips on
    dm = folder_dm(root, num_workers=1)
    dm.setup()
    test = dm.splits["test"]
    index = test.images.index(str(odd))

    def transform(image):  # fails on one image (a bug of its own, say): the worker's error names the sample
        if image.shape[:2] == (5, 7):
            raise IndexError("index 7 is out of bounds for axis 1 with size 7")
        return {"image": torch.zeros(3, 16, 16)}

    test.transform = transform
    with pytest.raises(DatasetError) as err:
        for _ in dm.test_dataloader():
            pass
    msg = one_line_error(err.value, f"sample {index} ({odd})", "IndexError: index 7 is out of bounds")
    assert msg.endswith("(raised in DataLoader worker process 0)")


def nan_loss_classify(ctx: Ctx) -> None:
    from lightning_modules.classify import ClassifyModule

    real, count = ClassifyModule._step, {"train": 0}

    def flaky(self, batch, split):
        loss = real(self, batch, split)
        count[split] = count.get(split, 0) + 1
        return loss * float("nan") if split == "train" and count["train"] == 3 else loss  # 1st batch of epoch 2

    ctx.monkeypatch.setattr(ClassifyModule, "_step", flaky)
    cfg = ctx.make_cfg(*MINI, "trainer.max_epochs=3")
    with pytest.raises(NonFiniteLossError) as err:
        runner.train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    one_line_error(err.value, "non-finite loss", f"last good checkpoint is {last}", "epoch 1, batch 0")
    blob = torch.load(last, map_location="cpu", weights_only=True)
    assert blob["epoch"] == 0 and all(torch.isfinite(v).all() for v in blob["state_dict"].values()
                                      if v.is_floating_point())
    no_metrics(cfg)


def inf_loss_bigan(ctx: Ctx) -> None:
    from lightning_modules.bigan import BiGANModule

    real, count = BiGANModule.compute_losses, {"n": 0}

    def flaky(self, *a, **k):
        out = real(self, *a, **k)
        count["n"] += 1
        if count["n"] == 3:  # the first batch of the second epoch (2 batches per epoch)
            out["GE"] = out["GE"] * float("inf")
        return out

    ctx.monkeypatch.setattr(BiGANModule, "compute_losses", flaky)
    cfg = ctx.make_cfg("task=bigan", "bigan.hidden=[16,16]", "bigan.latent_dim=4", "bigan.bn_batches=1",
                       "bigan.probe_max_train=50", "trainer.max_epochs=3")
    with pytest.raises(NonFiniteLossError) as err:
        runner.train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    one_line_error(err.value, "non-finite loss", "inf", f"last good checkpoint is {last}")
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0
    no_metrics(cfg)


def missing_ckpt_path(ctx: Ctx) -> None:
    no_work(ctx)
    cfg = ctx.make_cfg(f"ckpt_path={ctx.tmp / 'nope.ckpt'}")
    with pytest.raises(FileNotFoundError) as err:
        runner.train(cfg)
    one_line_error(err.value, f"ckpt_path='{ctx.tmp / 'nope.ckpt'}'", "no such checkpoint file")
    no_metrics(cfg)


def ckpt_of_another_architecture(ctx: Ctx) -> None:
    ckpt = suite_checkpoint(ctx, "backbone=resnet18", "backbone.fc_dim=64")
    no_work(ctx)
    cfg = ctx.make_cfg(f"ckpt_path={ckpt}")
    with pytest.raises(ConfigError) as err:
        runner.train(cfg)
    one_line_error(err.value, f"ckpt_path='{ckpt}'", "another backbone architecture", "TimmResNet")
    no_metrics(cfg)


def ckpt_of_another_task(ctx: Ctx) -> None:
    ckpt = suite_checkpoint(ctx, "task=bigan")
    no_work(ctx)
    cfg = ctx.make_cfg(f"ckpt_path={ckpt}")
    with pytest.raises(ConfigError) as err:
        runner.train(cfg)
    one_line_error(err.value, f"ckpt_path='{ckpt}'", "written by task=bigan", "this run is task=classify")
    no_metrics(cfg)


def incompatible_overrides(ctx: Ctx) -> None:
    no_work(ctx)
    cfg = ctx.make_cfg("task=rcnn", "dataset=fashion_mnist")
    with pytest.raises(ConfigError) as err:
        runner.train(cfg)
    one_line_error(err.value, "task=rcnn needs a dataset with boxes", "FashionMNISTDataModule", "'voc'")
    no_metrics(cfg)


def segmentation_unexpected_palette_value(ctx: Ctx) -> None:
    mask = np.zeros((8, 12), np.uint8)
    mask[1, 1] = 7  # 3 classes: 0..3 and 255 (void) are valid
    dm = VOCSegmentationDataModule(write_segmentation_voc(ctx.tmp / "seg", [mask]), classes=["a", "b", "c"])
    dm.setup()
    with pytest.raises(DatasetError) as err:
        dm.datasets["train"][0]
    one_line_error(err.value, "im0.png", "unexpected label values [7]")


def segmentation_mask_of_wrong_size(ctx: Ctx) -> None:
    root = write_segmentation_voc(ctx.tmp / "seg", [np.zeros((8, 12), np.uint8)], image_size=(10, 8))
    dm = VOCSegmentationDataModule(root, classes=["a"])
    dm.setup()
    with pytest.raises(DatasetError) as err:
        dm.datasets["train"][0]
    one_line_error(err.value, "im0.png", "mask is 12x8 but its image", "is 10x8")


def proposal_cache_of_another_size(ctx: Ctx) -> None:
    from models.rcnn.proposals import ProposalCache

    cache = ProposalCache(ctx.tmp / "proposals", method="sliding_window", width=64)
    small = np.zeros((30, 40, 3), np.uint8)
    first = cache.get("im1", small)
    big = np.zeros((60, 80, 3), np.uint8)  # the same image id, another size: the cached boxes do not fit
    with ctx.caplog.at_level(logging.WARNING):
        boxes = cache.get("im1", big)
    assert cache.stats["size_mismatch"] == 1 and cache.stats["misses"] == 2 and "80x60" in ctx.caplog.text
    assert boxes[:, 2].max() > first[:, 2].max()  # recomputed for the new size, not reused


def unknown_hydra_choice(ctx: Ctx) -> None:
    with pytest.raises(MissingConfigException) as err:
        compose_train(["dataset=imagenet"])
    msg = str(err.value)  # Hydra's own message (train.py prints it without a traceback)
    assert "Could not find 'dataset/imagenet'" in msg and "Available options in 'dataset'" in msg and "voc" in msg


def truncated_idx_file(ctx: Ctx) -> None:
    d = shutil.copytree(ctx.fmnist_dir, ctx.tmp / "fmnist")
    path = d / "t10k-images-idx3-ubyte.gz"
    import gzip

    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(DatasetError) as err:
        FashionMNISTDataModule(data_dir=str(d)).setup()
    one_line_error(err.value, path)


def missing_data_dir(ctx: Ctx) -> None:
    with pytest.raises(DatasetError) as err:
        VOCDetectionDataModule(ctx.tmp / "absent").setup()
    one_line_error(err.value, f"dataset.data_dir={ctx.tmp / 'absent'}", "does not exist", "JPEGImages")


def crafted_pickle_ckpt(ctx: Ctx) -> None:
    marker = ctx.tmp / "pwned"
    evil = ctx.tmp / "evil.ckpt"
    buf = io.BytesIO()
    torch.save({"state_dict": {"x": _CreatesFile(marker)}}, buf)
    evil.write_bytes(buf.getvalue())
    no_work(ctx)
    cfg = ctx.make_cfg(f"ckpt_path={evil}")
    with pytest.raises(ConfigError) as err:
        runner.train(cfg)
    one_line_error(err.value, f"ckpt_path='{evil}'", "not a loadable weights-only checkpoint")
    assert not marker.exists()


def _wrapped_exit(cfg) -> tuple[int, str]:
    """``runner.train(cfg)`` under train.py's ``exit_on_user_error``: (exit code, stderr)."""

    @exit_on_user_error
    def main():
        return runner.train(cfg)

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, stderr.getvalue()


def bad_config_value(ctx: Ctx) -> None:
    no_work(ctx)
    for override, line in (("dataset.batch_size=0", "dataset.batch_size=0: expected an integer >= 1"),
                           ("model.optimizer.lr=-1", "model.optimizer.lr=-1: expected a number > 0")):
        cfg = ctx.make_cfg(override)
        code, err = _wrapped_exit(cfg)
        assert code == 2 and err == f"error: {line}\n", err
        no_metrics(cfg)


def input_size_too_small_for_taps(ctx: Ctx) -> None:
    no_work(ctx)
    cfg = ctx.make_cfg("backbone=alexnet", "backbone.input_size=32")
    code, err = _wrapped_exit(cfg)
    assert code == 2 and err.startswith("error: backbone.input_size=32: expected an integer >= 63 for TorchvisionAlexNet")


def bad_tap_list(ctx: Ctx) -> None:
    no_work(ctx)
    cfg = ctx.make_cfg("callbacks=tsne", "callbacks.tsne.taps=[conv1,fc9]")
    code, err = _wrapped_exit(cfg)
    assert code == 2 and err.startswith("error: callbacks.tsne.taps=[conv1,fc9]: no tap 'fc9'; expected a list") and "fc7" in err


def unwritable_path(ctx: Ctx) -> None:
    no_work(ctx)
    blocker = ctx.tmp / "a_file"  # tests run as root, where chmod does not stop writes: a file in the way does
    blocker.write_text("x")
    cfg = ctx.make_cfg()
    cfg.paths.cache_dir = str(blocker / "cache")
    code, err = _wrapped_exit(cfg)
    assert code == 2 and err == f"error: paths.cache_dir={blocker / 'cache'}: not writable ({blocker} is a file, not a directory)\n"


def class_folder_without_readable_image(ctx: Ctx) -> None:
    root = ctx.tmp / "flat"
    make_tree(root, {"a": 4, "b": 4})
    (root / "c").mkdir()
    for i in range(5):
        (root / "c" / f"{i}.gif.txt").write_text("not an image")
    (root / "c" / "broken.jpg").write_bytes(b"")
    with pytest.raises(DatasetError) as err:
        _ = folder_dm(root).num_classes  # what the runner asks before building the model, so before training
    one_line_error(err.value, "class folder 'c'", "no readable image", "6 files skipped",
                   "5 extension .txt is not an image format OpenCV reads", "broken.jpg", ", ...",
                   "dataset.exclude_classes")
    assert folder_dm(root, exclude_classes=["c"]).num_classes == 2


def skipped_files_reported(ctx: Ctx) -> None:
    root = image_folder(ctx.tmp / "folder")
    for i in range(4):
        (root / "train" / "a" / f"notes{i}.txt").write_text("x")
    dm = folder_dm(root)
    with ctx.caplog.at_level(logging.WARNING):
        dm.setup()
    # make_tree leaves a notes.txt in each class folder too: 6 in train/, 2 in test/
    assert "6 files skipped (6 extension .txt is not an image format OpenCV reads" in ctx.caplog.text
    assert "notes0.txt" in ctx.caplog.text and ", ..." in ctx.caplog.text and "notes3.txt" not in ctx.caplog.text
    assert dm.summary["skipped_files_train"] == 6 and dm.summary["skipped_unsupported"] == 8


def opencv_formats_accepted(ctx: Ctx) -> None:
    import cv2

    root = image_folder(ctx.tmp / "folder")
    ext = ("pgm", "ppm", "tif", "tiff", "webp", "bmp")
    for i, e in enumerate(ext):
        img = np.full((6, 5, 3), 30 * i, np.uint8)
        assert cv2.imwrite(str(root / "train" / ("a" if i % 2 else "b") / f"x{i}.{e.upper() if i == 2 else e}"),
                           img[..., 0] if e == "pgm" else img)
    dm = folder_dm(root)
    dm.setup()
    every = [*dm.splits["train"].images, *dm.splits["val"].images]
    assert all(any(p.endswith(f"x{i}.{e.upper() if i == 2 else e}") for p in every) for i, e in enumerate(ext))
    assert all(dm.splits[s][i][0].shape == (3, 16, 16) for s in ("train", "val") for i in range(len(dm.splits[s])))


class _CreatesFile:
    """Unpickling this would create a file: a weights-only load refuses it without running it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@dataclass
class Case:
    name: str
    run: Callable
    behaviour: str
    where: str
    slow: bool = False
    videos: bool = False


CASES = [
    Case("corrupt_jpeg", corrupt_jpeg, "error naming the file", "datamodules/base.py read_image"),
    Case("zero_byte_image", zero_byte_image, "error naming the file", "datamodules/base.py read_image"),
    Case("cmyk_jpeg_converted", cmyk_jpeg_converted, "converted to 8-bit RGB (OpenCV IMREAD_COLOR)",
         "datamodules/base.py read_image"),
    Case("png16_converted", png16_converted, "converted to 8-bit RGB (value >> 8)", "datamodules/base.py read_image"),
    Case("malformed_voc_xml", malformed_voc_xml, "error naming the XML", "datamodules/voc.py parse_voc_xml"),
    Case("malformed_coco_json", malformed_coco_json, "error naming the JSON (invalid, or not a captions file)",
         "datamodules/coco_captions.py"),
    Case("box_out_of_bounds", box_out_of_bounds, "clipped to the image; summary clipped_boxes", "datamodules/voc.py"),
    Case("zero_area_box", zero_area_box, "object skipped with a warning; summary zero_area_boxes", "datamodules/voc.py"),
    Case("unknown_class_name", unknown_class_name,
         "object skipped; summary unknown_class_objects / unknown_classes (strict_classes=true: error)",
         "datamodules/voc.py"),
    Case("split_names_missing_image", split_names_missing_image, "error naming the image and the split",
         "datamodules/voc.py"),
    Case("split_names_missing_video", split_names_missing_video, "error naming the split list and the video",
         "datamodules/ucf101.py", videos=True),
    Case("undecodable_video", undecodable_video,
         "error naming the video (bad_videos=skip: skipped; summary bad_videos_skipped)", "datamodules/ucf101.py",
         videos=True),
    Case("clip_shorter_than_clip_length", clip_shorter_than_clip_length,
         "looped from the start (short_videos=pad: last frame repeated); summary short_videos", "datamodules/ucf101.py",
         videos=True),
    Case("caption_only_unknown_words", caption_only_unknown_words,
         "caption not trained on; summary unknown_only_captions_not_trained", "datamodules/coco_captions.py"),
    Case("empty_after_filtering", empty_after_filtering,
         "error: no trainable caption (vocab_min_count) / fewer than 2 classes left", "coco_captions.py, base.py"),
    Case("worker_crash", worker_crash, "error naming the file and the worker, one line (not the worker traceback)",
         "transferrable/core/errors.py one_line"),
    Case("worker_crash_in_transform", worker_crash_in_transform,
         "any other exception while loading a sample: one line naming the sample and its file",
         "datamodules/base.py ImageDataset"),
    Case("nan_loss_classify", nan_loss_classify,
         "stops before the update; message names the last good checkpoint; no metrics.json",
         "lightning_modules/classify.py", slow=True),
    Case("inf_loss_bigan", inf_loss_bigan, "same as classify (all three optimisers stop)",
         "lightning_modules/bigan.py", slow=True),
    Case("missing_ckpt_path", missing_ckpt_path, "error naming ckpt_path before any work",
         "transferrable/core/checkpoints.py"),
    Case("ckpt_of_another_architecture", ckpt_of_another_architecture,
         "error naming ckpt_path and the differing backbone keys, before any work", "transferrable/core/checkpoints.py"),
    Case("ckpt_of_another_task", ckpt_of_another_task, "error naming both tasks, before any work",
         "transferrable/core/checkpoints.py"),
    Case("crafted_pickle_ckpt", crafted_pickle_ckpt, "weights-only load refuses it (code never runs); one line",
         "transferrable/core/checkpoints.py"),
    Case("incompatible_overrides", incompatible_overrides,
         "error listing the datasets that fit, before any pretraining", "transferrable/run/compat.py"),
    Case("segmentation_unexpected_palette_value", segmentation_unexpected_palette_value,
         "error naming the PNG and the values", "datamodules/voc_segmentation.py"),
    Case("segmentation_mask_of_wrong_size", segmentation_mask_of_wrong_size, "error naming mask and image sizes",
         "datamodules/voc_segmentation.py"),
    Case("proposal_cache_of_another_size", proposal_cache_of_another_size,
         "recomputed with a warning; stats size_mismatch", "models/rcnn/proposals.py"),
    Case("unknown_hydra_choice", unknown_hydra_choice, "Hydra's error listing the available options", "Hydra"),
    Case("truncated_idx_file", truncated_idx_file, "error naming the IDX file", "datamodules/idx.py"),
    Case("missing_data_dir", missing_data_dir, "error naming dataset.data_dir and the layout", "datamodules/voc.py"),
    Case("bad_config_value", bad_config_value,
         "one line `<key>=<value>: expected ...`, exit 2, before any work (e.g. dataset.batch_size=0, "
         "model.optimizer.lr=-1)", "transferrable/core/config_schema.py"),
    Case("input_size_too_small_for_taps", input_size_too_small_for_taps,
         "error naming backbone.input_size and the smallest size the backbone's taps need",
         "transferrable/core/config_schema.py"),
    Case("bad_tap_list", bad_tap_list, "error naming the list and the taps accepted", "transferrable/core/config_schema.py"),
    Case("unwritable_path", unwritable_path, "error naming the paths.* override and why, before any work",
         "transferrable/core/config_schema.py"),
    Case("class_folder_without_readable_image", class_folder_without_readable_image,
         "error naming the class folder and its skipped files (count, first paths, reason), before training",
         "datamodules/imagefolder.py"),
    Case("skipped_files_reported", skipped_files_reported,
         "skipped with a warning (count, first paths, reason); summary skipped_*", "datamodules/imagefolder.py"),
    Case("opencv_formats_accepted", opencv_formats_accepted, "pgm/ppm/tif/tiff/webp/bmp (any case) read as images",
         "datamodules/imagefolder.py"),
]


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else []) for c in CASES])
def test_bad_input(case: Case, request, tmp_path, fmnist_dir, make_cfg, monkeypatch, caplog):
    ctx = Ctx(tmp_path, fmnist_dir, make_cfg, monkeypatch, caplog)
    if case.videos:
        case.run(ctx, request.getfixturevalue("short_videos"))
    else:
        case.run(ctx)


def test_docs_list_every_case():
    doc = (ROOT / "docs" / "reliability.md").read_text()  # the README links it
    assert "### Bad-input matrix" in doc and "docs/reliability.md" in (ROOT / "README.md").read_text()
    section = doc.split("### Bad-input matrix", 1)[1]
    missing = [c.name for c in CASES if f"`{c.name}`" not in section]
    assert not missing, f"docs/reliability.md's Bad-input matrix lacks {missing}"
    assert len(CASES) >= 22
