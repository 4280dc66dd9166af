"""SimCLR v1 (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

    h = f(x)                      # backbone, pooled
    z = g(h)                      # Linear-BN-ReLU-Linear(-BN) projector
    loss = NT-Xent(z1, z2, t)     # 2(N-1) negatives from the global batch, gathered with grad
"""

from __future__ import annotations

from typing import Any

import torch

from sslcli import distributed as dist
from sslcli.losses import collapse_std, nt_xent
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.heads import build_mlp, mlp_layers


@register_method("simclr")
class SimCLR(Method):
    """SimCLR v1 (Chen et al., 2020): two views, MLP projector, NT-Xent over in-batch negatives of all ranks."""

    def __init__(self, encoder: Encoder, temperature: float = 0.1, proj_hidden: int = 2048, proj_dim: int = 128,
                 proj_layers: int = 2, proj_last_bn: bool = True) -> None:
        super().__init__(encoder)
        self.temperature = temperature
        last_norm = "bn" if proj_last_bn else None
        self.projector = build_mlp(encoder.dim, mlp_layers(proj_hidden, proj_dim, proj_layers, last_norm=last_norm))

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        x1, x2 = views[:2]
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        loss = nt_xent(z1, z2, self.temperature, keys1=dist.gather_with_grad(z1), keys2=dist.gather_with_grad(z2),
                       offset=dist.rank() * z1.shape[0])
        return StepOutput(loss, {"z_std": collapse_std(z1)}, embedding=z1)
