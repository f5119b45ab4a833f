"""Video description data, offline (``dataset=video_tuples``; thesis 4.5): a semantic tuple per video
(object, action, direction, place), a recogniser's per-slot class probabilities, and 5 reference
sentences per video from a grammar.

No activity recogniser has landed in this suite yet, so the "recogniser" is simulated and documented as
such: for each slot, scores = ``signal`` x one-hot(true class) + ``signal`` x ``confusion`` x one-hot(the
class's confusable partner) + N(0, 1) noise, probabilities = softmax(scores). Its maximum is wrong for a
sizeable share of videos (``summary['max_accuracy']``), while the true class usually keeps a high
probability: the situation in which the thesis's decoder fed probabilities (c) beats the decoders fed the
maximum (a, b). Sentences: synonyms for every word, four sentence shapes, deterministic in
the seed (video ``i`` of split ``s`` draws from ``SeedSequence([seed, s, i])``).

Written once as JSON (``<root>/<hash>/video_tuples.json`` + ``manifest.json``, an ``ArtifactCache`` directory entry
published whole) and reused.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch

from datamodules.base import DatasetError
from datamodules.caption_generator import BACKGROUNDS, NOUNS, SPLIT_CODES
from transferrable.core.artifact_cache import ArtifactCache, digest
from transferrable.core.atomic import atomic_write_json
from transferrable.core.vocabulary import Vocabulary

VERSION = 1
SLOTS: dict[str, list[str]] = {
    "object": list(NOUNS),
    "action": ["slide", "bounce", "spin", "fall", "rise", "shake"],
    "direction": ["left", "right", "up", "down"],
    "place": list(BACKGROUNDS),
}
VERBS = {"slide": [("slides", "sliding"), ("glides", "gliding")], "bounce": [("bounces", "bouncing"), ("hops", "hopping")],
         "spin": [("spins", "spinning"), ("turns", "turning")], "fall": [("falls", "falling"), ("drops", "dropping")],
         "rise": [("rises", "rising"), ("floats", "floating")], "shake": [("shakes", "shaking"), ("wobbles", "wobbling")]}
DIRECTIONS = {"left": ["to the left", "leftwards"], "right": ["to the right", "rightwards"],
              "up": ["upwards", "up"], "down": ["downwards", "down"]}


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def sentences(tuple_: dict, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` different sentences describing one (object, action, direction, place) tuple."""
    out: list[str] = []
    for _ in range(60 * n):
        if len(out) == n:
            break
        noun = _pick(rng, NOUNS[tuple_["object"]])[0]
        third, ing = _pick(rng, VERBS[tuple_["action"]])
        where = _pick(rng, DIRECTIONS[tuple_["direction"]])
        place = _pick(rng, BACKGROUNDS[tuple_["place"]])
        prep = _pick(rng, ["in front of", "over", "on"])
        shape = int(rng.integers(4))
        article = "an" if noun[0] in "aeiou" else "a"
        if shape == 0:
            text = f"{article} {noun} {third} {where} {prep} {place}"
        elif shape == 1:
            text = f"the {noun} is {ing} {where} {prep} {place}"
        elif shape == 2:
            text = f"{prep} {place} {article} {noun} {third} {where}"
        else:
            text = f"someone's {noun} {third} {where}" + (f" {prep} {place}" if rng.random() < 0.5 else "")
        if text not in out:
            out.append(text)
    return out


def _partners(k: int, rng: np.random.Generator) -> np.ndarray:
    """Each class's confusable partner (a fixed random pairing per slot)."""
    perm = rng.permutation(k)
    partner = np.arange(k)
    for a, b in zip(perm[0::2], perm[1::2], strict=False):
        partner[a], partner[b] = b, a
    return partner


