"""Caption vocabulary (LRCN captioning): words seen at least ``min_count`` times in the training captions,
plus ``<PAD>`` (0), ``<BOS>``, ``<EOS>`` and ``<UNK>``; captions are cut to ``max_len`` words.

Tokenisation is lower-case words (letters/digits, inner hyphens and apostrophes kept: ``t-shirt``), the
same words the PTB tokenizer of pycocoevalcap keeps once punctuation is dropped. The vocabulary is saved in
the checkpoint (``to_dict``/``from_dict``); a checkpoint whose vocabulary does not fit its own weights, or
that differs from the data's when training resumes, is a ``VocabularyMismatchError`` (one line).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

from transferrable.core.errors import ConfigError

PAD, BOS, EOS, UNK = "<PAD>", "<BOS>", "<EOS>", "<UNK>"
SPECIALS = (PAD, BOS, EOS, UNK)
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


class VocabularyMismatchError(ConfigError):
    """A stored vocabulary does not match the weights or the data it is used with."""


def tokenize(text: str) -> list[str]:
    return _WORD.findall(str(text).lower())


class Vocabulary:
    def __init__(self, words: Sequence[str], max_len: int = 20, min_count: int = 5):
        self.itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.max_len = int(max_len)
        self.min_count = int(min_count)
        self.pad, self.bos, self.eos, self.unk = (self.stoi[s] for s in SPECIALS)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5, max_len: int = 20) -> Vocabulary:
        """Words with count >= ``min_count`` over ``captions``, most frequent first (ties alphabetical)."""
        if int(min_count) < 1 or int(max_len) < 1:
            raise ConfigError(f"vocabulary: min_count={min_count} and max_len={max_len} must both be >= 1")
        counts = Counter(w for c in captions for w in tokenize(c))
        words = sorted((w for w, n in counts.items() if n >= int(min_count)), key=lambda w: (-counts[w], w))
        return cls(words, max_len=max_len, min_count=min_count)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.to_dict() == other.to_dict()

    def encode(self, text: str | Sequence[str]) -> list[int]:
        """Word ids, at most ``max_len``, unknown words as ``<UNK>``; no ``<BOS>``/``<EOS>``."""
        words = tokenize(text) if isinstance(text, str) else list(text)
        return [self.stoi.get(w, self.unk) for w in words[: self.max_len]]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first ``<EOS>``; ``<PAD>``/``<BOS>`` dropped, ``<UNK>`` kept as the word ``<UNK>``."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos:
                break
            if i in (self.pad, self.bos):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return " ".join(out)

    def to_dict(self) -> dict:
        return {"itos": list(self.itos), "max_len": self.max_len, "min_count": self.min_count}

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        itos = list(d["itos"])
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise VocabularyMismatchError(f"stored vocabulary does not start with {SPECIALS}: {itos[:4]}")
        return cls(itos[len(SPECIALS):], max_len=d.get("max_len", 20), min_count=d.get("min_count", 5))

    def difference(self, other: Vocabulary) -> str:
        """A short description of how two vocabularies differ ('' when equal)."""
        a, b = set(self.itos), set(other.itos)
        parts = []
        if len(self) != len(other):
            parts.append(f"{len(self)} vs {len(other)} words")
        if a - b:
            parts.append(f"only in the first: {sorted(a - b)[:5]}")
        if b - a:
            parts.append(f"only in the second: {sorted(b - a)[:5]}")
        if not parts and self.itos != other.itos:
            parts.append("same words in another order")
        if self.max_len != other.max_len:
            parts.append(f"max_len {self.max_len} vs {other.max_len}")
        return "; ".join(parts)
