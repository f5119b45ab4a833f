"""LRCN captioning (task=lrcn_caption): vocabulary, caption grammar, COCO captions round trip, decoders,
metrics against hand-computed values, retrieval ranks, bad input, and a tiny training run that beats its
baselines."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.caption_generator import NOUNS, caption_params, scene_captions, write_caption_dataset
from datamodules.coco_captions import COCOCaptionsDataModule
from datamodules.scene_generator import generate_scenes, scene_params
from models.lrcn_caption import LRCNCaptioner
from transferrable.core.vocabulary import BOS, EOS, PAD, UNK, Vocabulary, VocabularyMismatchError, tokenize
from transferrable.metrics.caption_eval import (
    JavaMissingWarning,
    MeteorSession,
    caption_metrics,
    retrieval_metrics,
)

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")
SMALL = {"n_train": 24, "n_val": 6, "n_test": 10, "image_size": (96, 72), "seed": 5, "max_objects": 3,
         "progress": False}
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java (PTB tokenizer / METEOR)")


@pytest.fixture(scope="session")
def items_dir(fmnist_dir) -> Path:
    return REAL_FMNIST if (REAL_FMNIST / "train-images-idx3-ubyte.gz").is_file() else fmnist_dir


@pytest.fixture(scope="session")
def caption_set(tmp_path_factory, items_dir) -> Path:
    """A tiny generated captioned-scene set in the COCO layout."""
    root = tmp_path_factory.mktemp("captions")
    voc = generate_scenes(root / "scenes", data_dir=items_dir, **SMALL)
    gen = {k: v for k, v in SMALL.items() if k != "progress"}
    params = caption_params(scene_params(**gen, data_dir=items_dir), seed=0, captions_per_image=5)
    return write_caption_dataset(root / "coco", voc, params, progress=False)


# -- vocabulary -----------------------------------------------------------------------------------
def test_vocabulary_min_count_max_length_specials_and_round_trip():
    caps = ["A red coat, on grass."] * 5 + ["a blue bag"] * 4 + ["a red coat " + "very " * 30]
    v = Vocabulary.build(caps, min_count=5, max_len=20)
    assert v.itos[:4] == [PAD, BOS, EOS, UNK]
    # word counts, not caption counts: "very" (30 times in one caption) is in, "blue"/"bag" (4 times) are not
    assert set(v.itos[4:]) == {"a", "red", "coat", "on", "grass", "very"}
    long = v.encode(caps[-1])
    assert len(long) == 20  # cut to max_len
    assert v.encode("a blue bag") == [v.stoi["a"], v.unk, v.unk]
    assert v.decode([v.bos, v.stoi["a"], v.stoi["red"], v.eos, v.stoi["coat"]]) == "a red"
    assert Vocabulary.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    assert tokenize("A T-shirt; isn't it?") == ["a", "t-shirt", "isn't", "it"]


def test_vocabulary_word_counts():
    v = Vocabulary.build(["x y"] * 5 + ["z"] * 4, min_count=5)
    assert v.itos[4:] == ["x", "y"]
    v = Vocabulary.build(["x y"] * 5 + ["z"] * 4, min_count=4)
    assert v.itos[4:] == ["x", "y", "z"]


# -- grammar + COCO layout --------------------------------------------------------------------------
def test_grammar_gives_five_different_true_captions_deterministically(caption_set):
    blob = json.loads((caption_set / "dataset_coco.json").read_text())
    assert {im["split"] for im in blob["images"]} == {"train", "val", "test"}
    voc = Path(str(caption_set).replace("/coco", "/scenes")) / "VOCScenes"
    synonyms = {c: [w for pair in NOUNS[c] for w in pair] for c in NOUNS}
    distinct = set()
    for im in blob["images"]:
        caps = [s["raw"] for s in im["sentences"]]
        assert len(caps) == 5 and len(set(caps)) == 5
        distinct.update(caps)
        sid = im["filename"].rsplit("_", 1)[1].split(".")[0]
        scene = json.loads((voc / "Attributes" / f"{sid}.json").read_text())
        # every caption names at least one object that is in the image (by one of its nouns)
        nouns = [n for o in scene["objects"] for n in synonyms[o["class"]]]
        for c in caps:
            assert any(n in c for n in nouns) or c.startswith(("two", "three", "four", "several")), (c, scene["objects"])
        # deterministic: the same (seed, split, index) gives the same captions, another seed others
        idx = [i for i, x in enumerate(b for b in blob["images"] if b["split"] == im["split"]) if x is im][0]
        assert scene_captions(scene, 0, im["split"], idx) == caps
    assert len(distinct) > 0.8 * 5 * len(blob["images"])
    other = scene_captions(scene, 1, im["split"], idx)
    assert other != caps


def test_coco_json_round_trip_karpathy_and_plain_layout(caption_set):
    dm = COCOCaptionsDataModule(karpathy_json=caption_set / "dataset_coco.json", vocab_min_count=1, input_size=16)
    dm.setup()
    assert dm.summary["images"] == {"train": 24, "val": 6, "test": 10}
    assert dm.summary["captions"]["train"] == 120
    coco = json.loads((caption_set / "annotations" / "captions_train2014.json").read_text())
    first = [a["caption"] for a in coco["annotations"] if a["image_id"] == coco["images"][0]["id"]]
    assert dm.splits["train"][0].captions == first
    x, tokens, idx = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 16, 16) and tokens[:, 0].eq(dm.vocab.bos).all()
    assert ((tokens == dm.vocab.eos).sum(1) == 1).all()
    # plain COCO layout: captions_{train,val}2014.json + folders, val2014 split into val (first 6) and test
    plain = COCOCaptionsDataModule(data_dir=caption_set, val_images=6, vocab_min_count=1, input_size=16)
    plain.setup()
    assert plain.summary["images"] == {"train": 24, "val": 6, "test": 10}
    assert [im.captions for im in plain.splits["test"]] == [im.captions for im in dm.splits["test"]]
    assert plain.vocab == dm.vocab


def test_bad_captions_are_counted_not_fatal(caption_set, tmp_path):
    blob = json.loads((caption_set / "dataset_coco.json").read_text())
    train = [im for im in blob["images"] if im["split"] == "train"]
    train[0]["sentences"] = []  # an image without captions
    train[1]["sentences"][0]["raw"] = "   "  # an empty caption
    train[2]["sentences"][0]["raw"] = "zyzzyva qwxq"  # only unknown words
    for im in blob["images"]:
        im["filepath"] = str(caption_set / im["filepath"])
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(blob))
    dm = COCOCaptionsDataModule(karpathy_json=path, vocab_min_count=2, input_size=16)
    dm.setup()
    assert dm.summary["dropped_images_without_captions"] == 1
    assert dm.summary["dropped_empty_captions"] == 1
    assert dm.summary["unknown_only_captions_not_trained"] >= 1
    assert dm.summary["images"]["train"] == 23
    with pytest.raises(Exception, match="missing.json does not exist"):
        COCOCaptionsDataModule(karpathy_json=tmp_path / "missing.json").setup()


# -- decoders ---------------------------------------------------------------------------------------
def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = LRCNCaptioner(vocab_size=12, feature_dim=8, hidden=16, embed=8, pad=0, bos=1, eos=2, **kw)
    return m.eval()


def _manual_greedy(m: LRCNCaptioner, feats: torch.Tensor, max_len: int) -> list[list[int]]:
    out = []
    for f in feats:
        img = m.encode_image(f[None])
        seq, state, last = [], None, torch.tensor([m.bos])
        for t in range(max_len + 1):
            logits, state = m.run(img, last[:, None], state, t0=t)
            logp = logits[0, 0].log_softmax(-1)
            logp[[m.pad, m.bos]] = -math.inf
            if t == max_len:
                w = m.eos
            else:
                w = int(logp.argmax())
            seq.append(w)
            if w == m.eos:
                break
            last = torch.tensor([w])
        out.append(seq)
    return out


@pytest.mark.parametrize("variant,unit,image_input", [("1u", "lstm", "every_step"), ("2u", "rnn", "every_step"),
                                                      ("2f", "lstm", "first_step")])
def test_beam_width_one_is_greedy_and_scores_are_consistent(variant, unit, image_input):
    m = _model(variant=variant, unit=unit, image_input=image_input)
    feats = torch.randn(5, 8)
    d = m.beam(feats, width=1, max_len=6)
    manual = _manual_greedy(m, feats, 6)
    for row, ref in zip(d.tokens.tolist(), manual, strict=True):
        assert row[: len(ref)] == ref and all(t == m.pad for t in row[len(ref):])
    # the decoder's log-probability is the model's log-likelihood of the sequence it returns
    toks = torch.cat([torch.full((5, 1), m.bos), d.tokens], 1)
    ll = m.sequence_logprob(feats, toks, normalise=False)
    torch.testing.assert_close(ll, d.logprob, atol=1e-4, rtol=1e-4)
    # a wider beam never finds a less likely caption
    assert (m.beam(feats, width=4, max_len=6).logprob >= d.logprob - 1e-5).all()


class _Crafted(LRCNCaptioner):
    """Word 3 is likelier first (0.6 vs 0.4 for word 4), but after it every continuation is <= 0.25;
    after word 4, <EOS> has 0.9. Greedy: 3 then a 0.25 word (<= 0.15); beam 2: 4 <EOS> (0.36)."""

    def _step(self, img, last, state, t):
        B = last.shape[0]
        p = torch.full((B, self.vocab_size), 1e-6)
        first = last == self.bos
        p[first, 3], p[first, 4] = 0.6, 0.4
        after3 = last == 3
        p[after3, 5:9] = 0.25
        after4 = last == 4
        p[after4, self.eos], p[after4, 5] = 0.9, 0.1
        other = ~(first | after3 | after4)
        p[other, self.eos] = 1.0
        return (p / p.sum(1, keepdim=True)).log(), [torch.zeros(1, B, 1)]


def test_beam_finds_a_more_likely_caption_than_greedy():
    m = _Crafted(vocab_size=12, feature_dim=4, hidden=4, embed=4).eval()
    feats = torch.zeros(2, 4)
    g, b = m.greedy(feats, max_len=5), m.beam(feats, width=2, max_len=5)
    assert g.tokens[0, 0] == 3 and b.tokens[0].tolist()[:2] == [4, m.eos]
    assert b.logprob[0] == pytest.approx(math.log(0.36), abs=1e-3)
    assert g.logprob[0] < b.logprob[0] - 0.5


def test_sampling_at_high_inverse_temperature_is_greedy_and_keeps_the_most_probable():
    m = _model(variant="2f")
    feats = torch.randn(4, 8)
    g = m.greedy(feats, max_len=6)
    s = m.sample(feats, n=3, inverse_temperature=1e4, max_len=6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s.tokens[:, : g.tokens.shape[1]], g.tokens)
    # N samples at T=1: the kept one is the most probable of the N (the same draws, one per row)
    best = m.sample(feats, n=20, inverse_temperature=1.0, max_len=6, generator=torch.Generator().manual_seed(1))
    each = m.sample(feats.repeat_interleave(20, 0), n=1, inverse_temperature=1.0, max_len=6,
                    generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(best.logprob, each.logprob.view(4, 20).max(1).values)
    assert each.logprob.view(4, 20).std(1).gt(0).all()  # the 20 draws differ


# -- metrics ----------------------------------------------------------------------------------------
def test_caption_metrics_hand_computed_without_java(monkeypatch):
    monkeypatch.setattr("transferrable.metrics.caption_eval.shutil.which", lambda name: None)
    refs = {0: ["a red coat on the grass"], 1: ["two blue bags"]}
    hyps = {0: "a red coat", 1: "two blue bags"}
    with pytest.warns(JavaMissingWarning):
        m = caption_metrics(refs, hyps)
    assert math.isnan(m["METEOR"]) and m["meteor_available"] == 0
    # corpus BLEU-1: 6/6 unigrams match; hypothesis length 6, closest reference lengths 6 + 3 = 9
    assert m["BLEU-1"] == pytest.approx(math.exp(1 - 9 / 6), rel=1e-6)
    # ROUGE-L (beta 1.2): image 0: LCS 3, P 1, R 0.5; image 1: exact match
    r0 = (1 + 1.2**2) * 1 * 0.5 / (0.5 + 1.2**2 * 1)
    assert m["ROUGE-L"] == pytest.approx((r0 + 1) / 2, rel=1e-6)
    assert m["CIDEr-D"] > 0
    # an empty generated caption scores 0 for its image; a hypothesis without references is left out
    with pytest.warns(JavaMissingWarning):
        e = caption_metrics({0: ["a dog"], 1: ["a cat"]}, {0: "", 1: "a cat", 2: "a bird"})
    assert e["ROUGE-L"] == pytest.approx(0.5) and e["images_without_references"] == 1


@needs_java
def test_caption_metrics_match_pycocoevalcap_with_java():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = {0: ["A red coat, on the grass.", "a coat"], 1: ["Two blue bags.", "some bags"], 2: ["a dress"]}
    hyps = {0: "a red coat", 1: "two blue bags", 2: "a red dress"}
    m = caption_metrics(refs, hyps, meteor=False)
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in hyps.items()})
    assert m["BLEU-4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    assert m["CIDEr-D"] == pytest.approx(Cider().compute_score(gts, res)[0])
    with pytest.warns(JavaMissingWarning):
        py = caption_metrics(refs, hyps, java=False)  # the Python tokenizer gives the same tokens here
    assert py["CIDEr-D"] == pytest.approx(m["CIDEr-D"]) and py["BLEU-4"] == pytest.approx(m["BLEU-4"])
    # METEOR (Java): an exact match scores near 1, a caption sharing no word 0
    with MeteorSession() as session:  # one Java process for both
        exact = caption_metrics({0: ["a red coat on the grass"]}, {0: "a red coat on the grass"}, meteor_scorer=session)
        none = caption_metrics({0: ["a red coat on the grass"]}, {0: "two dogs"}, meteor_scorer=session)
        session.close()
    assert exact["meteor_available"] == 1 and exact["METEOR"] > 0.9
    assert none["METEOR"] == pytest.approx(0.0, abs=1e-6)


# -- retrieval --------------------------------------------------------------------------------------
def test_retrieval_ranks_on_a_crafted_matrix():
    # 3 images, 4 captions (image of each caption: 0, 0, 1, 2)
    scores = np.array([
        [0.9, 0.1, 0.2],   # caption 0 -> image 0: rank 1
        [0.3, 0.5, 0.4],   # caption 1 -> image 0: rank 3
        [0.1, 0.2, 0.3],   # caption 2 -> image 1: rank 2
        [0.0, 0.1, 0.8],   # caption 3 -> image 2: rank 1
    ])
    r = retrieval_metrics(scores, [0, 0, 1, 2], ks=(1, 2))
    assert r["caption_to_image/R@1"] == pytest.approx(50.0)
    assert r["caption_to_image/R@2"] == pytest.approx(75.0)
    assert r["caption_to_image/median_rank"] == pytest.approx(1.5)
    # image 0: own best 0.9 -> rank 1; image 1: own 0.2, others 0.1/0.5/0.1 -> rank 2; image 2: own 0.8,
    # others 0.2/0.4/0.3 -> rank 1
    assert r["image_to_caption/R@1"] == pytest.approx(200 / 3)
    assert r["image_to_caption/median_rank"] == pytest.approx(1.0)
    # a tie with another image is not a hit
    assert retrieval_metrics(np.array([[1.0, 1.0]]), [0], ks=(1,))["caption_to_image/R@1"] == 0.0


# -- end to end ---------------------------------------------------------------------------------------
def _caption_cfg(make_cfg, items_dir, tmp_path, *extra, out="run"):
    return make_cfg(
        "task=lrcn_caption", "backbone.weights=null", f"dataset.source_dir={items_dir}",
        "dataset.n_train=40", "dataset.n_val=8", "dataset.n_test=16", "dataset.image_size=[96,72]",
        "dataset.max_objects=2", "dataset.progress=false", "dataset.vocab_min_count=2", "dataset.batch_size=32",
        "lrcn.hidden=96", "lrcn.embed=48", "lrcn.dropout=0.1", "lrcn.lr=0.01", "trainer.max_epochs=14",
        "++trainer.limit_train_batches=null", "++trainer.limit_val_batches=null", "lrcn.metrics.meteor=none",
        "lrcn.decoders=[greedy,beam3]", "lrcn.retrieval.images=16", "lrcn.show_images=4", *extra,
        out=out, cache_dir=tmp_path / "cache")


@pytest.mark.slow
def test_tiny_training_beats_baselines_and_checkpoint_round_trip(make_cfg, items_dir, tmp_path):
    from transferrable.run.runner import train

    metrics = train(_caption_cfg(make_cfg, items_dir, tmp_path))
    run = tmp_path / "run"
    assert (run / "captions.png").is_file() and (run / "tables.json").is_file()
    assert metrics["data/images/test"] == 16 and metrics["retrieval/captions"] == 80
    # the trained model's test captions beat the most frequent training caption and the untrained model
    assert metrics["test/CIDEr-D"] > 2 * metrics["test/baseline_frequent/CIDEr-D"] + 0.05
    assert metrics["test/BLEU-4"] > metrics["test/baseline_frequent/BLEU-4"]
    # untrained, and evaluated as if Java were missing: METEOR unavailable, the other metrics still there
    with pytest.warns(JavaMissingWarning):
        untrained = train(_caption_cfg(make_cfg, items_dir, tmp_path, "trainer.max_epochs=0", "lrcn.metrics.java=false",
                                       "lrcn.metrics.meteor=all", out="untrained"))
    assert math.isnan(untrained["test/METEOR"]) and untrained["test/meteor_available"] == 0
    assert math.isfinite(untrained["test/CIDEr-D"]) and math.isfinite(untrained["test/beam3/BLEU-4"])
    assert metrics["test/CIDEr-D"] > untrained["test/CIDEr-D"] + 0.05
    tables = json.loads((run / "tables.json").read_text())
    assert [t["title"].split(" (")[0] for t in tables[:2]] == ["Retrieval", "Generation"]
    # the checkpoint carries its vocabulary: train=false evaluates it and gives the same captions ...
    ckpt = metrics["test_checkpoint"]
    again = train(_caption_cfg(make_cfg, items_dir, tmp_path, "train=false", f"ckpt_path={ckpt}", out="eval"))
    assert again["test/CIDEr-D"] == pytest.approx(metrics["test/CIDEr-D"])
    # ... and resuming on data with another vocabulary is refused before any training
    with pytest.raises(VocabularyMismatchError, match="ckpt_path"):
        train(_caption_cfg(make_cfg, items_dir, tmp_path, f"ckpt_path={ckpt}", "dataset.vocab_min_count=1",
                           out="mismatch"))


def test_report_merges_per_run_tables(tmp_path):
    from transferrable.run.report import write_report

    for i, label in enumerate(["RNN 1u (frozen)", "LSTM 2f (frozen)"]):
        run = tmp_path / str(i)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- lrcn.unit={['rnn', 'lstm'][i]}\n")
        (run / "metrics.json").write_text(json.dumps({"test/CIDEr-D": 0.1 * (i + 1)}))
        (run / "tables.json").write_text(json.dumps([{"title": "Generation", "corner": "model", "columns": ["CIDEr-D"],
                                                      "rows": [{"label": label, "cells": [[10.0 * (i + 1)]]}],
                                                      "merge_runs": True}]))
    text = write_report(tmp_path)
    merged = text.split("**Generation**", 1)[1]
    assert "| RNN 1u (frozen) | 10.00 |" in merged and "| LSTM 2f (frozen) | 20.00 |" in merged
    assert text.count("**Generation**") == 1