def generate(params: dict) -> dict:
    rng0 = np.random.default_rng(np.random.SeedSequence([params["seed"], 99]))
    partners = {s: _partners(len(c), rng0) for s, c in SLOTS.items()}
    data = {}
    for split in ("train", "val", "test"):
        rows = []
        for i in range(params[f"n_{split}"]):
            rng = np.random.default_rng(np.random.SeedSequence([params["seed"], SPLIT_CODES[split], i]))
            truth = {s: _pick(rng, c) for s, c in SLOTS.items()}
            probs = {}
            for s, classes in SLOTS.items():
                k, t = len(classes), classes.index(truth[s])
                scores = rng.normal(0.0, 1.0, k)
                scores[t] += params["signal"]
                scores[partners[s][t]] += params["signal"] * params["confusion"]
                p = np.exp(scores - scores.max())
                probs[s] = (p / p.sum()).round(5).tolist()
            rows.append({"tuple": truth, "probs": probs, "sentences": sentences(truth, rng, params["references"])})
        data[split] = rows
    return data


def load_or_generate(root: Path, params: dict) -> dict:
    """The tuples for ``params`` from ``<root>/<hash>`` (``video_tuples.json`` + a ``manifest.json`` listing its
    size), an ``ArtifactCache`` directory entry: generated and published whole when absent; a damaged entry warns
    and is rebuilt."""
    def write(tmp: Path) -> dict:
        data = generate(params)
        atomic_write_json(tmp / "video_tuples.json", data)
        return {"videos": {s: len(v) for s, v in data.items()}}

    cache = ArtifactCache(root, version=VERSION, what="video tuples")
    return cache.get_or_build(params, write, kind="dir", name=digest(params, 16),
                              load=lambda path, _: json.loads((path / "video_tuples.json").read_text()))


def tuple_features(rows: list[dict], kind: str) -> torch.Tensor:
    """N x (sum of slot sizes): ``prob`` = the recogniser's probabilities, ``max`` = one-hot of their argmax."""
    blocks = []
    for s in SLOTS:
        p = torch.tensor([r["probs"][s] for r in rows], dtype=torch.float32)
        if kind == "max":
            p = torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).float()
        blocks.append(p)
    return torch.cat(blocks, 1)


class VideoTuplesDataModule(L.LightningDataModule):
    PROVIDES_DATA = ("tuples", "sentences")  # what tasks may ask for (transferrable/run/compat.py)

    name = "video_tuples"
    num_classes = 0

    def __init__(self, root: str | Path = ".cache/video_tuples", n_train: int = 1000, n_val: int = 100,
                 n_test: int = 300, seed: int = 0, signal: float = 2.5, confusion: float = 0.8,
                 references: int = 5, vocab_min_count: int = 5, max_caption_len: int = 20,
                 batch_size: int = 64, **_ignored):
        super().__init__()
        self.root = Path(root)
        self.params = {"version": VERSION, "n_train": int(n_train), "n_val": int(n_val), "n_test": int(n_test),
                       "seed": int(seed), "signal": float(signal), "confusion": float(confusion),
                       "references": int(references)}
        if min(n_train, n_test) < 1:
            raise DatasetError(f"dataset.n_train={n_train}, n_test={n_test}: each must be >= 1")
        self.vocab_min_count, self.max_caption_len, self.batch_size = vocab_min_count, max_caption_len, batch_size
        self.splits: dict[str, list[dict]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.splits = load_or_generate(self.root, self.params)
        self.vocab = Vocabulary.build((c for r in self.splits["train"] for c in r["sentences"]),
                                      self.vocab_min_count, self.max_caption_len)
        test = self.splits["test"]
        acc = {s: float(np.mean([SLOTS[s][int(np.argmax(r["probs"][s]))] == r["tuple"][s] for r in test]))
               for s in SLOTS}
        self.summary = {"videos": {s: len(v) for s, v in self.splits.items()}, "vocabulary": len(self.vocab),
                        "max_accuracy": acc}

    def references(self, split: str) -> dict[int, list[str]]:
        return {i: list(r["sentences"]) for i, r in enumerate(self.splits[split])}

    def pairs(self, split: str) -> list[tuple[int, list[int]]]:
        return [(i, ids) for i, r in enumerate(self.splits[split]) for c in r["sentences"]
                if (ids := self.vocab.encode(c)) and any(t != self.vocab.unk for t in ids)]
