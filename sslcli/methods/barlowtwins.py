"""Barlow Twins (Zbontar et al., 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction").

Algorithm 1 of the paper, over the global batch:

    z1, z2 = g(f(x1)), g(f(x2))               # backbone + projector 3 x 8192 (Linear-BN-ReLU x2, Linear)
    z1n, z2n = standardise(z1), standardise(z2)   # per dimension, over the batch of every rank
    C = z1n^T z2n / N                         # D x D cross-correlation
    L = sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2,   lambda = 5e-3

Embeddings are gathered from every rank (with gradient) before the loss, so its statistics and
``C`` are the global batch's and a multi-rank step equals the single-process one; the official
code gets the same forward value from SyncBN and an all-reduce of ``C``.  The projector's last
Linear has no bias (the standardisation would remove it), as in the official code.
"""

from __future__ import annotations

from typing import Any

import torch

from sslcli import distributed as dist
from sslcli.losses import barlow_twins_loss
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.heads import build_mlp, mlp_layers


@register_method("barlowtwins")
class BarlowTwins(Method):
    """Barlow Twins (Zbontar et al., 2021): cross-correlation of two views' embeddings pushed to the identity."""

    def __init__(self, encoder: Encoder, proj_hidden: int = 8192, proj_dim: int = 8192, proj_layers: int = 3,
                 lambd: float = 5e-3) -> None:
        super().__init__(encoder)
        self.lambd = lambd
        self.projector = build_mlp(encoder.dim, mlp_layers(proj_hidden, proj_dim, proj_layers))
        self.projector[-1].register_parameter("bias", None)

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        x1, x2 = views[:2]
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        loss = barlow_twins_loss(dist.gather_with_grad(z1), dist.gather_with_grad(z2), self.lambd)
        return StepOutput(loss, embedding=z1)
