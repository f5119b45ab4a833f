"""One LightningDataModule per dataset; shared image-classification plumbing in ``base``."""
