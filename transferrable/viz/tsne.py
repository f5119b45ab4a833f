"""t-SNE visualisation of backbone features (thesis section 2.2.1, Figure 2.1).

The thesis embeds DeCAF features in 2-D with t-SNE and colours the points by (super-)class: the first
pooling layer (DeCAF1) shows no semantic clustering, fc6 (DeCAF6) a clear one. Features wider than 512
dimensions are first randomly projected to 512 (footnote 2: random projections are cheap and preserve
distances, which is all t-SNE cares about).

    tsne_embedding(features, seed)          one feature set -> (N, 2)
    embed_panels(panels, labels, ...)       several feature sets on the same points -> TSNEResult,
                                            with a silhouette score (by class) per panel
    draw_tsne(result, path, ...)            panels side by side, one PNG (written atomically)
    plot_tsne(panels, labels, ..., path=)   embed_panels + draw_tsne

The Lightning callback that draws these at the end of testing is ``callbacks/tsne.py``.

The silhouette score of the 2-D embedding by class (in [-1, 1], higher = classes form tighter, better
separated clusters) turns "fc6 clusters classes better than conv1" into a number; it is written in each
panel's title, returned in ``TSNEResult.silhouettes``, and the callback also writes it to a JSON file
next to the PNG and into ``trainer.callback_metrics`` (so ``metrics.json`` of a run carries it).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferrable.core.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

DEFAULT_MAX_DIM = 512  # thesis footnote 2
DOMAIN_MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*", "<", ">")
MAX_LEGEND_CLASSES = 30


# -- numerics -----------------------------------------------------------------------------------
def flatten_features(features: Any) -> np.ndarray:
    """(N, ...) array or tensor -> (N, D) float32 array."""
    if isinstance(features, torch.Tensor):
        features = features.detach().float().cpu().numpy()
    x = np.asarray(features)
    if x.ndim == 0:
        raise ValueError("features must have a leading sample dimension")
    return np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32)


def random_projection(features: np.ndarray, out_dim: int, seed: int) -> np.ndarray:
    """Gaussian random projection (sklearn) of (N, D) features to ``out_dim`` dimensions."""
    from sklearn.random_projection import GaussianRandomProjection

    proj = GaussianRandomProjection(n_components=int(out_dim), random_state=int(seed))
    return proj.fit_transform(features).astype(np.float32, copy=False)


def tsne_embedding(
    features: np.ndarray,
    seed: int,
    max_dim: int = DEFAULT_MAX_DIM,
    perplexity: float = 30.0,
    max_iter: int = 1000,
    deterministic: bool = True,
) -> np.ndarray:
    """A 2-D t-SNE embedding of (N, ...) features, the same for the same ``seed``.

    Features are flattened; when wider than ``max_dim`` they are randomly projected to ``max_dim``
    dimensions first. t-SNE starts from PCA (``init='pca'``), with ``perplexity`` capped for small N.
    ``max_iter`` counts sklearn's 250 early-exaggeration iterations, so it should be well above 250.
    ``deterministic`` runs the Barnes-Hut gradient on one OpenMP thread: with more, its parallel
    sum is reduced in a thread-dependent order and the result can differ in the last bits.
    """
    from sklearn.manifold import TSNE

    x = flatten_features(features)
    n, d = x.shape
    if max_dim and d > max_dim:
        x = random_projection(x, max_dim, seed)
        d = x.shape[1]
    if n < 2:
        return np.zeros((n, 2), dtype=np.float32)
    if max_iter <= 250:
        log.warning("t-SNE max_iter=%d: sklearn spends the first 250 iterations in early exaggeration, so "
                    "the embedding is not optimised past it; use 500 or more", max_iter)
    perplexity = float(max(1.0, min(perplexity, (n - 1) / 3.0)))  # sklearn needs perplexity < n
    tsne = TSNE(
        n_components=2,
        perplexity=perplexity,
        init="pca" if min(n, d) >= 2 else "random",
        learning_rate="auto",
        max_iter=max(250, int(max_iter)),
        random_state=int(seed),
    )
    if deterministic:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="openmp"):
            emb = tsne.fit_transform(x)
    else:
        emb = tsne.fit_transform(x)
    return np.asarray(emb, dtype=np.float32)


def stratified_subsample(labels: Sequence | np.ndarray, max_points: int | None, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_points`` samples, each class keeping its share (at least one)."""
    labels = np.asarray(labels)
    n = len(labels)
    if not max_points or n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) >= max_points:  # more classes than points: a plain random subset
        return np.sort(rng.choice(n, size=max_points, replace=False))
    quota = counts * (max_points / n)
    take = np.maximum(1, np.floor(quota)).astype(int)
    # hand out what is left by largest remainder, never more than a class has
    for i in np.argsort(-(quota - np.floor(quota)), kind="stable"):
        if take.sum() >= max_points:
            break
        if take[i] < counts[i]:
            take[i] += 1
    while take.sum() > max_points:  # the "at least one" floor overshot: trim the largest classes
        take[np.argmax(take)] -= 1
    picked = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(picked))


