"""k-means and PCA whitening on torch tensors, chunked so that memory stays bounded.

DeepCluster (Caron et al., 2018) clusters the features of the whole training set every epoch:
PCA to 256 dimensions, whitening, L2 normalisation, then k-means (the paper uses faiss).  Here it
runs on whatever device the features are on, with distances computed ``chunk`` rows at a time
(peak memory ``chunk x k`` floats, not ``N x k``), and is deterministic for a given seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pca_whiten(x: torch.Tensor, dim: int, eps: float = 1e-5) -> torch.Tensor:
    """``x`` ``[N, D]`` centred, projected on its top ``dim`` principal axes, whitened and L2-normalised.

    ``y = normalize(((x - mean) @ U[:, :dim]) / sqrt(lambda[:dim] + eps))`` with ``U, lambda`` the
    eigenvectors / eigenvalues of the covariance (DeepCluster's ``preprocess_features``).  ``dim`` above
    ``D`` keeps all ``D`` axes.  Computed in float64 for the eigendecomposition, returned as float32.
    """
    x = x.double()
    centred = x - x.mean(0, keepdim=True)
    cov = centred.T @ centred / max(x.shape[0] - 1, 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    keep = min(dim, x.shape[1])
    top = eigvals.flip(0)[:keep].clamp_min(0.0)
    axes = eigvecs.flip(1)[:, :keep]
    return F.normalize((centred @ axes) / (top + eps).sqrt(), dim=1).float()


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (squared Euclidean) of every row of ``x``: ``(index [N], squared distance [N])``."""
    c_sq = (centroids * centroids).sum(1)
    labels, dists = [], []
    for rows in x.split(chunk):
        d = (rows * rows).sum(1, keepdim=True) - 2 * rows @ centroids.T + c_sq
        best = d.min(dim=1)
        labels.append(best.indices)
        dists.append(best.values.clamp_min(0.0))
    return torch.cat(labels), torch.cat(dists)


def kmeans(x: torch.Tensor, k: int, *, iterations: int = 20, seed: int = 0, chunk: int = 65536,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of ``x`` ``[N, D]``: ``(centroids [k, D], labels [N])``.

    Initialised with ``k`` distinct rows drawn with ``seed``.  A cluster that empties is re-seeded as
    faiss does: the largest cluster's centroid is split in two, ``c (1 +/- 1e-4)`` apart, so that
    clusters keep members.  (Exactly duplicated points cannot be split: a cluster may then stay empty,
    which callers must allow.)
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= N, got k={k}, N={n}")
    x = x.float()
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:k].to(x.device)].clone()
    labels = torch.zeros(n, dtype=torch.long, device=x.device)
    for _ in range(iterations):
        labels, _ = assign(x, centroids, chunk)
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(x.dtype)
        for empty in torch.nonzero(~filled).flatten().tolist():
            big = int(torch.argmax(counts))
            # faiss's relative split, plus an absolute part so that a centroid at 0 splits too.
            centre = centroids[big].clone()
            centroids[empty] = centre * (1 + 1e-4) + 1e-6
            centroids[big] = centre * (1 - 1e-4) - 1e-6
            counts[empty] = counts[big] // 2  # both halves now count as populated for the next split
            counts[big] -= counts[empty]
    labels, _ = assign(x, centroids, chunk)
    return centroids, labels
