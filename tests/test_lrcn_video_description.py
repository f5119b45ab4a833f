"""Video description (task=lrcn_video_description): the offline tuple data and a tiny training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.video_tuples import SLOTS, VideoTuplesDataModule, generate, tuple_features
from models.video_description import TupleEncoder

PARAMS = {"version": 1, "n_train": 60, "n_val": 10, "n_test": 40, "seed": 3, "signal": 2.5, "confusion": 0.8,
          "references": 5}


def test_tuples_are_deterministic_with_five_references_and_an_imperfect_recogniser():
    a, b = generate(PARAMS), generate(PARAMS)
    assert a == b and generate({**PARAMS, "seed": 4}) != a
    rows = a["train"] + a["test"]
    top1 = top2 = 0
    for r in rows:
        assert len(r["sentences"]) == 5 and len(set(r["sentences"])) == 5
        for s, classes in SLOTS.items():
            p = np.array(r["probs"][s])
            assert p.shape == (len(classes),) and p.sum() == pytest.approx(1.0, abs=1e-3)
            order = np.argsort(-p)
            t = classes.index(r["tuple"][s])
            top1 += order[0] == t
            top2 += t in order[:2]
    n = len(rows) * len(SLOTS)
    assert 0.3 < top1 / n < 0.9 and top2 / n > top1 / n + 0.1  # the max is often wrong, the probabilities know more
    onehot = tuple_features(a["test"], "max")
    assert onehot.shape == (40, sum(len(c) for c in SLOTS.values())) and onehot.sum(1).eq(len(SLOTS)).all()


def test_tuple_encoder_reads_the_max_of_each_slot():
    sizes = [len(c) for c in SLOTS.values()]
    enc = TupleEncoder(sizes, 4, 6)
    x = tuple_features(generate(PARAMS)["test"][:3], "max")
    same = enc(x)
    assert same.shape == (3, 6)
    shuffled = x.clone()
    shuffled[:, : sizes[0]] = shuffled[:, : sizes[0]].roll(1, dims=1)  # another object
    assert not torch.allclose(enc(shuffled), same)


@pytest.mark.slow
def test_tiny_video_description_beats_the_frequent_sentence(make_cfg, tmp_path):
    from transferrable.run.runner import train

    cfg = make_cfg("task=lrcn_video_description", "dataset.n_train=150", "dataset.n_val=20", "dataset.n_test=40",
                   "dataset.vocab_min_count=2", "video.hidden=64", "video.embed=32", "video.input=prob",
                   "trainer.max_epochs=5", "++trainer.limit_train_batches=null", "++trainer.limit_val_batches=null",
                   "video.java=false")
    with pytest.warns(UserWarning):
        m = train(cfg)
    assert m["test/BLEU-4"] > m["test/baseline_frequent/BLEU-4"] + 0.05
    assert (tmp_path / "run" / "tables.json").is_file()
    dm = VideoTuplesDataModule(root=tmp_path / "vt", n_train=20, n_val=0, n_test=5, vocab_min_count=1)
    dm.setup()
    assert dm.summary["videos"] == {"train": 20, "val": 0, "test": 5}
