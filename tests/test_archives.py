"""``dataset.data_dir=<archive>``: checked, atomic, cached extraction (transferrable/core/archives.py)."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import compose_train, point_paths_at
from hydra.utils import instantiate
from test_voc_scenes import ann, make_voc

import transferrable.core.archives as archives
from datamodules.base import DatasetError
from datamodules.voc import VOCDetectionDataModule
from transferrable.core.archives import UnsafeArchiveError, extract_archive
from transferrable.core.errors import find_user_error


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "archive_cache"
    monkeypatch.setenv("TRANSFERRABLE_ARCHIVE_DIR", str(root))
    return root


@pytest.fixture(scope="module")
def voc_tree(tmp_path_factory) -> Path:
    """A tiny VOCdevkit/VOC2099 (three images, one box each) as the real archive lays it out."""
    base = tmp_path_factory.mktemp("voc_src")
    make_voc(base / "VOCdevkit" / "VOC2099", {
        "a": ann(("dog", (2, 2, 20, 20), 0)), "b": ann(("cat", (5, 5, 30, 25), 0)), "c": ann(("dog", (1, 1, 9, 9), 1)),
    })
    return base


def _tar_of(tree: Path, out: Path, mode: str = "w") -> Path:
    with tarfile.open(out, mode) as tf:
        tf.add(tree / "VOCdevkit", arcname="VOCdevkit")
    return out


def _zip_of(tree: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted((tree / "VOCdevkit").rglob("*")):
            zf.write(p, p.relative_to(tree).as_posix())
    return out


def _add(tf: tarfile.TarFile, name: str, data: bytes = b"x", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    for k, v in attrs.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data) if info.size else None)


# -- benign archives load through the real DataModule ------------------------------------------------------
@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_voc_archive_loads_through_the_real_datamodule_and_is_reused(voc_tree, tmp_path, cache, kind, monkeypatch):
    out = tmp_path / f"VOCtrainval.{kind}"
    archive = _zip_of(voc_tree, out) if kind == "zip" else _tar_of(voc_tree, out, "w:gz" if kind == "tar.gz" else "w")
    dm = VOCDetectionDataModule(data_dir=archive)
    assert dm.data_dir.name == "VOC2099" and dm.data_dir.parent.name == "VOCdevkit"  # the single-folder chain
    assert str(dm.data_dir).startswith(str(cache))
    dm.setup()
    assert dm.summary["images"] == 3 and dm.summary["objects"] == 3 and dm.summary["difficult"] == 1
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"][0].shape == (30, 40, 3)
    # the second use finds the extracted tree (complete: manifest) and extracts nothing
    monkeypatch.setattr(archives, "_extract_into", lambda *a: pytest.fail("extracted twice"))
    again = VOCDetectionDataModule(data_dir=archive)
    assert again.data_dir == dm.data_dir
    assert archives.manifest(dm.data_dir)["members"] > 3
    assert [p.name for p in cache.iterdir()] == [dm.data_dir.parent.parent.name]  # no temporary leftovers


def test_voc_archive_as_a_hydra_override(voc_tree, tmp_path, cache):
    archive = _tar_of(voc_tree, tmp_path / "VOC.tar")
    cfg = point_paths_at(compose_train(["dataset=voc", f"dataset.data_dir={archive}"]), tmp_path)
    dm = instantiate(cfg.dataset)
    dm.setup()
    assert dm.summary["splits"]["train"] == 3


def test_a_changed_archive_is_extracted_again(voc_tree, tmp_path, cache):
    archive = _tar_of(voc_tree, tmp_path / "VOC.tar")
    first = extract_archive(archive)
    os.utime(archive, ns=(1, 1))  # same bytes, another mtime: a new key, a new extraction
    second = extract_archive(archive)
    assert first != second and (second / "Annotations" / "a.xml").is_file()


# -- malicious archives are refused before anything is written ---------------------------------------------
MALICIOUS = {
    "dotdot": (lambda tf, outside: _add(tf, "VOC/../../evil_dotdot"), "../../evil_dotdot", "'..' component"),
    "absolute": (lambda tf, outside: _add(tf, f"{outside}/evil_absolute"), "evil_absolute", "absolute path"),
    "symlink_escape": (lambda tf, outside: _add(tf, "VOC/link", type=tarfile.SYMTYPE, linkname="../../.."),
                       "VOC/link", "symlink to '../../..' outside"),
    "symlink_absolute": (lambda tf, outside: _add(tf, "VOC/abslink", type=tarfile.SYMTYPE, linkname="/etc"),
                         "VOC/abslink", "symlink to '/etc' outside"),
    "hardlink_escape": (lambda tf, outside: _add(tf, "VOC/hard", type=tarfile.LNKTYPE, linkname="../secret"),
                        "VOC/hard", "hard link"),
    "device": (lambda tf, outside: _add(tf, "VOC/dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
               "VOC/dev", "device file"),
}


@pytest.mark.parametrize("case", list(MALICIOUS))
def test_malicious_tar_is_refused_with_one_line_and_nothing_written(tmp_path, cache, case):
    add, member, why = MALICIOUS[case]
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = tmp_path / f"{case}.tar"
    with tarfile.open(archive, "w") as tf:
        _add(tf, "VOC/JPEGImages/ok.jpg", b"fine")  # a good member first: even it must not be left behind
        add(tf, outside)
    with pytest.raises(UnsafeArchiveError) as err:
        VOCDetectionDataModule(data_dir=archive)
    msg = str(err.value)
    assert "\n" not in msg and str(archive) in msg and member in msg and why in msg, msg
    assert find_user_error(err.value) is err.value  # train.py prints it as one line
    assert list(outside.iterdir()) == [] and not list(tmp_path.rglob("evil_*"))
    assert not cache.exists() or list(cache.iterdir()) == []  # no partial extraction left looking complete


@pytest.mark.parametrize("name", ["../evil_zip", "/abs/evil_zip", "VOC/../../evil_zip"])
def test_malicious_zip_is_refused(tmp_path, cache, name):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("VOC/ok.txt", "fine")
        zf.writestr(zipfile.ZipInfo(name), "evil")
    with pytest.raises(UnsafeArchiveError, match=r"bad\.zip: refusing to extract member .*evil_zip"):
        extract_archive(archive)
    assert not list(tmp_path.rglob("evil_zip")) and (not cache.exists() or list(cache.iterdir()) == [])


def test_zip_symlink_is_refused(tmp_path, cache):
    archive = tmp_path / "link.zip"
    info = zipfile.ZipInfo("VOC/link")
    info.external_attr = (0o120777 << 16)  # a Unix symlink entry
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="'VOC/link': a symlink"):
        extract_archive(archive)


def test_a_corrupt_archive_is_one_line(tmp_path, cache):
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DatasetError, match=r"broken\.tar\.gz: not a readable tar or zip archive"):
        extract_archive(archive)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_image_folder_zip_through_the_dataset_config(tmp_path, cache):
    from test_datamodules import make_tree

    tree = make_tree(tmp_path / "src" / "101_ObjectCategories", {"ant": 4, "bee": 4})
    archive = tmp_path / "101_ObjectCategories.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(tree.rglob("*")):
            zf.write(p, p.relative_to(tree.parent).as_posix())
    cfg = point_paths_at(compose_train(["dataset=imagefolder", f"dataset.data_dir={archive}",
                                        "dataset.train_per_class=3", "backbone.input_size=16"]), tmp_path)
    dm = instantiate(cfg.dataset)
    assert dm.data_dir.name == "101_ObjectCategories" and str(dm.data_dir).startswith(str(cache))
    dm.setup()
    assert dm.class_names == ["ant", "bee"] and len(dm.splits["test"]) == 2  # 4 per class: 3 train, 1 test


def test_an_unsafe_archive_fails_before_any_pretraining(make_cfg, tmp_path, cache, monkeypatch):
    import transferrable.run.runner as runner
    import transferrable.run.source as source

    monkeypatch.setattr(source, "resolve_source_weights", lambda cfg: pytest.fail("pretraining started"))
    archive = tmp_path / "VOC.tar"
    with tarfile.open(archive, "w") as tf:
        _add(tf, "VOCdevkit/../../evil_early")
    cfg = make_cfg("dataset=imagefolder", f"dataset.data_dir={archive}", "backbone.weights=source:fashion_mnist")
    with pytest.raises(UnsafeArchiveError, match=r"VOC\.tar: refusing to extract member 'VOCdevkit/\.\./\.\./evil_early'"):
        runner.train(cfg)
    assert not list(tmp_path.rglob("evil_early")) and not (Path(cfg.paths.output_dir) / "metrics.json").exists()
