"""Lightning callbacks for visual diagnostics: t-SNE feature maps (thesis Figure 2.1) and sample grids."""
