"""Pixel reconstruction losses of masked image modelling (MAE)."""

from __future__ import annotations

import math

import torch


def normalized_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's norm-pix target: each patch standardised by its own mean and (unbiased) variance,
    ``(x - mean) / sqrt(var + eps)`` over the ``p*p*C`` values (He et al. 2022, Sec. 3 "Reconstruction
    target"; official ``forward_loss``).  Shapes: ``[B, N, P]`` -> ``[B, N, P]``."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's loss: the per-patch mean squared error, averaged over the masked patches only,
    ``L = sum_i m_i mean_j (pred_ij - target_ij)^2 / sum_i m_i`` (He et al. 2022, Sec. 3).

    Shapes: ``pred``, ``target`` ``[B, N, P]``; ``mask`` ``[B, N]``, 1 = masked -> scalar.  float32.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def kl_to_uniform(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``KL(q || U_K) = sum_k q_k log(K q_k)``, ``q = softmax(logits)`` over ``dim``, averaged over every other
    position: the dVAE's prior term with DALL-E's uniform prior (Ramesh et al. 2021, Sec. 2.1).

    Shapes: ``logits`` ``[B, K, h, w]`` (any layout, ``K`` along ``dim``) -> scalar in ``[0, log K]``.  float32.
    """
    log_q = torch.log_softmax(logits.float(), dim=dim)
    return (log_q.exp() * (log_q + math.log(logits.shape[dim]))).sum(dim=dim).mean()