def silhouette(embedding: np.ndarray, labels: Sequence | np.ndarray) -> float:
    """Silhouette score of an embedding by class label; NaN where undefined (one class, or one per point)."""
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    k = len(np.unique(labels))
    if not 2 <= k <= len(labels) - 1:
        return float("nan")
    return float(silhouette_score(embedding, labels))


@dataclass
class TSNEResult:
    """2-D embeddings of several feature sets of the same points."""

    embeddings: dict[str, np.ndarray]
    labels: np.ndarray
    index: np.ndarray  # rows of the input that were kept (stratified subsample)
    domains: np.ndarray | None = None
    silhouettes: dict[str, float] = field(default_factory=dict)


def embed_panels(
    panels: Mapping[str, Any],
    labels: Sequence | np.ndarray,
    domains: Sequence | np.ndarray | None = None,
    max_points: int | None = 2000,
    seed: int = 0,
    max_dim: int = DEFAULT_MAX_DIM,
    **tsne_kwargs: Any,
) -> TSNEResult:
    """Stratified subsample to ``max_points``, t-SNE each feature set, silhouette by class per panel."""
    if not panels:
        raise ValueError("embed_panels needs at least one feature set")
    labels = np.asarray(labels)
    for name, feats in panels.items():
        if len(feats) != len(labels):
            raise ValueError(f"panel {name!r} has {len(feats)} rows but there are {len(labels)} labels")
    if domains is not None:
        domains = np.asarray(domains)
        if len(domains) != len(labels):
            raise ValueError(f"{len(domains)} domain labels but {len(labels)} class labels")
    idx = stratified_subsample(labels, max_points, seed)
    embeddings, scores = {}, {}
    for name, feats in panels.items():
        emb = tsne_embedding(flatten_features(feats)[idx], seed=seed, max_dim=max_dim, **tsne_kwargs)
        embeddings[name] = emb
        scores[name] = silhouette(emb, labels[idx])
    return TSNEResult(embeddings, labels[idx], idx, None if domains is None else domains[idx], scores)


