"""Generated captioned scenes, offline (``dataset=scene_captions``): the detection scenes of
``scene_generator`` with 5 different captions each, written as a COCO captions data set.

Captions come from a small grammar over each scene's ``Attributes/<id>.json`` (class, colour, pattern,
size, position words, depth order, background photo): synonyms for every noun, colour and place, several
sentence shapes (subject first, "there is", counts, two objects with their relative position, background
first), and optional details (colour, pattern, size, position, background), so the 5 captions of an image
differ the way human ones do while staying true to the image. Caption ``k`` of scene ``i`` draws from
``SeedSequence([seed, split, i])``: the same seed gives the same captions.

Layout (what ``datamodules/coco_captions.py`` reads, as it reads real COCO)::

    <out>/train2014/<file>.jpg                train scenes
    <out>/val2014/<file>.jpg                  val and test scenes
    <out>/annotations/captions_train2014.json, captions_val2014.json   COCO: images, annotations, info
    <out>/dataset_coco.json                   Karpathy split file (train / val / test, with sentences)
    <out>/manifest.json                       parameters, counts (written last)

``<out>`` is an ``ArtifactCache`` directory entry: written under a temporary name and renamed into place, so it only
ever holds a complete set; a complete set with the same parameters is reused, a damaged one warns and is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transferrable.core.artifact_cache import ArtifactCache, digest
from transferrable.core.atomic import atomic_write_json
from transferrable.core.progress import progress as progress_bar

log = logging.getLogger(__name__)

CAPTION_GENERATOR_VERSION = 1
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

# (singular, plural) per Fashion-MNIST class
NOUNS: dict[str, list[tuple[str, str]]] = {
    "t-shirt": [("t-shirt", "t-shirts"), ("tee", "tees"), ("top", "tops")],
    "trouser": [("pair of trousers", "pairs of trousers"), ("pair of pants", "pairs of pants")],
    "pullover": [("pullover", "pullovers"), ("sweater", "sweaters"), ("jumper", "jumpers")],
    "dress": [("dress", "dresses"), ("gown", "gowns")],
    "coat": [("coat", "coats"), ("jacket", "jackets")],
    "sandal": [("sandal", "sandals"), ("flip flop", "flip flops")],
    "shirt": [("shirt", "shirts"), ("blouse", "blouses")],
    "sneaker": [("sneaker", "sneakers"), ("running shoe", "running shoes"), ("trainer", "trainers")],
    "bag": [("bag", "bags"), ("handbag", "handbags"), ("purse", "purses")],
    "ankle-boot": [("ankle boot", "ankle boots"), ("boot", "boots")],
}
COLOUR_WORDS = {"gray": ["gray", "grey"], "purple": ["purple", "violet"], "cyan": ["cyan", "light blue"]}
PATTERN_WORDS = {"stripes": ["striped", "stripy"], "checks": ["checked", "checkered"], "dots": ["dotted", "spotted"]}
BACKGROUNDS: dict[str, list[str]] = {
    "astronaut": ["a photo of an astronaut", "a woman in a space suit"],
    "coffee": ["a cup of coffee", "a coffee cup"],
    "chelsea": ["a cat", "a tabby cat"],
    "rocket": ["a rocket", "a launch pad"],
    "brick": ["a brick wall", "bricks"],
    "grass": ["grass", "a lawn"],
    "gravel": ["gravel", "small stones"],
    "camera": ["a man with a camera", "a black and white photo"],
    "coins": ["coins", "a pile of coins"],
    "hubble_deep_field": ["a starry sky", "outer space"],
    "immunohistochemistry": ["cells under a microscope", "a microscope image"],
    "stereo_motorcycle": ["a motorcycle", "a motorbike"],
    "china": ["a temple", "an old building"],
    "flower": ["flowers", "a flower"],
}
PLACE_PREPS = ["on", "in front of", "against", "over"]
POSITION_PHRASES = {
    "left": ["on the left", "at the left"], "right": ["on the right", "at the right"],
    "top": ["at the top", "near the top"], "bottom": ["at the bottom", "near the bottom"],
    "center": ["in the middle", "in the center"],
}
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
SHAPES = ("subject", "there_is", "counts", "pair", "background_first", "list")


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


class _Describer:
    """One caption's word choices (each caption of a scene draws its own)."""

    def __init__(self, rng: np.random.Generator, scene: dict):
        self.rng, self.scene = rng, scene
        self.objects = sorted(scene.get("objects", []), key=lambda o: -_area(o))  # largest first

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def noun(self, cls: str, plural: bool = False) -> str:
        return _pick(self.rng, NOUNS.get(cls, [(cls, cls + "s")]))[1 if plural else 0]

    def colour(self, name: str) -> str:
        return _pick(self.rng, COLOUR_WORDS.get(name, [name]))

    def object_phrase(self, o: dict, detail: float = 0.6, article: bool = True) -> str:
        words = []
        if o.get("size") in ("small", "large") and self.chance(0.25):
            words.append("big" if o["size"] == "large" and self.chance(0.5) else o["size"])
        if o.get("pattern", "plain") != "plain" and self.chance(detail):
            words.append(_pick(self.rng, PATTERN_WORDS.get(o["pattern"], [o["pattern"]])))
        if self.chance(detail + 0.2):
            words.append(self.colour(o["colour"]))
        words.append(self.noun(o["class"]))
        phrase = " ".join(words)
        if o.get("pattern", "plain") != "plain" and o.get("colour2") and self.chance(detail * 0.4):
            phrase += f" with {self.colour(o['colour2'])} {o['pattern']}"
        return _article(phrase) if article else phrase

    def position(self, o: dict) -> str:
        words = o.get("position_words") or ["center"]
        return _pick(self.rng, POSITION_PHRASES[_pick(self.rng, words)])

    def place(self) -> str:
        bg = _pick(self.rng, BACKGROUNDS.get(self.scene.get("background", ""), ["a background"]))
        return f"{_pick(self.rng, PLACE_PREPS)} {bg}"

    def relation(self, a: dict, b: dict) -> str:
        (ax, ay), (bx, by) = a["center"], b["center"]
        if abs(ax - bx) >= abs(ay - by):
            return _pick(self.rng, ["to the left of", "left of"]) if ax < bx else \
                _pick(self.rng, ["to the right of", "right of"])
        if b["index"] in a.get("occluded_by", []) or a["index"] in b.get("occluded_by", []):
            return _pick(self.rng, ["behind", "partly hidden by"]) if a["depth"] < b["depth"] else "in front of"
        return _pick(self.rng, ["above", "over"]) if ay < by else _pick(self.rng, ["below", "under"])

    def tail(self, o: dict, p_pos: float = 0.4, p_place: float = 0.5) -> str:
        parts = []
        if self.chance(p_pos):
            parts.append(self.position(o))
        if self.chance(p_place):
            parts.append(self.place())
        return (" " + " ".join(parts)) if parts else ""

    def caption(self, shape: str) -> str:
        objs = self.objects
        if not objs:
            return f"an empty scene {self.place()}"
        main = objs[0] if len(objs) == 1 or self.chance(0.7) else _pick(self.rng, objs)
        if shape == "subject":
            return self.object_phrase(main) + self.tail(main)
        if shape == "there_is":
            return "there is " + self.object_phrase(main) + self.tail(main, 0.6, 0.4)
        if shape == "counts":
            counts = Counter(o["class"] for o in objs)
            cls, n = counts.most_common(1)[0]
            if n == 1:
                return self.object_phrase(main) + " and " + _pick(self.rng, ["nothing else", "no other clothes"]) \
                    if len(objs) == 1 else f"{NUMBERS.get(len(objs), 'several')} items of clothing {self.place()}"
            return f"{NUMBERS.get(n, 'several')} {self.noun(cls, plural=True)}" + (
                f" {self.place()}" if self.chance(0.6) else "")
        if shape == "pair" and len(objs) > 1:
            other = _pick(self.rng, [o for o in objs if o is not main])
            return f"{self.object_phrase(main, 0.5)} {self.relation(main, other)} {self.object_phrase(other, 0.4)}"
        if shape == "background_first":
            bg = _pick(self.rng, BACKGROUNDS.get(self.scene.get("background", ""), ["a background"]))
            return f"{_pick(self.rng, ['a picture of', 'an image of'])} {bg} with " + self.object_phrase(main, 0.5)
        # list: up to three objects
        shown = objs[: min(len(objs), 3)]
        phrases = [self.object_phrase(o, 0.5) for o in shown]
        text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return text + (f" {self.place()}" if self.chance(0.4) else "")


