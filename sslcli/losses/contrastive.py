"""Contrastive losses with explicit negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslcli.losses.float32 import float32_loss


@float32_loss
def info_nce(query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE as a (K+1)-way cross-entropy with the positive at index 0.

    ``L = -mean_i log( exp(q_i.k_i / t) / (exp(q_i.k_i / t) + sum_j exp(q_i.n_j / t)) )``
    (He et al., 2020, "Momentum Contrast", Eq. 1).  Inputs are L2-normalised here.

    Shapes: ``query`` and ``key`` ``[N, D]``, ``negatives`` ``[K, D]`` (e.g. the queue).
    Computed in float32 whatever the autocast dtype, so large queues cannot overflow fp16.
    """
    q = F.normalize(query.float(), dim=1)
    k = F.normalize(key.float(), dim=1)
    n = F.normalize(negatives.float(), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ n.T
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


@float32_loss
def in_batch_contrastive(query: torch.Tensor, keys: torch.Tensor, temperature: float, offset: int = 0) -> torch.Tensor:
    """Cross-entropy of each query against a batch of keys; query ``i``'s positive is key ``offset + i``.

    ``L = -mean_i log( exp(q_i.k_{o+i} / t) / sum_j exp(q_i.k_j / t) )`` with cosine similarities.
    MoCo v3's ``ctr(q, k)`` is ``2 t`` times this (Chen, Xie, He, 2021, Alg. 1); CLIP's two
    directions are this with images and texts as queries and keys in turn.

    Shapes: ``query`` ``[n, D]`` (this rank's rows), ``keys`` ``[N, D]`` (the global batch, e.g.
    gathered across ranks, this rank's rows at ``offset : offset + n``).
    """
    q = F.normalize(query.float(), dim=1)
    k = F.normalize(keys.float(), dim=1)
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(q @ k.T / temperature, labels)


@float32_loss
def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    *,
    keys1: torch.Tensor | None = None,
    keys2: torch.Tensor | None = None,
    offset: int = 0,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """SimCLR's normalized temperature-scaled cross-entropy (Chen et al., 2020, Eq. 1).

    For an anchor ``a`` with positive ``p`` among the 2N batch embeddings:
    ``l(a) = -log( exp(sim(a, p)/t) / sum_{b != a} exp(sim(a, b)/t) )``, with cosine ``sim``;
    the loss is the mean over the local anchors ``z1`` and ``z2``.

    Shapes: ``z1``, ``z2`` ``[n, D]`` are this rank's two views.  ``keys1``, ``keys2``
    ``[N, D]`` are the whole global batch (default: ``z1``, ``z2``, i.e. one process); the
    local rows sit at ``offset : offset + n`` in them.  Passing keys gathered with gradient
    gives every anchor the 2(N-1) negatives of the global batch.  ``negatives`` ``[K, D]``
    (SimCLR v2's MoCo-style memory) join every anchor's denominator as K more negatives.
    """
    keys1 = z1 if keys1 is None else keys1
    keys2 = z2 if keys2 is None else keys2
    n, big_n = z1.shape[0], keys1.shape[0]
    anchors = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    keys = F.normalize(torch.cat([keys1, keys2]).float(), dim=1)
    logits = anchors @ keys.T / temperature  # [2n, 2N]
    local = torch.arange(n, device=z1.device) + offset
    self_idx = torch.cat([local, local + big_n])
    pos_idx = torch.cat([local + big_n, local])
    rows = torch.arange(2 * n, device=z1.device)
    logits = logits.masked_fill(
        torch.zeros_like(logits, dtype=torch.bool).index_put_((rows, self_idx), torch.tensor(True)), float("-inf")
    )
    if negatives is not None:
        memory = F.normalize(negatives.float(), dim=1)
        logits = torch.cat([logits, anchors @ memory.T / temperature], dim=1)  # [2n, 2N + K]
    return F.cross_entropy(logits, pos_idx)
