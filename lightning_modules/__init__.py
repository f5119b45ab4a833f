"""One LightningModule per method of the thesis; models (nn.Modules) live in ``models``."""
