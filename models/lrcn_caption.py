"""LRCN caption decoder (thesis 4.4): word embedding + one or two recurrent layers fed an image feature.

Variants (``variant``):

* ``1u``: one layer; its input is [word embedding, image].
* ``2u``: two layers; the image enters layer 1 with the word, layer 2 sees layer 1's output ("unfactored").
* ``2f``: two layers; layer 1 sees only the word (a language model), the image enters layer 2 with layer 1's
  output ("factored").

``unit``: ``lstm`` or ``rnn`` (tanh). ``image_input``: ``every_step`` (LRCN: the image at every time step)
or ``first_step`` (Show-and-Tell style: the image only with ``<BOS>``, zeros afterwards).
Predictions come from the top layer through dropout and a linear layer over the vocabulary.

Decoding, all batched over images: ``greedy``, ``beam`` (width k, hypotheses ranked by summed
log-probability; width 1 is greedy) and ``sample`` (N captions per image at inverse temperature T, the
one with the highest log-probability under the model kept). ``sequence_logprob`` scores given captions
(retrieval ranks by it, divided by the number of predicted tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.recurrent import LSTM, RNN

VARIANTS = ("1u", "2u", "2f")
UNITS = ("lstm", "rnn")
IMAGE_INPUTS = ("every_step", "first_step")


@dataclass
class Decoded:
    tokens: torch.Tensor  # B x L word ids, <EOS> then <PAD> after the end
    logprob: torch.Tensor  # B, summed log-probability of the words and <EOS>
    length: torch.Tensor  # B, number of words (without <EOS>)


class LRCNCaptioner(nn.Module):
    def __init__(self, vocab_size: int, feature_dim: int, hidden: int = 256, embed: int = 256,
                 image_embed: int | None = None, variant: str = "2f", unit: str = "lstm",
                 image_input: str = "every_step", dropout: float = 0.5, pad: int = 0, bos: int = 1, eos: int = 2):
        super().__init__()
        if variant not in VARIANTS or unit not in UNITS or image_input not in IMAGE_INPUTS:
            raise ValueError(f"lrcn.variant={variant!r} (expected {VARIANTS}), lrcn.unit={unit!r} (expected {UNITS}), "
                             f"lrcn.image_input={image_input!r} (expected {IMAGE_INPUTS})")
        self.variant, self.unit, self.image_input = variant, unit, image_input
        self.vocab_size, self.feature_dim, self.hidden = int(vocab_size), int(feature_dim), int(hidden)
        self.pad, self.bos, self.eos = pad, bos, eos
        image_embed = int(image_embed or hidden)
        self.embed = nn.Embedding(vocab_size, embed, padding_idx=pad)
        self.image_proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, image_embed), nn.ReLU())
        rnn = LSTM if unit == "lstm" else RNN
        self.image_layer = 0 if variant in ("1u", "2u") else 1
        n_layers = 1 if variant == "1u" else 2
        in_dims = [embed + (image_embed if self.image_layer == 0 else 0)]
        if n_layers == 2:
            in_dims.append(hidden + (image_embed if self.image_layer == 1 else 0))
        self.layers = nn.ModuleList(rnn(d, hidden, batch_first=True) for d in in_dims)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab_size)

    # -- one pass over given inputs -------------------------------------------------------------
    def _image_steps(self, img: torch.Tensor, steps: int, t0: int) -> torch.Tensor:
        """B x steps x E image input for time steps t0..t0+steps-1 (zeros after step 0 for first_step)."""
        x = img[:, None, :].expand(-1, steps, -1)
        if self.image_input == "first_step":
            mask = (torch.arange(t0, t0 + steps, device=img.device) == 0).to(img.dtype)
            x = x * mask[None, :, None]
        return x

    def run(self, img: torch.Tensor, tokens: torch.Tensor, state=None, t0: int = 0):
        """Logits B x T x V for input tokens B x T (teacher forcing, or one step with a carried state)."""
        x = self.embed(tokens)
        im = self._image_steps(img, tokens.shape[1], t0)
        new_state = []
        for i, layer in enumerate(self.layers):
            if i == self.image_layer:
                x = torch.cat([x, im], dim=-1)
            x, s = layer(x, None if state is None else state[i])
            new_state.append(s)
        return self.out(self.drop(x)), new_state

    def encode_image(self, features: torch.Tensor) -> torch.Tensor:
        return self.image_proj(features)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits predicting tokens[:, 1:] from tokens[:, :-1] (``<BOS> w.. <EOS> <PAD>..``)."""
        logits, _ = self.run(self.encode_image(features), tokens[:, :-1])
        return logits

    def loss(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        logits = self(features, tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1),
                               ignore_index=self.pad)

    @torch.no_grad()
    def sequence_logprob(self, features: torch.Tensor, tokens: torch.Tensor, normalise: bool = True) -> torch.Tensor:
        """Per-row log p(caption | image), summed over the words and ``<EOS>``; divided by their number when
        ``normalise`` (the retrieval score)."""
        logp = F.log_softmax(self(features, tokens).float(), dim=-1)
        target = tokens[:, 1:]
        mask = target != self.pad
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        total = picked.sum(1)
        return total / mask.sum(1).clamp(min=1) if normalise else total

    # -- decoding -------------------------------------------------------------------------------
    def _step(self, img, last, state, t):
        logits, state = self.run(img, last[:, None], state, t0=t)
        return F.log_softmax(logits[:, 0].float(), dim=-1), state

    def _forbid(self, logp: torch.Tensor) -> torch.Tensor:
        logp = logp.clone()
        logp[:, self.pad] = -torch.inf
        logp[:, self.bos] = -torch.inf
        return logp

    @torch.no_grad()
    def greedy(self, features: torch.Tensor, max_len: int = 20) -> Decoded:
        return self.beam(features, 1, max_len)

    @torch.no_grad()
    def beam(self, features: torch.Tensor, width: int = 5, max_len: int = 20) -> Decoded:
        """Beam search of ``width``, batched over images; up to ``max_len`` words, then ``<EOS>`` is forced."""
        B, k = features.shape[0], int(width)
        img = self.encode_image(features).repeat_interleave(k, 0)
        dev = features.device
        last = torch.full((B * k,), self.bos, dtype=torch.long, device=dev)
        # only beam 0 is live at the start, so the k beams do not start as copies
        score = torch.full((B, k), -torch.inf, device=dev)
        score[:, 0] = 0.0
        done = torch.zeros(B, k, dtype=torch.bool, device=dev)
        seqs = torch.zeros(B, k, 0, dtype=torch.long, device=dev)
        state = None
        for t in range(max_len + 1):
            logp, state = self._step(img, last, state, t)
            logp = self._forbid(logp).view(B, k, -1)
            if t == max_len:  # out of words: only <EOS> remains
                keep = logp[..., self.eos].clone()
                logp = torch.full_like(logp, -torch.inf)
                logp[..., self.eos] = keep
            V = logp.shape[-1]
            # finished beams extend only with <PAD> at no cost
            ext = torch.where(done[..., None], torch.full_like(logp, -torch.inf), logp)
            ext[..., self.pad] = torch.where(done, 0.0, -torch.inf)
            cand = (score[..., None] + ext).view(B, k * V)
            top, idx = cand.topk(k, dim=1)
            beam_idx, word = idx // V, idx % V
            score = top
            seqs = torch.cat([seqs.gather(1, beam_idx[..., None].expand(-1, -1, seqs.shape[2])), word[..., None]], 2)
            done = done.gather(1, beam_idx) | (word == self.eos)
            flat = (beam_idx + torch.arange(B, device=dev)[:, None] * k).view(-1)
            state = [_select_state(s, flat) for s in state]
            last = word.view(-1)
            if bool(done.all()):
                break
        best = score.argmax(1)
        tokens = seqs[torch.arange(B, device=dev), best]
        return _finish(tokens, score[torch.arange(B, device=dev), best], self.eos, self.pad)

    @torch.no_grad()
    def sample(self, features: torch.Tensor, n: int = 10, inverse_temperature: float = 1.0, max_len: int = 20,
               generator: torch.Generator | None = None) -> Decoded:
        """``n`` captions per image drawn from softmax(T * logits); keeps the most probable under the model."""
        B, n = features.shape[0], int(n)
        img = self.encode_image(features).repeat_interleave(n, 0)
        dev = features.device
        last = torch.full((B * n,), self.bos, dtype=torch.long, device=dev)
        total = torch.zeros(B * n, device=dev)
        done = torch.zeros(B * n, dtype=torch.bool, device=dev)
        out = []
        state = None
        for t in range(max_len + 1):
            logp, state = self._step(img, last, state, t)
            logp = self._forbid(logp)
            if t == max_len:
                word = torch.full_like(last, self.eos)
            else:
                probs = torch.softmax(logp * float(inverse_temperature), dim=-1)
                word = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            total = total + torch.where(done, 0.0, logp.gather(1, word[:, None]).squeeze(1))
            word = torch.where(done, torch.full_like(word, self.pad), word)
            out.append(word)
            done = done | (word == self.eos)
            last = word
            if bool(done.all()):
                break
        seqs = torch.stack(out, 1).view(B, n, -1)
        total = total.view(B, n)
        best = total.argmax(1)
        return _finish(seqs[torch.arange(B, device=dev), best], total[torch.arange(B, device=dev), best],
                       self.eos, self.pad)

    @torch.no_grad()
    def decode(self, features: torch.Tensor, method: str = "beam", width: int = 1, n: int = 1,
               inverse_temperature: float = 1.0, max_len: int = 20, generator=None) -> Decoded:
        if method in ("greedy", "beam"):
            return self.beam(features, 1 if method == "greedy" else width, max_len)
        if method == "sample":
            return self.sample(features, n, inverse_temperature, max_len, generator)
        raise ValueError(f"decoding method {method!r}: expected greedy, beam or sample")


def _select_state(s, idx: torch.Tensor):
    """Reorder a recurrent state (``h`` or ``(h, c)``, batch in dim 1) along the batch."""
    if isinstance(s, tuple):
        return tuple(x.index_select(1, idx) for x in s)
    return s.index_select(1, idx)


def _finish(tokens: torch.Tensor, logprob: torch.Tensor, eos: int, pad: int) -> Decoded:
    is_eos = tokens == eos
    has = is_eos.any(1)
    first = torch.where(has, is_eos.float().argmax(1), torch.full_like(has, tokens.shape[1], dtype=torch.long))
    pos = torch.arange(tokens.shape[1], device=tokens.device)[None]
    tokens = torch.where(pos > first[:, None], torch.full_like(tokens, pad), tokens)
    return Decoded(tokens=tokens, logprob=logprob, length=first)
