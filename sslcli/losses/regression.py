"""Negative-free regression losses between a prediction and a target embedding (BYOL, SimSiam).

Neither function applies a stop-gradient: the caller passes a target that carries none (BYOL's
target network runs under ``torch.no_grad``; SimSiam passes ``z.detach()``), so SimSiam's
collapse demonstration (stop-gradient off) uses the very same loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslcli.losses.float32 import float32_loss


@float32_loss
def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's ``D(p, z) = -mean_i cos(p_i, z_i)`` (Chen & He, 2021, "Exploring Simple Siamese
    Representation Learning", Eq. 1; the paper's ``D(p, stopgrad(z))`` with the caller detaching ``z``).

    Shapes: ``p``, ``z`` ``[N, D]`` -> scalar in ``[-1, 1]``.  Computed in float32.
    """
    return -(F.normalize(p.float(), dim=1) * F.normalize(z.float(), dim=1)).sum(dim=1).mean()


@float32_loss
def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's ``mean_i || p_i/||p_i|| - z_i/||z_i|| ||^2 = mean_i (2 - 2 cos(p_i, z_i))``
    (Grill et al., 2020, "Bootstrap Your Own Latent", Eq. 2), ``z`` the target projection.

    Shapes: ``p``, ``z`` ``[N, D]`` -> scalar in ``[0, 4]``.  Computed in float32.
    """
    return 2 + 2 * negative_cosine(p, z)
