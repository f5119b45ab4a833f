"""engine/rcnn/crop_probe.py: the ground-truth crop probe behind rcnn.md#lite0_crops (why the Lite0 detector fails).

The crops are the split's non-difficult boxes with their XML classes, cut from the JPEG with 2 px of context;
the frozen curve fits on as many objects as asked (0 = all) and the fine-tuning yields one accuracy per epoch."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image
from test_voc_scenes import SMALL, items_dir  # noqa: F401  (the fixture)

from datamodules.scene_generator import generate_scenes
from engine.rcnn.crop_probe import finetune, frozen_curve, gt_crops, main
from models.efficientnet import EfficientNetLite


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, items_dir):  # noqa: F811
    return generate_scenes(tmp_path_factory.mktemp("probe_scenes"), data_dir=items_dir, **SMALL)


def objects(root, split):
    out = []
    for i in (root / f"ImageSets/Main/{split}.txt").read_text().split():
        for o in ET.parse(root / f"Annotations/{i}.xml").findall("object"):
            if o.find("difficult").text == "0":
                out.append((i, o.find("name").text, [int(o.find("bndbox").find(k).text)
                                                      for k in ("xmin", "ymin", "xmax", "ymax")]))
    return out


def test_crops_are_the_non_difficult_boxes_with_their_classes(scenes):
    x, y, classes = gt_crops(scenes, "train", 32)
    expected = objects(scenes, "train")
    assert x.shape == (len(expected), 3, 32, 32) and len(y) == len(expected)
    assert [classes[k] for k in y] == [name for _, name, _ in expected]
    i, _, b = expected[0]  # the first crop is that box with 2 px of context, normalised with mean = std = 0.5
    im = Image.open(scenes / f"JPEGImages/{i}.jpg").convert("RGB")
    ref = np.asarray(im.crop((b[0] - 3, b[1] - 3, b[2] + 2, b[3] + 2)).resize((32, 32), Image.BILINEAR), np.float32)
    torch.testing.assert_close(x[0], (torch.from_numpy(ref / 255).permute(2, 0, 1) - 0.5) / 0.5)


def test_frozen_curve_and_finetuning_give_accuracies_per_point(scenes):
    train, test = gt_crops(scenes, "train", 32)[:2], gt_crops(scenes, "test", 32)[:2]
    net = EfficientNetLite("efficientnet_lite0", input_size=32, weights="hub")
    curve = frozen_curve(net, train, test, [5, 0], draws=2)
    assert [n for n, _, _ in curve] == [5, len(train[1])]
    step = 100 / len(test[1])  # accuracies are whole test objects
    for _, mean, std in curve:
        assert 0 <= mean <= 100 and std >= 0
    assert curve[1][2] == 0  # all objects: every draw fits the same set
    assert abs(curve[1][1] / step - round(curve[1][1] / step)) < 1e-6
    torch.manual_seed(0)
    accs = list(finetune(net, train, test, epochs=2, lr=1e-3, n_classes=10))
    assert len(accs) == 2 and all(abs(a / step - round(a / step)) < 1e-6 for a in accs)


def test_cli_prints_one_line_per_point(scenes, capsys):
    main(["frozen", "--scenes", str(scenes), "--sizes", "32", "--train-objects", "4,0"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "frozen pool5" in ln]
    assert len(lines) == 2 and lines[0].startswith("size 32 px, 4 training objects")
