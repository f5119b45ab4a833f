"""Dataset trees with structural faults, generated for every dataset kind (issue 29): ImageFolder, VOC, VOC
segmentation, COCO captions, UCF101 and IDX.

Each fault gives either one line at setup (before any training) naming the file and what was expected (a
``DatasetError``), or a counted skip with a warning where skipping is the documented policy (docs/reliability.md).
A fault a scan can find is found at setup: every test calls ``setup()`` only, never a sample.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import make_fashion_mnist_fixture, write_idx_gz
from test_bad_input_matrix import CAPTIONS, coco, coco_dm, ucf_dm
from test_datamodules import make_tree, write_image
from test_rcnn_segmentation import _write_voc as write_segmentation_voc
from test_ucf101_motion import ACTIONS
from test_voc_scenes import ann, make_voc

from datamodules.base import DatasetError
from datamodules.fashion_mnist import FashionMNISTDataModule
from datamodules.imagefolder import ImageFolderDataModule
from datamodules.motion_generator import generate_motions
from datamodules.voc import VOCDetectionDataModule
from datamodules.voc_segmentation import VOCSegmentationDataModule
from transferrable.core.errors import find_user_error, one_line


def fails_at_setup(dm, *names) -> str:
    """``dm.setup()`` raises one user-facing line that names every one of ``names``."""
    with pytest.raises(DatasetError) as err:
        dm.setup()
    assert find_user_error(err.value) is not None
    line = one_line(err.value)
    assert "\n" not in line, line
    for name in names:
        assert str(name) in line, (name, line)
    return line


# -- the faults, applied to a file of a good tree ----------------------------------------------------------------
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def folder_in_place(path: Path) -> None:
    path.unlink()
    path.mkdir()


def file_in_place(path: Path) -> None:
    shutil.rmtree(path)
    path.write_text("a file where a folder is expected")


BROKEN_FILE: dict[str, Callable[[Path], None]] = {"truncated": truncate, "zero_byte": zero_bytes,
                                                   "folder_in_place": folder_in_place}
EXPECTED = {"truncated": "truncated", "zero_byte": "empty file (0 bytes)", "folder_in_place": "is a folder, not a file",
            "missing": "does not exist", "file_in_place": "is a file, not a folder"}


# -- ImageFolder: a broken image is skipped and counted (the documented policy); a broken tree is one line --------
def folder_tree(root: Path) -> Path:
    make_tree(root / "train", {"a": 3, "b": 3})
    make_tree(root / "test", {"a": 1, "b": 1})
    return root


def folder_dm(root: Path) -> ImageFolderDataModule:
    return ImageFolderDataModule(data_dir=str(root), input_size=16, batch_size=2, eval_batch_size=8)


@pytest.mark.parametrize("fault", ["truncated", "zero_byte"])  # a folder named x.jpg is a (nested) folder here
@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp"])
def test_imagefolder_broken_image_is_skipped_at_the_scan(fault, ext, tmp_path, caplog):
    root = folder_tree(tmp_path / "f")
    bad = write_image(root / "train" / "a" / f"zz{ext}", size=(40, 30))  # the last file: after a readable one
    BROKEN_FILE[fault](bad)
    dm = folder_dm(root)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert dm.summary["skipped_unreadable"] == 1 and str(bad) in caplog.text, caplog.text
    assert EXPECTED[fault] in caplog.text
    assert str(bad) not in [p for s in dm.splits.values() for p in s.images]  # never reached by an epoch


@pytest.mark.parametrize("fault", ["missing", "file_in_place", "single_class", "empty_class"])
def test_imagefolder_tree_faults(fault, tmp_path):
    root = folder_tree(tmp_path / "f")
    if fault == "missing":
        fails_at_setup(folder_dm(root / "nope"), root / "nope", "does not exist")
    elif fault == "file_in_place":
        file_in_place(root)
        fails_at_setup(folder_dm(root), root, "is a file, not a folder")
    elif fault == "single_class":
        shutil.rmtree(root / "train" / "b")
        shutil.rmtree(root / "test" / "b")
        fails_at_setup(folder_dm(root), "fewer than 2 classes")
    else:
        for p in (root / "train" / "b").iterdir():
            zero_bytes(p)
        fails_at_setup(folder_dm(root), "train/b", "no readable image")


# -- VOC detection --------------------------------------------------------------------------------------------
def voc_tree(root: Path) -> Path:
    return make_voc(root, {"a": ann(("dog", (2, 2, 20, 20), 0)), "b": ann(("cat", (3, 3, 30, 25), 0))})


@pytest.mark.parametrize("fault", [*BROKEN_FILE, "missing"])
@pytest.mark.parametrize("what", ["image", "annotation", "split"])
def test_voc_broken_file_is_one_line_at_setup(fault, what, tmp_path):
    root = voc_tree(tmp_path / "VOC2099")
    path = {"image": root / "JPEGImages" / "b.jpg", "annotation": root / "Annotations" / "b.xml",
            "split": root / "ImageSets" / "Main" / "test.txt"}[what]
    if fault == "missing":
        path.unlink()
    else:
        BROKEN_FILE[fault](path)
    expected = EXPECTED[fault]
    if what == "annotation" and fault in ("truncated", "zero_byte"):
        expected = "malformed VOC annotation"
    if what == "image" and fault == "missing":
        expected = "listed in ImageSets/Main but missing"
    if what == "split" and fault == "zero_byte":
        expected = "lists no image ids"
    if what == "split" and fault == "truncated":  # half of "a\nb\n": a shorter list, which is a valid split file
        VOCDetectionDataModule(root).setup()
        return
    fails_at_setup(VOCDetectionDataModule(root), path.relative_to(tmp_path), expected)


@pytest.mark.parametrize("fault", ["file_in_place", "root_missing", "root_is_file"])
def test_voc_tree_faults(fault, tmp_path):
    root = voc_tree(tmp_path / "VOC2099")
    if fault == "file_in_place":
        file_in_place(root / "JPEGImages")
        fails_at_setup(VOCDetectionDataModule(root), root / "JPEGImages", "is a file, not a folder")
    elif fault == "root_missing":
        fails_at_setup(VOCDetectionDataModule(tmp_path / "gone"), tmp_path / "gone", "does not exist")
    else:
        file_in_place(root)
        fails_at_setup(VOCDetectionDataModule(root), root, "is a file, not a folder")


def test_voc_label_box_and_id_faults_are_counted(tmp_path, caplog):
    root = make_voc(tmp_path / "VOC2099", {
        "a": ann(("unicorn", (1, 1, 5, 5), 0), ("dog", (2, 2, 20, 20), 0)),  # a label outside the class list
        "b": ann(("cat", (30, 25, 3, 3), 0), ("dog", (2, 2, 20, 20), 0)),  # an inverted box
        "c": ann(("cat", (100, 100, 200, 200), 0), ("dog", (2, 2, 20, 20), 0)),  # a box outside the image
    })
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("a\nb\nc\nb\n")  # a duplicate id
    (root / "ImageSets" / "Main" / "test.txt").write_text("c\n")
    dm = VOCDetectionDataModule(root)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    s = dm.summary
    assert (s["unknown_class_objects"], s["zero_area_boxes"], s["duplicate_ids"], s["ids_in_train_and_test"]) == \
        (1, 2, 1, 1), s
    assert s["objects"] == 3 and "duplicate id" in caplog.text and "in both" in caplog.text


# -- VOC segmentation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", [*BROKEN_FILE, "missing"])
@pytest.mark.parametrize("what", ["image", "mask"])
def test_segmentation_broken_file_is_one_line_at_setup(fault, what, tmp_path):
    mask = np.zeros((8, 12), np.uint8)
    mask[2:5, 2:6] = 1
    root = write_segmentation_voc(tmp_path / "seg", [mask, mask])
    path = root / "JPEGImages" / "im1.jpg" if what == "image" else root / "SegmentationClass" / "im1.png"
    if fault == "missing":
        path.unlink()
    else:
        BROKEN_FILE[fault](path)
    expected = EXPECTED[fault]
    if what == "image" and fault == "missing":
        expected = "listed in ImageSets/Segmentation but missing"
    fails_at_setup(VOCSegmentationDataModule(root, classes=["a", "b"]), path.relative_to(tmp_path), expected)


# -- COCO captions ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", [*BROKEN_FILE, "missing"])
@pytest.mark.parametrize("what", ["image", "annotation"])
def test_coco_broken_file_is_one_line_at_setup(fault, what, tmp_path):
    root = coco(tmp_path / "coco", CAPTIONS)
    path = (root / "train2014" / "COCO_train2014_000000000002.jpg" if what == "image"
            else root / "annotations" / "captions_val2014.json")
    if fault == "missing":
        path.unlink()
    else:
        BROKEN_FILE[fault](path)
    expected = EXPECTED[fault]
    if what == "annotation" and fault in ("truncated", "zero_byte"):
        expected = "is not valid JSON"
    fails_at_setup(coco_dm(root), path.relative_to(tmp_path), expected)


def test_coco_duplicate_ids_and_orphan_captions(tmp_path, caplog):
    import json

    root = coco(tmp_path / "coco", CAPTIONS)
    path = root / "annotations" / "captions_train2014.json"
    blob = json.loads(path.read_text())
    blob["annotations"].append({"image_id": 99, "id": 999, "caption": "a caption of no image"})
    path.write_text(json.dumps(blob))
    dm = coco_dm(root)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert "1 caption(s) skipped" in caplog.text and str(path) in caplog.text
    blob["images"].append(dict(blob["images"][0]))
    path.write_text(json.dumps(blob))
    fails_at_setup(coco_dm(root), path, "appears twice", "expected unique ids")


def test_coco_root_faults(tmp_path):
    root = coco(tmp_path / "coco", CAPTIONS)
    fails_at_setup(coco_dm(tmp_path / "nope"), tmp_path / "nope", "does not exist")
    shutil.rmtree(root / "annotations")
    (root / "annotations").write_text("x")
    fails_at_setup(coco_dm(root), root / "annotations", "is a file, not a folder")


# -- UCF101 -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ucf_tree(tmp_path_factory) -> Path:
    items = make_fashion_mnist_fixture(tmp_path_factory.mktemp("items"), n_train=40, n_test=20)
    return generate_motions(tmp_path_factory.mktemp("ucf"), progress=False, classes=ACTIONS, clips_per_group=1,
                            num_frames=10, frame_size=24, seed=0, data_dir=items)


@pytest.mark.parametrize("fault", [*BROKEN_FILE, "missing"])
def test_ucf101_broken_video_is_one_line_at_setup(fault, ucf_tree, tmp_path):
    root = shutil.copytree(ucf_tree, tmp_path / "ucf")
    path = root / "UCF-101" / "MoveLeft" / "v_MoveLeft_g01_c01.avi"
    if fault == "missing":
        path.unlink()
    else:
        BROKEN_FILE[fault](path)
    fails_at_setup(ucf_dm(root, tmp_path / "cache"), "v_MoveLeft_g01_c01.avi")


@pytest.mark.parametrize("fault", ["split_missing", "split_is_folder", "class_folder_is_file"])
def test_ucf101_tree_faults(fault, ucf_tree, tmp_path):
    root = shutil.copytree(ucf_tree, tmp_path / "ucf")
    split = next(root.rglob("trainlist01.txt"))
    if fault == "split_missing":
        split.unlink()
        fails_at_setup(ucf_dm(root, tmp_path / "cache"), "trainlist01.txt")
    elif fault == "split_is_folder":
        folder_in_place(split)
        fails_at_setup(ucf_dm(root, tmp_path / "cache"), "trainlist01.txt", "is a folder, not a file")
    else:
        file_in_place(root / "UCF-101" / "MoveLeft")
        fails_at_setup(ucf_dm(root, tmp_path / "cache"), "MoveLeft")


# -- IDX --------------------------------------------------------------------------------------------------------
def idx_dm(root: Path) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(data_dir=str(root), input_size=28, batch_size=8)


@pytest.mark.parametrize("fault", [*BROKEN_FILE, "missing"])
def test_idx_broken_file_is_one_line_at_setup(fault, tmp_path):
    root = make_fashion_mnist_fixture(tmp_path / "idx", n_train=40, n_test=20)
    path = root / "t10k-labels-idx1-ubyte.gz"
    if fault == "missing":
        path.unlink()
        fails_at_setup(idx_dm(root), "t10k-labels-idx1-ubyte", "no t10k-labels-idx1-ubyte[.gz] there")
        return
    BROKEN_FILE[fault](path)
    fails_at_setup(idx_dm(root), path, {"truncated": "IDX file", "zero_byte": "IDX file",
                                        "folder_in_place": "is a folder, not a file"}[fault])


@pytest.mark.parametrize("fault", ["label_outside", "single_class", "empty", "root_is_file"])
def test_idx_content_faults(fault, tmp_path):
    root = make_fashion_mnist_fixture(tmp_path / "idx", n_train=40, n_test=20)
    labels = root / "train-labels-idx1-ubyte.gz"
    if fault == "label_outside":
        write_idx_gz(labels, (np.arange(40) % 10 + (np.arange(40) == 7) * 200).astype(np.uint8))
        fails_at_setup(idx_dm(root), labels, "label 207 is outside the class list (expected 0..9)")
    elif fault == "single_class":
        write_idx_gz(labels, np.zeros(40, np.uint8))
        fails_at_setup(idx_dm(root), "fewer than 2 classes")
    elif fault == "empty":
        write_idx_gz(root / "t10k-images-idx3-ubyte.gz", np.zeros((0, 28, 28), np.uint8))
        write_idx_gz(root / "t10k-labels-idx1-ubyte.gz", np.zeros(0, np.uint8))
        fails_at_setup(idx_dm(root), "t10k-labels-idx1-ubyte", "no samples")
    else:
        shutil.rmtree(root)
        root.write_text("x")
        fails_at_setup(idx_dm(root), root, "is a file, not a folder")
