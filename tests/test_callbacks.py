"""Visual callbacks: t-SNE of backbone taps (thesis Figure 2.1) and sample image grids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_train
from PIL import Image

import transferrable.run.runner as runner
from callbacks.image_grid import SampleGridCallback
from callbacks.tsne import TSNECallback
from transferrable.viz.image_grid import save_image_grid
from transferrable.viz.tsne import (
    GaussianProjector,
    embed_panels,
    plot_tsne,
    stratified_subsample,
    tsne_embedding,
)

MINI = ["backbone.widths=[16,32,32,32,32]", "backbone.fc_dim=64"]
FAST = {"max_iter": 500}  # 250 exaggerated + 250 plain iterations: enough for a few dozen points


def blobs(n: int = 120, k: int = 4, dim: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, features with one tight cluster per class, and pure noise of the same labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    clustered = 8.0 * rng.normal(size=(k, dim))[y] + rng.normal(size=(n, dim))
    noise = rng.normal(size=(n, 3 * dim))
    return y, clustered.astype(np.float32), noise.astype(np.float32)


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        return im.size


# -- t-SNE numerics -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "seen_dim"),
    [((30, 512), 512), ((30, 2, 16, 16), 512), ((30, 513), 512), ((30, 3, 16, 16), 512), ((30, 7), 7)],
)
def test_random_projection_exactly_when_wider_than_512(shape, seen_dim, monkeypatch):
    import sklearn.manifold

    seen = []

    class FakeTSNE:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def fit_transform(self, x):
            seen.append((x, self.kwargs))
            return np.zeros((len(x), 2))

    monkeypatch.setattr(sklearn.manifold, "TSNE", FakeTSNE)
    feats = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    tsne_embedding(feats, seed=3)
    (x, kwargs), = seen
    assert x.shape == (30, seen_dim)
    flat = feats.reshape(30, -1)
    if flat.shape[1] <= 512:
        np.testing.assert_array_equal(x, flat)  # untouched, only flattened
    else:
        assert not np.allclose(x[:, :512], flat[:, :512])  # projected, not truncated
    assert kwargs["init"] == "pca" and kwargs["random_state"] == 3 and kwargs["n_components"] == 2
    assert kwargs["perplexity"] < 30  # capped for 30 points


def test_embedding_is_deterministic_for_a_seed():
    y, clustered, _ = blobs(n=60)
    a = tsne_embedding(clustered, seed=1, **FAST)
    b = tsne_embedding(clustered, seed=1, **FAST)
    assert a.shape == (60, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    wide = np.repeat(clustered, 20, axis=1)  # 800 dims: the random projection is seeded too
    np.testing.assert_array_equal(tsne_embedding(wide, seed=2, **FAST), tsne_embedding(wide, seed=2, **FAST))


def test_silhouette_separates_clustered_from_noise():
    y, clustered, noise = blobs(n=120)
    res = embed_panels({"conv1": noise, "fc6": clustered}, y, seed=0, **FAST)
    low, high = res.silhouettes["conv1"], res.silhouettes["fc6"]
    assert high > 0.6 and low < 0.15 and high - low > 0.5, res.silhouettes
    assert list(res.embeddings) == ["conv1", "fc6"] and res.embeddings["fc6"].shape == (120, 2)


def test_stratified_subsample_keeps_class_shares():
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    idx = stratified_subsample(labels, 100, seed=0)
    assert len(idx) == 100 and len(np.unique(idx)) == 100 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [60, 30, 10]
    assert np.array_equal(idx, stratified_subsample(labels, 100, seed=0))
    rare = np.array([0] * 98 + [1, 2])  # a rare class still gets a point
    assert set(rare[stratified_subsample(rare, 10, seed=0)]) == {0, 1, 2}
    assert len(stratified_subsample(labels, 5000, seed=0)) == 1000


def test_gaussian_projector_chunked_equals_cached_and_keeps_distances():
    x = torch.randn(20, 3000)
    cached = GaussianProjector(3000, 512, seed=0, chunk=1024)
    chunked = GaussianProjector(3000, 512, seed=0, chunk=1024, cache_bytes=0)
    a, b = cached(x), chunked(x)
    assert a.shape == (20, 512)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached(x), a)  # same matrix on every call
    ratio = torch.pdist(a) / torch.pdist(x)  # Johnson-Lindenstrauss: distances survive roughly
    assert 0.8 < ratio.min() and ratio.max() < 1.2


# -- the figure ---------------------------------------------------------------------------------
def test_plot_tsne_writes_one_panel_per_feature_set(tmp_path):
    y, clustered, noise = blobs(n=60, k=3)
    one = plot_tsne({"fc6": clustered}, y, class_names=["a", "b", "c"], path=tmp_path / "one.png", **FAST)
    two = plot_tsne({"conv1": noise, "fc6": clustered}, y, ["a", "b", "c"], path=tmp_path / "two.png",
                    title="low vs high level", **FAST)
    domains = np.where(np.arange(60) < 30, "amazon", "webcam")
    three = plot_tsne({"a": noise, "b": clustered, "c": clustered[:, ::-1]}, y, domains=domains,
                      path=tmp_path / "sub" / "three.png", max_points=30, **FAST)
    assert one == tmp_path / "one.png" and three.parent.name == "sub"
    (w1, h1), (w2, h2), (w3, h3) = png_size(one), png_size(two), png_size(three)
    assert min(w1, h1) > 100 and w1 < w2 < w3 and h1 == h2 == h3
    assert 350 < w2 - w1 < 550  # one more 4.5-inch panel at 100 dpi
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["one.png", "sub", "three.png", "two.png"]  # no temp files


# -- the callbacks through a real run -----------------------------------------------------------
def test_tsne_callback_in_a_training_run(make_cfg, monkeypatch):
    trainers = []
    real = runner.build_trainer
    monkeypatch.setattr(runner, "build_trainer", lambda *a, **k: trainers.append(real(*a, **k)) or trainers[-1])
    cfg = make_cfg("callbacks=tsne", *MINI, "callbacks.tsne.max_points=100", "callbacks.tsne.max_iter=500")
    assert cfg.callbacks.tsne.taps == ["conv1", "fc6"] and "sample_grid" not in cfg.callbacks
    metrics = runner.train(cfg)
    out = Path(cfg.paths.output_dir)
    png = out / "tsne_conv1_fc6.png"
    (cb,) = [c for c in trainers[0].callbacks if isinstance(c, TSNECallback)]
    assert cb.last_path == png and cb.seed == 0  # ${seed} of the run
    w, h = png_size(png)
    assert w > h > 100  # two panels side by side
    info = json.loads(png.with_suffix(".json").read_text())
    assert info["points"] == 100 and info["split"] == "test" and set(info["silhouette"]) == {"conv1", "fc6"}
    assert all(-1.0 <= v <= 1.0 for v in info["silhouette"].values())
    # the silhouettes reach the run's metrics.json too
    assert metrics["tsne/silhouette_fc6"] == pytest.approx(info["silhouette"]["fc6"])
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["tsne/silhouette_conv1"] == pytest.approx(info["silhouette"]["conv1"])


def test_visual_callbacks_config_and_sample_grid_in_a_run(make_cfg):
    cfg = make_cfg("callbacks=visual", *MINI, "~callbacks.tsne", "callbacks.sample_grid.num_samples=6",
                   "callbacks.sample_grid.nrow=3")
    assert {"model_checkpoint", "sample_grid"} <= set(cfg.callbacks)
    assert compose_train(["callbacks=visual"]).callbacks.tsne._target_ == "callbacks.tsne.TSNECallback"
    runner.train(cfg)
    png = Path(cfg.paths.output_dir) / "samples_epoch0.png"
    w, h = png_size(png)
    size = cfg.backbone.input_size
    cell = size * -(-96 // size)  # inputs upscaled by a whole factor to >= 96 px cells (28 px: x4 = 112)
    assert w == 3 * (cell + 2) + 2  # 3 per row
    assert h > 2 * (cell + 2) + 2  # two rows plus their title bands


def test_sample_grid_titles_pred_true():
    cb = SampleGridCallback(num_samples=4, nrow=2)

    class DM:
        class_names = ["cat", "dog"]
        mean, std = (0.5,) * 3, (0.25,) * 3

    class Trainer:
        sanity_checking, is_global_zero, current_epoch, datamodule, loggers = False, True, 0, DM(), []
        default_root_dir = None

    class Module(torch.nn.Module):
        def forward(self, x):
            return torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1)  # bright -> cat

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        Trainer.default_root_dir = d
        x = torch.cat([torch.ones(2, 3, 8, 8), -torch.ones(2, 3, 8, 8)])
        cb.on_validation_epoch_start(Trainer, Module())
        cb.on_validation_batch_end(Trainer, Module(), None, (x[:3], torch.tensor([0, 1, 1])), 0)
        cb.on_validation_batch_end(Trainer, Module(), None, (x[3:], torch.tensor([1])), 1)
        assert [t.tolist() for t in cb._pred] == [[0, 0, 1], [1]]
        cb.on_validation_epoch_end(Trainer, Module())
        assert cb.last_path == Path(d) / "samples_epoch0.png" and png_size(cb.last_path)[0] == 2 * (96 + 2) + 2


# -- image grids --------------------------------------------------------------------------------
def test_image_grid_pixel_size(tmp_path):
    imgs = torch.rand(10, 3, 20, 24)
    p = save_image_grid(imgs, tmp_path / "g.png", nrow=4)
    assert png_size(p) == (4 * (24 + 2) + 2, 3 * (20 + 2) + 2)
    p = save_image_grid(imgs, tmp_path / "g.png", nrow=5, padding=0, upscale=2)
    assert png_size(p) == (5 * 48, 2 * 40)
    u8 = (np.random.default_rng(0).random((3, 20, 24, 3)) * 255).astype(np.uint8)  # N, H, W, C
    assert png_size(save_image_grid(u8, tmp_path / "u8.png", nrow=8)) == (3 * 26 + 2, 22 + 2)
    gray = np.zeros((4, 20, 24), np.uint8)
    assert png_size(save_image_grid(gray, tmp_path / "gray.png", nrow=2)) == (2 * 26 + 2, 2 * 22 + 2)
    titled = save_image_grid(imgs, tmp_path / "t.png", nrow=4, titles=[f"{i}/x" for i in range(10)])
    w, h = png_size(titled)
    assert w == 4 * 26 + 2 and h > 3 * 22 + 2
    with pytest.raises(ValueError, match="titles"):
        save_image_grid(imgs, tmp_path / "bad.png", titles=["a"])
    assert sorted(f.name for f in tmp_path.iterdir()) == ["g.png", "gray.png", "t.png", "u8.png"]


def test_image_grid_denormalize(tmp_path):
    x = torch.zeros(2, 3, 4, 4)  # normalised zeros = the mean
    p = save_image_grid(x, tmp_path / "d.png", nrow=2, padding=0, denormalize=((0.5, 0.25, 1.0), (0.2, 0.2, 0.2)))
    arr = np.asarray(Image.open(p))
    assert arr.shape == (4, 8, 3)
    assert arr[0, 0].tolist() == [128, 64, 255]
