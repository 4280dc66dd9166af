"""Diagnostics logged next to the loss (never optimised)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def collapse_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised embeddings ``z`` ``[N, D]`` (SimSiam, Sec. 4.1).

    About ``1 / sqrt(D)`` for well-spread embeddings, 0 when every sample maps to the same
    point: the collapse that a wrong stop-gradient, queue or BN set-up produces.
    """
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


@torch.no_grad()
def effective_rank(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RankMe (Garrido et al., 2023, "RankMe: Assessing the Downstream Performance of Pretrained
    Self-Supervised Representations by Their Rank"): ``exp(-sum_k p_k log p_k)`` with
    ``p_k = s_k / sum(s) + eps`` and ``s`` the singular values of the batch-centred ``z`` ``[N, D]``.

    Between ~1 (every sample at one point, or along one direction) and ``min(N - 1, D)`` (all
    directions used equally): dimensional collapse shows here before ``collapse_std`` moves.
    The singular values come from the eigenvalues of the smaller Gram matrix (``N x N`` or
    ``D x D``), much cheaper than an SVD of a 4096 x 8192 batch; float64 keeps the small ones
    above rounding noise.
    """
    z = z.detach().double()
    z = z - z.mean(dim=0, keepdim=True)
    gram = z @ z.T if z.shape[0] <= z.shape[1] else z.T @ z
    s = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny) + eps
    return torch.exp(-(p * p.log()).sum())


@torch.no_grad()
def distribution_entropy(logits_or_probs: torch.Tensor, *, probs: bool = False) -> torch.Tensor:
    """Mean entropy (nats) of the rows of ``softmax(logits)`` (or of ``probs`` rows when ``probs=True``).

    Shapes: ``[N, K]`` -> scalar in ``[0, log K]``.  For DINO's teacher / SwAV's codes: near 0 every
    sample is one-hot on some prototype; near ``log K`` every row is uniform; both extremes are
    the collapses that centering + sharpening (DINO) and equipartition (SwAV) prevent.
    """
    x = logits_or_probs.detach().float()
    p = x if probs else x.softmax(dim=-1)
    return -(p * p.clamp_min(1e-12).log()).sum(dim=-1).mean()