# -- drawing ------------------------------------------------------------------------------------
def _class_colors(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    cmap = colormaps["turbo"]
    return [cmap(v) for v in np.linspace(0.05, 0.95, n)]


def _name(value: Any, names: Sequence[str] | Mapping | None) -> str:
    if names is not None:
        if isinstance(names, Mapping):
            if value in names:
                return str(names[value])
        else:
            try:
                i = int(value)
            except (TypeError, ValueError):
                i = None
            if i is not None and 0 <= i < len(names) and i == value:
                return str(names[i])
    return str(value.item() if isinstance(value, np.generic) else value)


def figure_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def draw_tsne(
    result: TSNEResult,
    path: str | Path,
    class_names: Sequence[str] | Mapping | None = None,
    title: str | None = None,
    panel_size: float = 4.5,
    dpi: int = 100,
) -> Path:
    """One scatter panel per feature set, side by side; colour = class, marker = domain. Atomic PNG."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    classes = np.unique(result.labels)
    colors = dict(zip(classes.tolist(), _class_colors(len(classes)), strict=True))
    domains = result.domains
    domain_values = np.unique(domains).tolist() if domains is not None else [None]
    markers = {d: DOMAIN_MARKERS[i % len(DOMAIN_MARKERS)] for i, d in enumerate(domain_values)}
    show_legend = len(classes) <= MAX_LEGEND_CLASSES or domains is not None
    n_panels = len(result.embeddings)
    n = len(result.labels)
    size = 10 if n <= 500 else 5 if n <= 2000 else 2

    fig = Figure(figsize=(panel_size * n_panels + (2.0 if show_legend else 0.0), panel_size + 0.6), dpi=dpi,
                 layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    point_colors = np.array([colors[c] for c in result.labels.tolist()])
    for ax, (name, emb) in zip(axes, result.embeddings.items(), strict=True):
        for d in domain_values:
            m = np.ones(n, bool) if d is None else domains == d
            ax.scatter(emb[m, 0], emb[m, 1], c=point_colors[m], s=size, marker=markers[d], linewidths=0, alpha=0.8)
        score = result.silhouettes.get(name, float("nan"))
        ax.set_title(f"{name}: silhouette {score:.3f}" if math.isfinite(score) else f"{name}: silhouette n/a",
                     fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"t-SNE of {', '.join(result.embeddings)} ({n} points, {len(classes)} classes)",
                 fontsize=11)
    if show_legend:
        handles = []
        if len(classes) <= MAX_LEGEND_CLASSES:
            handles += [Line2D([], [], ls="", marker="o", color=colors[c], label=_name(c, class_names)) for c in classes]
        if domains is not None:
            handles += [Line2D([], [], ls="", marker=markers[d], color="0.3", label=f"domain: {d}") for d in domain_values]
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    return atomic_write_bytes(path, figure_png(fig))


def plot_tsne(
    panels: Mapping[str, Any],
    labels: Sequence | np.ndarray,
    class_names: Sequence[str] | Mapping | None = None,
    domains: Sequence | np.ndarray | None = None,
    *,
    path: str | Path,
    title: str | None = None,
    max_points: int | None = 2000,
    seed: int = 0,
    max_dim: int = DEFAULT_MAX_DIM,
    **tsne_kwargs: Any,
) -> Path:
    """t-SNE panels side by side (e.g. ``{"conv1": ..., "fc6": ...}``: Figure 2.1's low vs high level).

    Points are coloured by class (legend from ``class_names``) and, when ``domains`` is given, shaped
    by domain. Each panel title carries its silhouette score; use ``embed_panels`` + ``draw_tsne`` to
    get the scores as numbers.
    """
    result = embed_panels(panels, labels, domains, max_points=max_points, seed=seed, max_dim=max_dim, **tsne_kwargs)
    return draw_tsne(result, path, class_names=class_names, title=title)


# -- on-the-fly projection for wide activation maps -------------------------------------------
class GaussianProjector:
    """x (B, D) -> x @ R with R ~ N(0, 1/out_dim) (D x out_dim), as sklearn's GaussianRandomProjection.

    Applied batch by batch so a wide conv map (e.g. VGG conv1 at 224 px, 800k dims) is never stored
    whole. R is kept in memory when it is at most ``cache_bytes``, otherwise regenerated chunk by
    chunk from seeded generators, so the projection is the same for every batch either way.
    """

    def __init__(self, in_dim: int, out_dim: int, seed: int, chunk: int = 8192, cache_bytes: int = 256 << 20):
        self.in_dim, self.out_dim, self.seed, self.chunk = int(in_dim), int(out_dim), int(seed), int(chunk)
        self._cached = in_dim * out_dim * 4 <= cache_bytes
        self._matrix: torch.Tensor | None = None

    def _block(self, i: int, device: torch.device) -> torch.Tensor:
        rows = min(self.chunk, self.in_dim - i * self.chunk)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return (torch.randn(rows, self.out_dim, generator=g) / math.sqrt(self.out_dim)).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1).float()
        if x.shape[1] != self.in_dim:
            raise ValueError(f"projector built for {self.in_dim} dims got {x.shape[1]}")
        n_blocks = -(-self.in_dim // self.chunk)
        if self._cached:
            if self._matrix is None or self._matrix.device != x.device:
                self._matrix = torch.cat([self._block(i, x.device) for i in range(n_blocks)])
            return x @ self._matrix
        out = x.new_zeros(len(x), self.out_dim)
        for i in range(n_blocks):
            out += x[:, i * self.chunk : (i + 1) * self.chunk] @ self._block(i, x.device)
        return out
