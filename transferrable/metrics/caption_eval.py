"""Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D through pycocoevalcap with its PTB tokenizer) and
caption/image retrieval (R@K, median rank).

Java: the PTB tokenizer and METEOR run Java. Without a ``java`` on PATH (or with ``java=false``) the
captions are tokenised in Python the way the PTB tokenizer does for plain sentences (lower case, words
only, punctuation dropped), METEOR is reported as unavailable (NaN, ``meteor_available=0``) with one
warning, and BLEU / ROUGE-L / CIDEr-D are still computed. SPICE is never called (it downloads Stanford
CoreNLP). pycocoevalcap's ``Cider`` is CIDEr-D (Gaussian length penalty, clipped n-gram counts, document
frequencies from the reference set).
"""

from __future__ import annotations

import logging
import math
import shutil
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from transferrable.core.vocabulary import tokenize

log = logging.getLogger(__name__)

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


class JavaMissingWarning(UserWarning):
    """Java is not available: METEOR is skipped and a Python tokenizer replaces the PTB tokenizer."""


def java_available(java: bool | str | None = "auto") -> bool:
    if java in (False, "false", "off", "no"):
        return False
    return shutil.which("java") is not None


def _tokenize(captions: Mapping, use_java: bool) -> dict:
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    return {k: [" ".join(tokenize(c)) for c in v] for k, v in captions.items()}


def caption_metrics(references: Mapping[object, Sequence[str]], hypotheses: Mapping[object, str],
                    java: bool | str | None = "auto", meteor: bool = True, meteor_scorer=None) -> dict[str, float]:
    """Corpus metrics of one hypothesis per image against its references (keys: ``METRIC_NAMES``, in 0..1
    for BLEU/METEOR/ROUGE, CIDEr-D unscaled), plus ``meteor_available`` (1/0: METEOR computed). Images
    without a reference are left out (``images_without_references``). ``meteor_scorer`` (a
    ``MeteorSession``) reuses one Java process across calls; otherwise one is started and closed here."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = [k for k in hypotheses if references.get(k)]
    skipped = len(hypotheses) - len(keys)
    if not keys:
        raise ValueError("caption_metrics: no image has both a hypothesis and a reference")
    use_java = java_available(java)
    if not use_java:
        warnings.warn("Java is not available: METEOR is reported as unavailable (NaN) and captions are tokenised "
                      "in Python instead of the PTB tokenizer; BLEU, ROUGE-L and CIDEr-D are still computed",
                      JavaMissingWarning, stacklevel=2)
    # one tokenizer call (one Java start) for references and hypotheses together
    both = _tokenize({**{("ref", i): list(references[k]) for i, k in enumerate(keys)},
                      **{("hyp", i): [hypotheses[k]] for i, k in enumerate(keys)}}, use_java)
    gts = {i: both[("ref", i)] for i in range(len(keys))}
    res = {i: both[("hyp", i)] for i in range(len(keys))}
    # the scorers assert one non-empty hypothesis; an empty caption is scored as the empty string
    res = {k: [v[0] if v and v[0] else ""] for k, v in res.items()}
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, 1):
        out[f"BLEU-{n}"] = float(b)
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    out["METEOR"] = math.nan
    out["meteor_available"] = 0.0
    if use_java and meteor:
        with MeteorSession(meteor_scorer) as scorer:
            # METEOR's Java side rejects an empty hypothesis line
            out["METEOR"] = scorer.score(gts, {k: [v[0] or "empty"] for k, v in res.items()})
        out["meteor_available"] = 1.0
    out["images_without_references"] = float(skipped)
    return out


class MeteorSession:
    """One METEOR Java process (start-up takes seconds), closed on exit unless it was handed in."""

    def __init__(self, existing: MeteorSession | None = None):
        self._owner = existing is None
        self._meteor = existing._meteor if existing is not None else None

    def __enter__(self) -> MeteorSession:
        if self._meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor

            self._meteor = Meteor()
        return self

    def score(self, gts: dict, res: dict) -> float:
        return float(self._meteor.compute_score(gts, res)[0])

    def __exit__(self, *exc) -> None:
        if self._owner:
            self.close()

    def close(self) -> None:
        m = self._meteor
        if m is not None and m.meteor_p.poll() is None:
            with m.lock:
                m.meteor_p.stdin.close()
                m.meteor_p.kill()
                m.meteor_p.wait()


# ---------------------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------------------
def retrieval_metrics(scores: np.ndarray, caption_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Both directions from a captions x images score matrix (higher = better match).

    caption -> image: each caption ranks every image; its rank is that of its own image.
    image -> caption: each image ranks every caption; its rank is that of the first of its own captions.
    Ranks are 1-based; ties count against the true match (a tie is not a hit). R@K in percent.
    """
    scores = np.asarray(scores, dtype=np.float64)
    caption_image = np.asarray(caption_image)
    M, N = scores.shape
    true = scores[np.arange(M), caption_image]
    cap_rank = (scores >= true[:, None]).sum(1)  # 1 + the other images scoring at least as high
    img_rank = np.empty(N, dtype=np.int64)
    for j in range(N):
        own = caption_image == j
        if not own.any():
            img_rank[j] = -1
            continue
        best_own = scores[own, j].max()
        img_rank[j] = 1 + int((scores[~own, j] >= best_own).sum())
    img_rank = img_rank[img_rank > 0]
    out = {}
    for name, ranks in (("caption_to_image", cap_rank), ("image_to_caption", img_rank)):
        for k in ks:
            out[f"{name}/R@{k}"] = 100.0 * float((ranks <= k).mean())
        out[f"{name}/median_rank"] = float(np.median(ranks))
    return out
