"""Evaluating a representation learned without labels: 1-nearest-neighbour accuracy (thesis Table 5.1),
a linear probe, and how well discrete codes cluster the classes (purity / NMI).

Labels enter only where they must: the gallery's labels (the training split) decide a 1-NN prediction;
the query labels (the test split) are only compared with the predictions afterwards.
"""

from __future__ import annotations

import numpy as np
import torch

from transferrable.core.distributed import map_shards, rank_and_world


@torch.no_grad()
def knn1_predict(
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    queries: torch.Tensor,
    metric: str = "euclidean",
    chunk: int = 1024,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels, gallery index of the nearest neighbour) for every query row.

    ``euclidean`` (the original BiGAN code's ``nnc_score``) or ``cosine`` (Figure 5.5's neighbours).
    Computed in chunks of ``chunk`` queries (``dtype=torch.float64`` for bit-exact distances; float32, the
    default, is ~2x faster on CPU); ties go to the lowest gallery index.
    """
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"1-NN metric {metric!r}: expected euclidean or cosine")
    if len(gallery) != len(gallery_labels):
        raise ValueError(f"{len(gallery)} gallery rows but {len(gallery_labels)} gallery labels")
    if len(gallery) == 0:
        raise ValueError("1-NN needs a non-empty gallery")
    g = gallery.reshape(len(gallery), -1).to(dtype)
    q_all = queries.reshape(len(queries), -1).to(dtype)
    if g.shape[1] != q_all.shape[1]:
        raise ValueError(f"gallery has {g.shape[1]} dims, queries {q_all.shape[1]}")
    if metric == "cosine":
        g = torch.nn.functional.normalize(g, dim=1)
        q_all = torch.nn.functional.normalize(q_all, dim=1)
    g_sq = (g * g).sum(1)
    nearest = []
    for start in range(0, len(q_all), chunk):
        q = q_all[start : start + chunk]
        if metric == "cosine":
            score = -(q @ g.T)
        else:  # |q|^2 is the same for every gallery row of a query: argmin of |g|^2 - 2 q.g
            score = g_sq[None, :] - 2 * (q @ g.T)
        nearest.append(score.argmin(1))
    idx = torch.cat(nearest) if nearest else torch.zeros(0, dtype=torch.long)
    return torch.as_tensor(gallery_labels)[idx], idx


def knn1_accuracy(gallery, gallery_labels, queries, query_labels, metric: str = "euclidean") -> float:
    pred, _ = knn1_predict(torch.as_tensor(gallery), torch.as_tensor(gallery_labels), torch.as_tensor(queries), metric)
    return float((pred == torch.as_tensor(query_labels)).double().mean())


def linear_probe_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    C: float = 1.0,
    max_iter: int = 500,
    max_train: int | None = 10000,
    seed: int = 0,
) -> float:
    """Multinomial logistic regression (sklearn, standardised features) trained on at most ``max_train``
    training rows (a stratified-by-chance random subset, for CPU), accuracy on the test rows."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_x, train_y = np.asarray(train_x, dtype=np.float64), np.asarray(train_y)
    if max_train and len(train_y) > max_train:
        keep = np.sort(np.random.default_rng(seed).permutation(len(train_y))[:max_train])
        train_x, train_y = train_x[keep], train_y[keep]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(train_x, train_y)
    return float((clf.predict(np.asarray(test_x, dtype=np.float64)) == np.asarray(test_y)).mean())


def cluster_purity(clusters, labels) -> float:
    """Fraction of samples whose label is their cluster's most frequent label."""
    clusters, labels = np.asarray(clusters), np.asarray(labels)
    if len(clusters) != len(labels):
        raise ValueError(f"{len(clusters)} cluster ids but {len(labels)} labels")
    if len(labels) == 0:
        return float("nan")
    total = 0
    for c in np.unique(clusters):
        total += np.bincount(labels[clusters == c]).max()
    return float(total / len(labels))


def cluster_nmi(clusters, labels) -> float:
    """Normalised mutual information between cluster ids and labels (arithmetic normalisation)."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(np.asarray(labels), np.asarray(clusters)))


def knn1_predict_sharded(gallery: torch.Tensor, gallery_labels: torch.Tensor, queries: torch.Tensor, metric: str,
                         chunk: int = 1024) -> torch.Tensor:
    """``knn1_predict``'s labels for every query; under DDP each rank answers its share of the query chunks (the
    chunks one process computes, so the same answers) and every rank gets them all (``distributed.map_shards``)."""
    if rank_and_world()[1] == 1:
        return knn1_predict(gallery, gallery_labels, queries, metric, chunk=chunk)[0]
    starts = list(range(0, len(queries), chunk))
    return torch.cat(map_shards(starts, lambda s: knn1_predict(gallery, gallery_labels, queries[s : s + chunk],
                                                                 metric, chunk=chunk)[0]))
