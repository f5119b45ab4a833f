"""DeCAF (task=decaf / task=decaf_domain): feature cache, linear classifiers with dropout and validated C,
the N-per-class protocol, few-shot outputs, domain adaptation, bad input. Tiny and in-process."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

import models.linear_classifiers as lc
import transferrable.run.runner as runner
from datamodules.base import DatasetError
from datamodules.image_pool import Pool, check_pool, per_class_draw, protocol_split
from engine.decaf.domain import setting_training_data
from engine.decaf.report import log_to_loggers
from models.backbones import CaffeNetMini
from models.linear_classifiers import (
    ClassifierSpec,
    FeatureDropout,
    LinearClassifier,
    daume_augment,
    fit_cross_validated,
    mean_class_accuracy,
    select_C,
    validation_subsplit,
)
from transferrable.core.errors import ConfigError, exit_on_user_error
from transferrable.core.feature_cache import FeatureCache, FeatureCacheWarning
from transferrable.run.report import write_report

MINI = ["backbone.widths=[8,16,16,16,16]", "backbone.fc_dim=32"]
TINY_DECAF = [
    "task=decaf", "dataset=fashion_mnist", *MINI, "backbone.weights=null",
    "decaf.splits=2", "decaf.max_images=120", "decaf.train_per_class=4", "decaf.C_grid=[0.1,10]",
    "decaf.dropout_copies=2", "decaf.bf16=false", "decaf.tsne.enabled=false",
]


def decaf_cfg(make_cfg, *overrides, out="run", cache_dir=None):
    return make_cfg(*TINY_DECAF, *overrides, out=out, cache_dir=cache_dir)


# -- feature cache ------------------------------------------------------------------------------
def _key(weights="sha256:aaaa"):
    return {"version": 1, "tap": "fc6", "weights": {"spec": weights}, "dataset": {"n": 5}}


def test_feature_cache_hit_miss_truncation_and_other_weights(tmp_path):
    cache = FeatureCache(tmp_path / "features")
    arr = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    calls = []

    def compute():
        calls.append(1)
        return arr

    got, hit = cache.get_or_compute("fc6", _key(), compute)
    assert not hit and len(calls) == 1 and np.array_equal(got, arr)
    npy, manifest = cache.paths("fc6", _key())
    meta = json.loads(manifest.read_text())
    assert meta["shape"] == [5, 7] and meta["dtype"] == "float32" and meta["n"] == 5 and meta["key"] == _key()
    assert not list(npy.parent.glob(".*.tmp"))  # atomic writes leave no temporaries
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a good entry loads silently
        got, hit = cache.get_or_compute("fc6", _key(), compute)
    assert hit and len(calls) == 1 and np.array_equal(got, arr)

    # a truncated .npy is detected, reported and rebuilt
    npy.write_bytes(npy.read_bytes()[:-13])
    with pytest.warns(FeatureCacheWarning, match="truncated"):
        got, hit = cache.get_or_compute("fc6", _key(), compute)
    assert not hit and len(calls) == 2 and np.array_equal(got, arr)
    assert np.array_equal(cache.load("fc6", _key()), arr)

    # same size, other bytes: the checksum catches it
    raw = bytearray(npy.read_bytes())
    raw[-1] ^= 0xFF
    npy.write_bytes(bytes(raw))
    with pytest.warns(FeatureCacheWarning, match="checksum"):
        assert cache.load("fc6", _key()) is None

    # other weights: another key -> another file, a plain miss ...
    cache.save("fc6", _key(), arr)
    other = _key("random:0")
    assert cache.paths("fc6", other) != cache.paths("fc6", _key())
    assert cache.load("fc6", other) is None
    # ... and an entry of other weights copied under this key's name is refused, never used
    onpy, omanifest = cache.paths("fc6", other)
    onpy.write_bytes(npy.read_bytes())
    omanifest.write_text(manifest.read_text())
    with pytest.warns(FeatureCacheWarning, match="another key.*weights"):
        assert cache.load("fc6", other) is None
    assert cache.rebuilt == 3


# -- classifiers --------------------------------------------------------------------------------
def test_dropout_zeroes_half_at_train_and_halves_at_test():
    drop = FeatureDropout(rate=0.5, copies=4)
    X = np.ones((100, 200), dtype=np.float32)
    y = np.arange(100) % 3
    Xd, yd = drop.train_view(X, y, np.random.default_rng(0))
    assert Xd.shape == (400, 200) and np.array_equal(yd, np.tile(y, 4))
    assert abs((Xd == 0).mean() - 0.5) < 0.02
    assert set(np.unique(Xd)) == {0.0, 1.0}  # kept features are not rescaled at train time
    assert not np.array_equal(Xd[:100], Xd[100:200])  # each copy has its own mask
    assert np.array_equal(drop.test_view(X * 3), X * 1.5)

    clf = LinearClassifier(ClassifierSpec.parse("svm_dropout"), C=1.0, dropout=drop).fit(
        np.random.default_rng(0).normal(size=(30, 5)), np.arange(30) % 3)
    Z = np.ones((2, 5), dtype=np.float32)
    assert np.allclose(clf.transform_test(Z), Z * clf.scale * 0.5)
    plain = LinearClassifier(ClassifierSpec.parse("svm"), C=1.0).fit(np.eye(6), np.arange(6) % 2)
    assert np.allclose(plain.transform_test(np.ones((2, 6))), plain.scale)  # no dropout: no test-time halving


def test_classifier_names():
    assert [ClassifierSpec.parse(n).label for n in ("logreg", "logreg_dropout", "svm", "svm_dropout")] == [
        "LogReg", "LogReg with Dropout", "SVM", "SVM with Dropout"]
    with pytest.raises(ValueError, match="unknown classifier 'knn'"):
        ClassifierSpec.parse("knn")


def test_cross_validation_scores_validation_data_only(monkeypatch):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 12)
    X = rng.normal(size=(36, 10)) + 1.5 * np.eye(10)[y]
    fit_idx, val_idx = validation_subsplit(y, 1 / 6, seed=7)
    assert np.bincount(y[val_idx]).tolist() == [2, 2, 2] and not set(fit_idx) & set(val_idx)

    scored = []
    real = lc.mean_class_accuracy
    monkeypatch.setattr(lc, "mean_class_accuracy", lambda t, p: scored.append(np.asarray(t).copy()) or real(t, p))
    grid = [0.001, 0.1, 10.0]
    clf, C, val = fit_cross_validated(ClassifierSpec("logreg"), X, y, grid, val_fraction=1 / 6, seed=7)
    assert len(scored) == len(grid) and all(np.array_equal(t, y[val_idx]) for t in scored)  # validation labels only
    best, scores = select_C(ClassifierSpec("logreg"), X[fit_idx], y[fit_idx], X[val_idx], y[val_idx], grid, seed=7)
    assert C == best and val == scores[C] and C in grid
    assert scores[C] == max(scores.values()) and all(c >= C for c, s in scores.items() if s == scores[C])  # ties: smallest C
    assert clf.estimator.coef_.shape == (3, 10)  # refit on all 36 samples
    # one sample per class cannot be validated: default_C
    _, C1, val1 = fit_cross_validated(ClassifierSpec("svm"), X[:3], np.arange(3), grid, default_C=0.5)
    assert C1 == 0.5 and np.isnan(val1)


def test_mean_class_accuracy_hand_computed():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 0, 2])
    # class 0: 3/4, class 1: 1/2, class 2: 1/1 -> 0.75 (plain accuracy would be 5/7)
    assert mean_class_accuracy(y_true, y_pred) == pytest.approx(0.75)


# -- the protocol -------------------------------------------------------------------------------
def _pool(counts, given_test=None):
    labels = np.repeat(np.arange(len(counts)), counts)
    part = np.zeros(len(labels), dtype=np.int8)
    if given_test is not None:
        part[given_test] = 1
    return Pool("toy", np.zeros((len(labels), 2, 2), np.uint8), labels, part, [f"c{i}" for i in range(len(counts))], {})


def test_splits_are_deterministic_disjoint_and_nested():
    pool = _pool([10, 7, 9])
    train, test = protocol_split(pool, 5, seed=3)
    again, _ = protocol_split(pool, 5, seed=3)
    other, _ = protocol_split(pool, 5, seed=4)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    assert not set(train) & set(test) and sorted([*train, *test]) == list(range(len(pool)))
    assert np.bincount(pool.labels[train]).tolist() == [5, 5, 5]
    small, _ = protocol_split(pool, 2, seed=3)
    assert set(small) <= set(train)  # the few-shot curve's training sets are nested
    # pool=given: train drawn from part 0, the given test split unchanged
    given = _pool([6, 6], given_test=[4, 5, 10, 11])
    tr, te = protocol_split(given, 3, seed=0)
    assert te.tolist() == [4, 5, 10, 11] and set(tr) <= {0, 1, 2, 3, 6, 7, 8, 9}
    assert per_class_draw(pool.labels, np.arange(len(pool)), None, 0).tolist() == list(range(len(pool)))


def test_decaf_run_metrics_tables_cache_and_fewshot(make_cfg, tmp_path):
    cache = tmp_path / "shared_cache"
    cfg = decaf_cfg(make_cfg, "decaf.features=[fc6,random:fc6,raw,hog]", "decaf.classifiers=[logreg,svm_dropout]",
                    "decaf.shots=[1,2,4]", out="curve", cache_dir=cache)
    m = runner.train(cfg)
    out = Path(cfg.paths.output_dir)

    assert m["decaf/split_seeds"] == [0, 1] and m["decaf/shots"] == [1, 2, 4] and m["decaf/pool_size"] == 120
    assert m["decaf/cache_misses"] == 4 and m["decaf/cache_hits"] == 0
    for f in ("fc6", "random:fc6", "raw", "hog"):
        for c in ("logreg", "svm_dropout"):
            for n in (1, 2, 4):
                assert 0.0 <= m[f"test/{f}/{c}/n{n}/mean_class_acc"] <= 1.0
            assert m[f"test/{f}/{c}/mean_class_acc"] == m[f"test/{f}/{c}/n4/mean_class_acc"]
    # the reported numbers are the mean/std of the per-split accuracies written beside them
    results = json.loads((out / "decaf_results.json").read_text())
    r = next(x for x in results["results"] if (x["feature"], x["classifier"], x["train_per_class"]) == ("hog", "logreg", 2))
    assert len(r["acc"]) == 2 and all(C in (0.1, 10.0) for C in r["C"])
    assert m["test/hog/logreg/n2/mean_class_acc"] == pytest.approx(np.mean(r["acc"]))
    assert m["test/hog/logreg/n2/mean_class_acc_std"] == pytest.approx(np.std(r["acc"]))
    main = m["decaf/main"]
    assert m["test/mean_class_acc"] == m[f"test/{main}/mean_class_acc"]
    # the headline is the best validation accuracy (as the thesis bolds it)
    vals = {k.split("/", 1)[1].rsplit("/", 1)[0]: v for k, v in m.items() if k.startswith("val/")}
    assert vals[main] == max(vals.values())

    png = out / "fewshot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "fewshot.md").read_text()
    assert "| method \\ N | 1 | 2 | 4 |" in table and "DeCAF6 (random weights), LogReg" in table and "HOG, SVM with Dropout" in table
    assert "| classifier | DeCAF6 | DeCAF6 (random weights) | raw pixels | HOG |" in (out / "decaf_tables.md").read_text()

    # report command: the run table plus the Figure 2.3-shaped tables
    report = write_report(out, ["test/mean_class_acc"])
    assert "| test/mean_class_acc |" in report.splitlines()[0] and "| classifier | DeCAF6 |" in report
    assert "| LogReg |" in report and "| SVM with Dropout |" in report

    # with backbone.weights=null, random:fc6 *is* fc6: one cache entry, the same features
    entries = sorted(p.name for p in (cache / "features").glob("*.npy"))
    assert len(entries) == 3 and sum(e.startswith("fc6-") for e in entries) == 1

    # a second job reuses every feature (other classifiers, other splits)
    cfg2 = decaf_cfg(make_cfg, "decaf.features=[fc6,raw,hog]", "decaf.classifiers=[svm]", "decaf.split_seed=5",
                     out="again", cache_dir=cache)
    m2 = runner.train(cfg2)
    assert m2["decaf/cache_hits"] == 3 and m2["decaf/cache_misses"] == 0 and m2["decaf/split_seeds"] == [5, 6]
    assert not (Path(cfg2.paths.output_dir) / "fewshot.png").exists()  # one N: no curve

    # other weights (a checkpoint file): fc6 is extracted again, raw/hog are reused
    torch.manual_seed(123)
    ckpt = tmp_path / "other.pt"
    torch.save({"arch": "caffenet_mini", "state_dict": CaffeNetMini(32, widths=[8, 16, 16, 16, 16], fc_dim=32).state_dict()}, ckpt)
    cfg3 = decaf_cfg(make_cfg, "decaf.features=[fc6,raw]", "decaf.classifiers=[svm]", f"backbone.weights={ckpt}",
                     out="ckpt", cache_dir=cache)
    m3 = runner.train(cfg3)
    assert m3["decaf/cache_hits"] == 1 and m3["decaf/cache_misses"] == 1
    fc6 = sorted((cache / "features").glob("fc6-*.json"))
    assert len(fc6) == 2
    specs = {json.loads(p.read_text())["key"]["weights"]["spec"] for p in fc6}
    assert specs == {"random:0", f"sha256:{__import__('hashlib').sha256(ckpt.read_bytes()).hexdigest()}"}


def test_loggers_get_metrics_and_wandb_gets_images(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG")
    tables = [{"title": "t", "corner": "c", "columns": ["a"], "rows": [{"label": "r", "cells": [[50.0, 1.0]]}]}]
    wb, csv = mock.Mock(spec=WandbLogger), mock.Mock(spec=CSVLogger)
    trainer = mock.Mock(loggers=[wb, csv])
    log_to_loggers(trainer, {"test/mean_class_acc": 0.5, "decaf/main": "fc6/svm", "decaf/split_seeds": [0]},
                   {"decaf/fewshot": png}, tables)
    for lg in (wb, csv):
        lg.log_metrics.assert_called_once_with({"test/mean_class_acc": 0.5})
    wb.log_image.assert_called_once_with(key="decaf/fewshot", images=[str(png)])
    wb.log_table.assert_called_once_with(key="decaf/table_0", columns=["c", "a"], data=[["r", "50.00 ± 1.00"]])
    assert [c[0] for c in csv.method_calls] == ["log_metrics", "save"]  # no images/tables without W&B


def test_tsne_png_and_silhouettes(make_cfg, tmp_path):
    cache = tmp_path / "cache"
    cfg = decaf_cfg(make_cfg, "decaf.features=[fc6]", "decaf.classifiers=[logreg]", "decaf.splits=1",
                    "decaf.tsne.enabled=true", "decaf.tsne.max_points=60", "decaf.tsne.max_iter=300",
                    out="tsne", cache_dir=cache)
    assert list(cfg.decaf.tsne.panels) == ["conv1", "fc6"]
    m = runner.train(cfg)
    png = Path(cfg.paths.output_dir) / "tsne.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for p in ("conv1", "fc6"):
        assert -1.0 <= m[f"tsne/silhouette_{p}"] <= 1.0
    # conv1 (not a classifier feature) is extracted for the plotted held-out images only, and cached
    conv1 = [json.loads(p.read_text()) for p in (cache / "features").glob("conv1-*.json")]
    assert len(conv1) == 1 and conv1[0]["n"] <= 60


def test_tsne_panel_the_backbone_lacks_is_one_line(make_cfg, capsys):
    cfg = decaf_cfg(make_cfg, "decaf.tsne.enabled=true", "decaf.tsne.panels=[conv9,fc6]")
    msg = _one_line_error(capsys, lambda: runner.train(cfg))
    assert "decaf.tsne.panels" in msg and "conv9" in msg


# -- domain adaptation --------------------------------------------------------------------------
def test_daume_augmentation_layout():
    X = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    assert daume_augment(X, "source").tolist() == [[1, 2, 1, 2, 0, 0], [3, 4, 3, 4, 0, 0]]
    assert daume_augment(X, "target").tolist() == [[1, 2, 0, 0, 1, 2], [3, 4, 0, 0, 3, 4]]
    with pytest.raises(ValueError):
        daume_augment(X, "other")


def test_domain_settings_training_data():
    rng = np.random.default_rng(0)
    Xs, ys = rng.normal(size=(20, 4)), np.repeat(np.arange(2), 10)
    Xt, yt = rng.normal(size=(6, 4)) + 5, np.repeat(np.arange(2), 3)
    sizes = {}
    for s in ("S", "T", "ST", "daume"):
        X_fit, y_fit, X_val, y_val, X_all, y_all, test_tf = setting_training_data(s, Xs, ys, Xt, yt, 1 / 6, 0)
        sizes[s] = (len(X_all), X_all.shape[1])
        assert len(X_fit) + len(X_val) == len(X_all)
        if s != "S":  # C is validated on labelled *target* images
            assert all(any(np.array_equal(v, t) for t in test_tf(Xt)) for v in X_val)
    assert sizes == {"S": (20, 4), "T": (6, 4), "ST": (26, 4), "daume": (26, 12)}
    X_all = setting_training_data("daume", Xs, ys, Xt, yt, 1 / 6, 0)[4]
    assert np.array_equal(X_all[:20, 8:], np.zeros((20, 4))) and np.array_equal(X_all[20:, 4:8], np.zeros((6, 4)))
    with pytest.raises(ConfigError, match="unknown setting 'X'"):
        setting_training_data("X", Xs, ys, Xt, yt, 1 / 6, 0)


def test_domain_run_mnist_to_digits(make_cfg):
    # the IDX fixture read as MNIST (classes '0'..'9') -> sklearn digits, both directions
    cfg = make_cfg("task=decaf_domain", "dataset=mnist", *MINI, "backbone.weights=null", "decaf.splits=2",
                   "decaf.max_images=100", "decaf.C_grid=[1.0]", "decaf.features=[raw,fc6]",
                   "decaf.classifiers=[logreg]", "decaf_domain.source_per_class=5", "decaf.bf16=false",
                   "decaf.tsne.max_points=60", "decaf.tsne.max_iter=300", out="da")
    m = runner.train(cfg)
    out = Path(cfg.paths.output_dir)
    # t-SNE of held-out source + target images (marker = domain)
    assert (out / "tsne.png").read_bytes()[:4] == b"\x89PNG" and -1 <= m["tsne/silhouette_fc6"] <= 1
    assert m["decaf/directions"] == ["mnist_to_digits", "digits_to_mnist"]
    assert m["test/mean_class_acc"] == m["test/mnist_to_digits/fc6/daume/logreg/mean_class_acc"]
    (table,) = json.loads((out / "tables.json").read_text())
    assert [r["label"] for r in table["rows"]] == ["LogReg (S)", "LogReg (T)", "LogReg (ST)", "Daumé III (LogReg)"]
    assert table["columns"] == ["mnist → digits raw pixels", "mnist → digits DeCAF6",
                                "digits → mnist raw pixels", "digits → mnist DeCAF6"]
    assert all(0.0 <= c[0] <= 100.0 for r in table["rows"] for c in r["cells"])


# -- bad input ----------------------------------------------------------------------------------
def _one_line_error(capsys, fn) -> str:
    with pytest.raises(SystemExit) as exc:
        exit_on_user_error(fn)()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_unknown_tap_is_one_line_listing_taps(make_cfg, capsys):
    cfg = decaf_cfg(make_cfg, "decaf.features=[fc8]")
    err = _one_line_error(capsys, lambda: runner.train(cfg))
    assert "no tap 'fc8'" in err and "'pool5', 'fc6', 'fc7'" in err and "random:<tap>" in err


def test_unknown_classifier_is_one_line(make_cfg, capsys):
    cfg = decaf_cfg(make_cfg, "decaf.classifiers=[knn]")
    assert "unknown classifier 'knn'" in _one_line_error(capsys, lambda: runner.train(cfg))


def test_n_larger_than_smallest_class(make_cfg, capsys):
    cfg = decaf_cfg(make_cfg, "decaf.train_per_class=12")  # max_images=120: 12 per class, none left to test
    err = _one_line_error(capsys, lambda: runner.train(cfg))
    assert "decaf.train_per_class=12" in err and "has only 12 images" in err and "class '" in err
    with pytest.raises(DatasetError, match="class 'c1' of dataset 'toy' has only 3 images"):
        check_pool(_pool([10, 3, 8]), 3)
    check_pool(_pool([10, 4, 8]), 3)


def test_one_class_dataset():
    with pytest.raises(DatasetError, match="single class \\('c0', 5 images\\)"):
        check_pool(_pool([5]), 1)


def test_cache_file_from_other_run_is_rebuilt_in_a_run(make_cfg, tmp_path):
    cache = tmp_path / "cache2"
    cfg = decaf_cfg(make_cfg, "decaf.features=[raw]", "decaf.classifiers=[svm]", "decaf.splits=1", out="a", cache_dir=cache)
    first = runner.train(cfg)
    (npy,) = (cache / "features").glob("raw-*.npy")
    npy.write_bytes(npy.read_bytes()[:100])  # truncated, e.g. by a crash outside the atomic writer
    cfg = decaf_cfg(make_cfg, "decaf.features=[raw]", "decaf.classifiers=[svm]", "decaf.splits=1", out="b", cache_dir=cache)
    with pytest.warns(FeatureCacheWarning, match="rebuilding"):
        again = runner.train(cfg)
    assert again["decaf/cache_misses"] == 1
    assert again["test/raw/svm/mean_class_acc"] == first["test/raw/svm/mean_class_acc"]
    assert np.load(npy).shape[0] == 120


def test_bad_main_combination_is_one_line(make_cfg, capsys):
    cfg = decaf_cfg(make_cfg, "decaf.main=fc6/knn")
    assert "decaf.main='fc6/knn'" in _one_line_error(capsys, lambda: runner.train(cfg))


def test_default_source_weights_resolve_without_source_overrides(tmp_path):
    """task=decaf defaults to backbone.weights=source:${source_dataset} with an empty source_overrides: the
    pretraining config must compose from it (an empty DictConfig used to break OmegaConf.to_container)."""
    from conftest import compose_train, point_paths_at

    import transferrable.run.source as source

    cfg = point_paths_at(compose_train(["task=decaf"]), tmp_path)
    assert cfg.backbone.weights == f"source:{cfg.source_dataset}" and not cfg.source_overrides
    pre = source._pretraining_config(cfg, "fashion_mnist", tmp_path / "pre")
    assert pre.model._target_.endswith("ClassifyModule") and pre.dataset._target_.endswith("FashionMNISTDataModule")
    pre = source._pretraining_config(cfg, cfg.source_dataset, tmp_path / "pre2")
    assert pre.model._target_.endswith("ClassifyModule") and pre.trainer.max_epochs >= 1


def test_direct_transform_is_bit_identical_and_only_for_fixed_pipelines():
    import torch

    from datamodules.base import build_transform, to_rgb
    from datamodules.image_pool import DirectTransform

    compose = build_transform(32, [0.3, 0.4, 0.5], [0.2, 0.25, 0.3], "none")
    direct = DirectTransform.of(compose)
    assert isinstance(direct, DirectTransform)
    rng = np.random.default_rng(0)
    for img in [to_rgb(rng.integers(0, 256, (28, 28), dtype=np.uint8)), rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)]:
        assert torch.equal(direct(image=img)["image"], compose(image=img)["image"])
    augmenting = build_transform(32, [0.5] * 3, [0.5] * 3, "flip_crop")
    assert DirectTransform.of(augmenting) is augmenting  # random steps keep the Compose
    assert DirectTransform.of(None) is None

