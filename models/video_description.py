"""Video description decoders (thesis 4.5, Table 4.9): the two-layer unfactored LRCN decoder (``2u``) fed a video's
semantic tuple, in three ways (``video.input``):

* ``encoder_max`` -- (a) LSTM encoder-decoder: :class:`TupleEncoder` reads the maximum tuple as a word sequence
  (object, action, direction, place); its final state enters the decoder with ``<BOS>`` only, so the decoder
  must remember it;
* ``max`` -- (b) the decoder fed the maximum tuple (one-hot per slot) at every step;
* ``prob`` -- (c) the decoder fed the recogniser's class probabilities at every step.
"""

from __future__ import annotations

import torch
from torch import nn

from models.lrcn_caption import LRCNCaptioner
from models.recurrent import LSTM

INPUTS = {"encoder_max": "(a) LSTM encoder-decoder, tuple max", "max": "(b) LSTM decoder, tuple max",
          "prob": "(c) LSTM decoder, tuple probabilities"}


class TupleEncoder(nn.Module):
    """Reads the max tuple as a sequence of slot words and returns the LSTM's last hidden state."""

    def __init__(self, slot_sizes: list[int], embed: int, hidden: int):
        super().__init__()
        self.slot_sizes = list(slot_sizes)
        self.embed = nn.Embedding(sum(slot_sizes), embed)
        self.lstm = LSTM(embed, hidden, batch_first=True)
        self.register_buffer("offsets", torch.tensor([0, *torch.tensor(slot_sizes).cumsum(0)[:-1].tolist()]))

    def forward(self, onehots: torch.Tensor) -> torch.Tensor:
        ids = torch.stack([b.argmax(1) for b in onehots.split(self.slot_sizes, 1)], 1) + self.offsets
        _, (h, _) = self.lstm(self.embed(ids))
        return h[-1]


def tuple_decoder(vocab, slot_sizes: list[int], input: str, hidden: int, embed: int, dropout: float) -> LRCNCaptioner:
    """The ``2u`` decoder for one ``video.input``; ``encoder_max`` puts a :class:`TupleEncoder` before it."""
    first = input == "encoder_max"
    decoder = LRCNCaptioner(len(vocab), sum(slot_sizes), hidden=hidden, embed=embed, image_embed=hidden,
                            variant="2u", image_input="first_step" if first else "every_step", dropout=dropout,
                            pad=vocab.pad, bos=vocab.bos, eos=vocab.eos)
    if first:
        decoder.image_proj = TupleEncoder(slot_sizes, embed, hidden)
    return decoder
