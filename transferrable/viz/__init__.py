"""Drawing: t-SNE maps, image grids, palettes and Markdown tables, made from arrays; no callbacks, no training."""
