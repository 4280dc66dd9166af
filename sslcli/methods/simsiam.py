"""SimSiam (Chen & He, 2021, "Exploring Simple Siamese Representation Learning").

Algorithm 1 of the paper:

    z1, z2 = f(x1), f(x2)                     # backbone + 3-layer projector (BN on every layer)
    p1, p2 = h(z1), h(z2)                     # predictor 2048 -> 512 -> 2048
    L = D(p1, z2) / 2 + D(p2, z1) / 2         # D(p, z) = -cos(p, stopgrad(z))

One network, no EMA, no negatives: the stop-gradient alone prevents collapse (Sec. 4.1);
``stop_gradient: false`` removes it and the embeddings collapse within a few steps.  Heads as
in the official code: the projector's last BN has no affine (its bias would be removed by
the BN anyway), the predictor's output layer has neither BN nor ReLU.  ``proj_last_norm: null`` drops the projector's
output BN: Table 4's "BN on hidden layers only" row (67.4 vs 68.1 linear accuracy).  The predictor keeps
the base learning rate throughout (``fix_pred_lr``), and weight decay applies to every
parameter, biases and BN included, as the official optimiser does (``wd_all: false`` exempts them, and
with LARS also from the trust ratio, as SimCLR's and BYOL's LARS do).
"""

from __future__ import annotations

from typing import Any

import torch

from sslcli.engine.optim import param_groups
from sslcli.losses import negative_cosine
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.heads import build_mlp, mlp_layers


@register_method("simsiam")
class SimSiam(Method):
    """SimSiam (Chen & He, 2021): shared encoder + predictor, negative cosine with stop-gradient, no negatives."""

    def __init__(self, encoder: Encoder, dim: int = 2048, proj_hidden: int = 2048, proj_layers: int = 3,
                 pred_hidden: int = 512, stop_gradient: bool = True, fix_pred_lr: bool = True,
                 proj_last_norm: str | None = "bn_noaffine", wd_all: bool = True) -> None:
        super().__init__(encoder)
        self.stop_gradient, self.fix_pred_lr, self.wd_all = stop_gradient, fix_pred_lr, wd_all
        self.projector = build_mlp(encoder.dim, mlp_layers(proj_hidden, dim, proj_layers, last_norm=proj_last_norm))
        self.predictor = build_mlp(dim, mlp_layers(pred_hidden, dim, 2))

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        x1, x2 = views[:2]
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if self.stop_gradient else (z1, z2)
        loss = negative_cosine(p1, t2) / 2 + negative_cosine(p2, t1) / 2
        return StepOutput(loss, embedding=z1)

    def param_groups(self) -> list[dict]:
        groups = param_groups(self, fixed_lr=(self.predictor,) if self.fix_pred_lr else ())
        return [{**group, "apply_wd": True} for group in groups] if self.wd_all else groups

    def describe(self) -> dict[str, str]:
        return {"stop_gradient": "on" if self.stop_gradient else "OFF (the paper's ablation: expect collapse)",
                "predictor_lr": "fixed" if self.fix_pred_lr else "scheduled"}
