"""Barlow Twins' redundancy-reduction loss (Zbontar et al., 2021, "Barlow Twins: Self-Supervised
Learning via Redundancy Reduction", Eq. 1 and Algorithm 1)."""

from __future__ import annotations

import torch

from sslcli.losses.float32 import float32_loss


def batch_standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``(z - mean) / sqrt(var + eps)`` per dimension over the batch (biased variance), exactly
    what the official code's ``BatchNorm1d(affine=False)`` does in training mode."""
    mean = z.mean(dim=0, keepdim=True)
    var = (z - mean).pow(2).mean(dim=0, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


@float32_loss
def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3) -> torch.Tensor:
    """``L = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2`` with ``C = z1n^T z2n / N``, the
    cross-correlation of the batch-standardised embeddings (``z1n``, ``z2n``).

    Shapes: ``z1``, ``z2`` ``[N, D]`` (the two views of the same N images) -> scalar.  The
    statistics and ``C`` are over the rows given: for the paper's global batch, pass embeddings
    gathered from every rank (``sslcli.distributed.gather_with_grad``).  Computed in float32,
    autocast off: ``C`` sums N products and its off-diagonal squares are summed D^2 times.
    """
    with torch.autocast(z1.device.type, enabled=False):
        c = batch_standardise(z1.float()).T @ batch_standardise(z2.float()) / z1.shape[0]
        on_diag = torch.diagonal(c)
        return (1 - on_diag).pow(2).sum() + lambd * (c.pow(2).sum() - on_diag.pow(2).sum())
