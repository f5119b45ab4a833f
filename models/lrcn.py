"""LRCN for activity recognition (thesis 4.2-4.3): a per-frame CNN (weights tied across time) read at a tap
(fc6), dropout, an LSTM, dropout and a linear layer giving class scores at every time step.

The CNN's own dropout at the tap is switched off: ``feature_dropout`` (0.9 in the thesis) is the dropout there.
``sequence_model="none"`` is the single-frame baseline: the same CNN and tap, a linear layer per frame, no
recurrence (scores are averaged over frames by the caller, as LRCN's are)."""

from __future__ import annotations

import torch
from torch import nn

from models.backbones import TapBackbone
from models.recurrent import LSTM

SEQUENCE_MODELS = ("lstm", "none")


class LRCN(nn.Module):
    def __init__(self, backbone: TapBackbone, num_classes: int, tap: str = "fc6", sequence_model: str = "lstm",
                 hidden: int = 256, feature_dropout: float = 0.9, output_dropout: float = 0.5):
        super().__init__()
        if sequence_model not in SEQUENCE_MODELS:
            raise ValueError(f"lrcn.sequence_model={sequence_model!r}: expected one of {list(SEQUENCE_MODELS)}")
        backbone.check_taps([tap])
        self.backbone, self.tap, self.sequence_model = backbone, tap, sequence_model
        for m in backbone.stages[tap].modules():  # LRCN's own dropout after the tap replaces the CNN's there
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        # the stages after the tap never run: no gradients for them (DDP refuses parameters without one)
        for name in backbone.tap_names[backbone.tap_names.index(tap) + 1:]:
            backbone.stages[name].requires_grad_(False)
        dim = backbone.feature_dim(tap)
        self.feature_dropout = nn.Dropout(feature_dropout)
        if sequence_model == "lstm":
            self.lstm = LSTM(dim, hidden, batch_first=True)
            self.output_dropout = nn.Dropout(output_dropout)
            dim = hidden
        self.classifier = nn.Linear(dim, num_classes)

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """N x C x H x W frames -> N x D tap activations."""
        return self.backbone.forward_taps(frames, [self.tap])[self.tap].flatten(1)

    def sequence_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """B x T x D features -> B x T x K class scores (logits) at every step."""
        x = self.feature_dropout(feats)
        if self.sequence_model == "lstm":
            x, _ = self.lstm(x)
            x = self.output_dropout(x)
        return self.classifier(x)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """B x T x C x H x W clips -> B x T x K per-step logits."""
        b, t = clips.shape[:2]
        feats = self.frame_features(clips.flatten(0, 1)).view(b, t, -1)
        return self.sequence_scores(feats)


def clip_starts(num_frames: int, clip_length: int, stride: int) -> list[int]:
    """Start frames of the test clips (``clip_length`` frames every ``stride``), at least one clip."""
    return list(range(0, max(num_frames - clip_length, 0) + 1, max(1, stride)))
