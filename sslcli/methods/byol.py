"""BYOL (Grill et al., 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning").

Algorithm 1 of the paper:

    z1, z2 = g(f(x1)), g(f(x2))               # online: backbone + projector
    p1, p2 = q(z1), q(z2)                     # online predictor
    z1', z2' = g'(f'(x1)), g'(f'(x2))  no grad  # target = EMA of backbone + projector
    loss = l(p1, z2') + l(p2, z1')            # l(p, z) = 2 - 2 cos(p, z), batch mean
    theta' <- tau theta' + (1 - tau) theta,  tau: 0.996 -> 1 (cosine)

No negatives: the predictor, the EMA target and the BN in the heads keep it from collapsing.
``head_norm: null`` drops the BN (the paper's Table 5(b) ablation) and shows the collapse.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sslcli.engine.ema import ema_update_, make_target
from sslcli.engine.schedule import schedule
from sslcli.errors import UserError
from sslcli.losses import byol_loss
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.heads import build_mlp, mlp_layers

HEAD_NORMS = ("bn", "ln", None)


@register_method("byol")
class BYOL(Method):
    """BYOL (Grill et al., 2020): online projector + predictor regress an EMA target's projection, no negatives."""

    def __init__(self, encoder: Encoder, dim: int = 256, mlp_hidden: int = 4096, head_norm: str | None = "bn",
                 momentum: float = 0.996, momentum_end: float = 1.0) -> None:
        super().__init__(encoder)
        if head_norm not in HEAD_NORMS:
            raise UserError(f"method_args.head_norm must be one of {list(HEAD_NORMS)} (null: no norm), "
                            f"got {head_norm!r}")
        self.momentum, self.momentum_end, self.head_norm = momentum, momentum_end, head_norm
        self.online = nn.Sequential(encoder, build_mlp(encoder.dim, mlp_layers(mlp_hidden, dim, 2, norm=head_norm)))
        self.predictor = build_mlp(dim, mlp_layers(mlp_hidden, dim, 2, norm=head_norm))
        self.target = make_target(self.online)

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        x1, x2 = views[:2]
        z1, z2 = self.online(x1), self.online(x2)
        with torch.no_grad():
            t1, t2 = self.target(x1), self.target(x2)
        loss = byol_loss(self.predictor(z1), t2) + byol_loss(self.predictor(z2), t1)
        return StepOutput(loss, embedding=z1)

    def after_step(self, progress: float) -> None:
        ema_update_(self.target, self.online, self.tau(progress))

    def tau(self, progress: float) -> float:
        """The target's EMA momentum: ``1 - (1 - tau_base) (cos(pi k / K) + 1) / 2`` (BYOL, Sec. 3.2)."""
        return schedule(progress, 1.0, start=self.momentum, end=self.momentum_end)

    def describe(self) -> dict[str, str]:
        if self.head_norm is None:
            return {"heads": "no norm layers (the paper's ablation: expect the embeddings to collapse)"}
        return {"heads": f"Linear-{self.head_norm.upper()}-ReLU-Linear projector and predictor"}
