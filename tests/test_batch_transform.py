"""In-memory uint8 datasets are fetched a batch at a time (``ImageDataset.__getitems__``) and transformed as
tensors (``BatchTensorTransform``): the same images as the per-sample albumentations pipeline, and a function of
the seed and epoch."""

from __future__ import annotations

import numpy as np
import torch

from datamodules.base import BatchTensorTransform, EpochSeededSampler, ImageDataset, build_transform

MEAN, STD = (0.3, 0.3, 0.3), (0.35, 0.35, 0.35)


def _images(n=12, size=28, channels=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, size, size) if channels is None else (n, size, size, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _albumentations(images, size, augment="none"):
    ds = ImageDataset(images, np.zeros(len(images), np.int64), build_transform(size, MEAN, STD, augment))
    return torch.stack([ds[i][0] for i in range(len(images))])


def test_no_augmentation_equals_albumentations_at_native_size_and_within_a_grey_level_resized():
    for channels in (None, 3):
        imgs = _images(channels=channels)
        torch.testing.assert_close(BatchTensorTransform(28, MEAN, STD)(imgs), _albumentations(imgs, 28),
                                   atol=1e-5, rtol=0)
        resized = BatchTensorTransform(32, MEAN, STD)(imgs)
        ref = _albumentations(imgs, 32)
        assert resized.shape == ref.shape == (12, 3, 32, 32)
        # OpenCV's fixed-point bilinear vs torch's: at most one or two grey levels apart, 0.3 on average
        diff = (resized - ref).abs() * STD[0] * 255
        assert diff.max() <= 2.01 and diff.mean() < 0.35, (diff.max(), diff.mean())


def test_flip_crop_is_a_padded_crop_or_its_mirror_and_seeded():
    imgs = _images(n=64)
    tf = BatchTensorTransform(28, MEAN, STD, "flip_crop")
    out = tf(imgs, torch.Generator().manual_seed(1))
    plain = BatchTensorTransform(28, MEAN, STD)(imgs)
    pad = tf.pad
    zero = (0 - MEAN[0] * 255) / (STD[0] * 255)
    padded = torch.nn.functional.pad(plain, (pad,) * 4, value=zero)
    flipped = 0
    for b in range(len(imgs)):
        hits = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (0, 1)
                if torch.allclose(out[b], (lambda c: c.flip(-1) if f else c)(padded[b, :, dy:dy + 28, dx:dx + 28]))]
        assert hits, b
        flipped += hits[0][2]
    assert 16 < flipped < 48  # about half mirrored
    torch.testing.assert_close(out, tf(imgs, torch.Generator().manual_seed(1)))
    assert not torch.equal(out, tf(imgs, torch.Generator().manual_seed(2)))


def test_batches_are_a_function_of_seed_and_epoch():
    imgs, labels = _images(n=40), np.arange(40) % 10
    ds = ImageDataset(imgs, labels, build_transform(28, MEAN, STD, "flip_crop"),
                      BatchTensorTransform(28, MEAN, STD, "flip_crop"))

    def batches(epoch):
        sampler = EpochSeededSampler(40, seed=3)
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_size=16, sampler=sampler)
        return [(x.clone(), y.clone()) for x, y in loader]

    a, b, c = batches(0), batches(0), batches(1)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    assert not torch.equal(a[0][0], c[0][0])
    assert a[0][0].shape == (16, 3, 28, 28) and a[0][1].dtype == torch.int64
    # file-backed or non-uint8 images keep the per-sample path
    assert ImageDataset(imgs.astype(np.float32), labels, None, BatchTensorTransform(28, MEAN, STD)).batch_transform is None
