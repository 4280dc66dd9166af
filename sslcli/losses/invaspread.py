"""Invariant and Spreading instance loss (Ye et al., CVPR 2019, "Unsupervised Embedding Learning
via Invariant and Spreading Instance Feature"; the official code's ``BatchCriterion``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslcli.losses.float32 import float32_loss


@float32_loss
def invaspread_loss(
    f: torch.Tensor,
    f_hat: torch.Tensor,
    temperature: float = 0.1,
    *,
    keys: torch.Tensor | None = None,
    keys_hat: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """InvaSpread's instance softmax with binary spreading terms over the 2N batch embeddings.

    With the 2N L2-normalised embeddings (``f`` of the originals, ``f_hat`` of their augmented
    copies), every one of them is an anchor ``i`` with positive ``pos(i)`` (its other view) and

        P(j | i) = exp(f_j . f_i / t) / sum_{k != i} exp(f_k . f_i / t)
        L = -1/(2N) sum_i [ log P(pos(i) | i) + sum_{j != i, pos(i)} log(1 - P(j | i)) ]

    The first term pulls the two views of an instance together (invariance), the second pushes
    every other instance away (spreading).  As in the official code (``x.t().data``), the key
    side ``f_j`` / ``f_k`` is detached: gradients reach the embeddings only as anchors ``f_i``.

    Shapes: ``f``, ``f_hat`` ``[n, D]`` are this rank's rows.  ``keys``, ``keys_hat`` ``[N, D]``
    are the whole global batch (default: ``f``, ``f_hat``, i.e. one process), gathered without
    gradient; the local rows sit at ``offset : offset + n`` in them, so each anchor sees the
    2(N - 1) negatives of the global batch.  The result is the mean over the 2n local anchors,
    computed in float32; averaging it over equal-sized ranks gives the global ``L``.
    """
    keys = f if keys is None else keys
    keys_hat = f_hat if keys_hat is None else keys_hat
    n, big_n = f.shape[0], keys.shape[0]
    if big_n < 2:
        raise ValueError("invaspread_loss needs at least 2 instances in the (global) batch")
    anchors = F.normalize(torch.cat([f, f_hat]).float(), dim=1)
    bank = F.normalize(torch.cat([keys, keys_hat]).detach().float(), dim=1)
    logits = anchors @ bank.T / temperature  # [2n, 2N]

    local = torch.arange(n, device=f.device) + offset
    self_idx = torch.cat([local, local + big_n])
    pos_idx = torch.cat([local + big_n, local])
    rows = torch.arange(2 * n, device=f.device)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[rows, self_idx] = True
    logits = logits.masked_fill(is_self, float("-inf"))
    log_z = torch.logsumexp(logits, dim=1, keepdim=True)
    log_p = logits - log_z  # log P(j | i); -inf at j = i

    # log(1 - P) as log1p(-P) is accurate for P <= 1/2, i.e. everywhere but at a row's largest logit, where
    # 1 - P cancels (P rounds to 1 when one key dominates): there it is the leave-one-out log-partition.
    top = torch.zeros_like(is_self)
    top[rows, logits.argmax(dim=1)] = True
    log_1m_top = torch.logsumexp(logits.masked_fill(top, float("-inf")), dim=1, keepdim=True) - log_z
    log_1m_p = torch.where(top, log_1m_top, torch.log1p(-torch.exp(log_p.masked_fill(top, -1.0))))

    is_neg = ~is_self
    is_neg[rows, pos_idx] = False
    log_pos = log_p[rows, pos_idx]
    log_not_neg = torch.where(is_neg, log_1m_p, 0.0).sum(dim=1)
    return -(log_pos + log_not_neg).mean()
