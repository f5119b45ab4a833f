"""Plain nn.Modules (backbones, heads); no training logic lives here."""
