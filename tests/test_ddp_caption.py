"""task=lrcn_caption and task=lrcn_video_description on two DDP processes (``hardware=ddp_cpu``, gloo): the fit is
sharded, every rank validates the whole val split (so every rank picks the same best checkpoint), every rank decodes
the whole test split with it and rank 0 alone writes the files. The test metrics equal that checkpoint evaluated by
one process (``train=false ckpt_path=<it>``, the same config).

Tolerance: exact (1e-9). Decoding is deterministic (greedy / beam, seeded sampling) over the same feature rows in
the same batches on one process and on rank 0 of two, so the captions, their metrics and the retrieval ranks are the
same numbers; only the timings (captions/s, seconds) differ.
"""

from __future__ import annotations

import json
import math

import pytest
from kill_switch import run_train

COMMON = ["logger=csv", "trainer.precision=32-true", "seed=0", "callbacks.progress_bar.refresh_rate=0",
          "trainer.enable_model_summary=false", "~callbacks.lr_monitor"]
DDP = ["hardware=ddp_cpu", "trainer.devices=2"]

# tests/test_lrcn_caption.py's tiny run (_caption_cfg), fewer epochs: the comparison, not the quality, is tested
CAPTION = ["task=lrcn_caption", "backbone.weights=null", "dataset.n_train=40", "dataset.n_val=8", "dataset.n_test=16",
           "dataset.image_size=[96,72]", "dataset.max_objects=2", "dataset.progress=false", "dataset.vocab_min_count=2",
           "dataset.batch_size=32", "lrcn.hidden=96", "lrcn.embed=48", "lrcn.dropout=0.1", "lrcn.lr=0.01",
           "trainer.max_epochs=3", "lrcn.metrics.meteor=none", "lrcn.metrics.java=false",
           "lrcn.decoders=[greedy,beam3,sample:3:1.5]", "lrcn.retrieval.images=16", "lrcn.show_images=4", *COMMON]

# tests/test_lrcn_video_description.py's tiny run at a higher learning rate (half the steps: two ranks' batches)
VIDEO = ["task=lrcn_video_description", "dataset.n_train=150", "dataset.n_val=20", "dataset.n_test=40",
         "dataset.vocab_min_count=2", "video.hidden=64", "video.embed=32", "video.input=prob", "video.lr=0.01", "trainer.max_epochs=6",
         "video.java=false", *COMMON]

TIMINGS = ("captions_per_second", "seconds")


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(("test/", "retrieval/")) and isinstance(v, float)
            and not k.endswith(TIMINGS)}


def _two_then_one(base: list[str], tmp_path, *data: str) -> tuple[dict, dict]:
    """The 2-process run's metrics.json and its best checkpoint evaluated by one process."""
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    two_dir, one_dir = tmp_path / "ddp", tmp_path / "one"
    done = run_train([*base, *DDP], two_dir, *data, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory :") == 1  # one summary, not one per rank
    assert [p.name for p in (two_dir / "csv").iterdir()] == ["version_0"]  # one logger run
    two = json.loads((two_dir / "metrics.json").read_text())
    ckpt = two["test_checkpoint"]
    done = run_train(base, one_dir, *data, cache, "train=false", f"ckpt_path={ckpt}")
    assert done.returncode == 0, done.stderr[-3000:]
    return two, json.loads((one_dir / "metrics.json").read_text())


def _compare(two: dict, one: dict, at_least: int) -> None:
    keys = sorted(_numbers(one))
    assert len(keys) >= at_least, keys
    assert sorted(_numbers(two)) == keys
    print("2 processes vs 1:", {k: (two[k], one[k]) for k in keys[:8]})
    for k in keys:
        if math.isnan(one[k]):
            assert math.isnan(two[k]), k
        else:
            assert two[k] == pytest.approx(one[k], abs=1e-9), k


@pytest.mark.slow
def test_lrcn_caption_on_two_processes_decodes_the_whole_test_split(fmnist_dir, tmp_path):
    two, one = _two_then_one(CAPTION, tmp_path, f"dataset.source_dir={fmnist_dir}")
    assert two["data/images/test"] == 16 and two["retrieval/captions"] == 80  # every test image, not a shard
    _compare(two, one, at_least=30)
    run = tmp_path / "ddp"
    captions = json.loads((run / "captions.json").read_text())
    assert [len(c) for c in captions["decoders"].values()] == [16, 16, 16]
    assert (run / "tables.json").is_file() and (run / "captions.png").is_file()
    assert not list(tmp_path.glob("ddp/rank*")) and not list(tmp_path.glob("ddp/.pl_hydra*"))


@pytest.mark.slow
def test_lrcn_video_description_on_two_processes_decodes_the_whole_test_split(tmp_path):
    import torch

    from datamodules.video_tuples import VideoTuplesDataModule

    two, one = _two_then_one(VIDEO, tmp_path, f"dataset.root={tmp_path / 'tuples'}")
    _compare(two, one, at_least=6)
    run = tmp_path / "ddp"
    assert len(json.loads((run / "sentences.json").read_text())["generated"]) == 40  # every test video
    assert (run / "tables.json").is_file()
    # the logged val/loss of the last epoch is the whole val split's (every rank validated all of it): last.ckpt's
    # loss over the 20 val videos, batch by batch as one process computes it
    dm = VideoTuplesDataModule(root=tmp_path / "tuples", n_train=150, n_val=20, n_test=40, vocab_min_count=2)
    dm.setup()
    from datamodules.coco_captions import CaptionPairs, pad_captions
    from datamodules.video_tuples import SLOTS, tuple_features
    from lightning_modules.lrcn_video_description import VideoDescriptionModule

    blob = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    model = VideoDescriptionModule(None, 0, blob["hyper_parameters"]["cfg"], optimizer=None)
    model.build(dm.vocab, [len(c) for c in SLOTS.values()])
    model.load_state_dict(blob["state_dict"])
    model.eval()
    pairs = CaptionPairs(dm.pairs("val"), tuple_features(dm.splits["val"], "prob"), dm.vocab)
    total = n = 0
    with torch.no_grad():
        for x, tokens, _ in torch.utils.data.DataLoader(pairs, batch_size=dm.batch_size,
                                                        collate_fn=lambda b: pad_captions(b, dm.vocab)):
            total += float(model.decoder.loss(x, tokens)) * len(tokens)
            n += len(tokens)
    rows = [r for r in (run / "csv" / "version_0" / "metrics.csv").read_text().splitlines()]
    header = rows[0].split(",")
    logged = [float(v) for r in rows[1:] if (v := r.split(",")[header.index("val/loss")])]
    assert logged[-1] == pytest.approx(total / n, abs=1e-6)
