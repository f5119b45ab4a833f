"""BiGAN (thesis ch. 5): the unsupervised pipeline and the transfer report."""