def _area(o: dict) -> float:
    x1, y1, x2, y2 = o["bbox"]
    return float((x2 - x1) * (y2 - y1))


def scene_captions(scene: dict, seed: int, split: str, index: int, n: int = 5) -> list[str]:
    """``n`` different captions of one scene (its attribute dict), deterministic in (seed, split, index)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_CODES.get(split, 9), int(index)]))
    out: list[str] = []
    shapes = list(SHAPES)
    for _ in range(50 * n):
        if len(out) == n:
            break
        d = _Describer(rng, scene)
        text = d.caption(str(_pick(rng, shapes)))
        if text not in out:
            out.append(text)
    k = 0
    while len(out) < n:  # a scene so plain that the grammar cannot find n different sentences
        k += 1
        out.append(f"{out[0]} {_Describer(rng, scene).place()}" + " too" * k)
    return out


# ---------------------------------------------------------------------------------------------------
# the data set on disk
# ---------------------------------------------------------------------------------------------------
def caption_params(scene_params: dict, seed: int, captions_per_image: int) -> dict:
    return {"version": CAPTION_GENERATOR_VERSION, "scenes": scene_params, "caption_seed": int(seed),
            "captions_per_image": int(captions_per_image)}


def caption_key(params: dict) -> str:
    return digest(params, 16)


_LAYOUT = ("annotations/captions_train2014.json", "annotations/captions_val2014.json", "dataset_coco.json")


def _layout_problem(out: Path) -> str | None:
    missing = [p for p in _LAYOUT if not (out / p).is_file()]
    return f"{missing[0]} is missing" if missing else None


def _cache(out: Path) -> ArtifactCache:
    return ArtifactCache(out.parent, version=CAPTION_GENERATOR_VERSION, what="generated captions")


def is_complete(out: Path, params: dict) -> bool:
    out = Path(out)
    return _cache(out).dir_problem(out, params, _layout_problem) is None


def write_caption_dataset(out: str | Path, voc_root: str | Path, params: dict, progress: bool = True) -> Path:
    """Caption every scene of the VOC directory ``voc_root`` and write the COCO layout at ``out``."""
    out, voc_root = Path(out), Path(voc_root)
    seed, n_caps = params["caption_seed"], params["captions_per_image"]

    def write(tmp: Path) -> dict:
        coco = {f: {"info": {"description": "Transferrable generated captioned scenes", "version": "1"},
                    "licenses": [], "images": [], "annotations": []} for f in ("train2014", "val2014")}
        karpathy = {"dataset": "coco", "images": []}
        ann_id = 0
        for split in ("train", "val", "test"):
            ids = (voc_root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
            folder = "train2014" if split == "train" else "val2014"
            (tmp / folder).mkdir(parents=True, exist_ok=True)
            for i, sid in enumerate(progress_bar(ids, f"generating captions ({split})", enabled=progress, unit="img")):
                scene = json.loads((voc_root / "Attributes" / f"{sid}.json").read_text())
                file_name = f"scene_{split}_{sid}.jpg"
                src = voc_root / "JPEGImages" / f"{sid}.jpg"
                try:
                    os.link(src, tmp / folder / file_name)
                except OSError:
                    shutil.copyfile(src, tmp / folder / file_name)
                image_id = len(karpathy["images"]) + 1
                captions = scene_captions(scene, seed, split, i, n_caps)
                coco[folder]["images"].append({"id": image_id, "file_name": file_name, "width": scene["width"],
                                               "height": scene["height"]})
                sentences = []
                for c in captions:
                    ann_id += 1
                    coco[folder]["annotations"].append({"id": ann_id, "image_id": image_id, "caption": c})
                    sentences.append({"raw": c, "tokens": c.split(), "imgid": image_id - 1, "sentid": ann_id})
                karpathy["images"].append({"filepath": folder, "filename": file_name, "cocoid": image_id,
                                           "imgid": image_id - 1, "split": split, "sentences": sentences,
                                           "sentids": [s["sentid"] for s in sentences]})
        for folder, blob in coco.items():
            atomic_write_json(tmp / "annotations" / f"captions_{folder}.json", blob)
        atomic_write_json(tmp / "dataset_coco.json", karpathy)
        counts = Counter(im["split"] for im in karpathy["images"])
        return {"images": dict(counts), "captions": ann_id}  # the manifest's extra fields

    return _cache(out).get_or_build(params, write, kind="dir", name=out.name, validate=_layout_problem)
