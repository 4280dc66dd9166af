"""MoCo v3 (Chen, Xie, He, 2021, "An Empirical Study of Training Self-Supervised Vision Transformers").

Algorithm 1 of the paper, with keys gathered across ranks:

    q1, q2 = g_q(f_q(x1)), g_q(f_q(x2))       # backbone + projector + predictor
    k1, k2 = f_k(x1), f_k(x2)   no grad       # momentum encoder = EMA of backbone + projector
    loss = ctr(q1, k2) + ctr(q2, k1)          # ctr(q, k) = 2t * CE(q k^T / t, arange), in-batch keys
    f_k <- m f_k + (1 - m) f_q,  m: 0.99 -> 1 (cosine)

No queue: the negatives are the other keys of the global batch.  Heads follow the official
code: every Linear is followed by BN (+ ReLU on hidden layers); the projector's and (for ViT)
the predictor's last BN have no affine.  ``--freeze-patch-embed`` (a pretrain option) keeps a
ViT's random patch projection fixed, the paper's fix for training instability.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sslcli import distributed as dist
from sslcli.engine.ema import ema_update_, make_target
from sslcli.engine.schedule import schedule
from sslcli.losses import collapse_std, in_batch_contrastive
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.heads import build_mlp, mlp_layers


@register_method("mocov3")
class MoCoV3(Method):
    """MoCo v3 (Chen, Xie, He, 2021): projector + predictor, momentum encoder, symmetric in-batch InfoNCE."""

    def __init__(self, encoder: Encoder, dim: int = 256, mlp_hidden: int = 4096, proj_layers: int = 3,
                 pred_last_bn: bool = True, temperature: float = 0.2, momentum: float = 0.99,
                 momentum_end: float = 1.0) -> None:
        super().__init__(encoder)
        self.temperature, self.momentum, self.momentum_end = temperature, momentum, momentum_end
        projector = build_mlp(encoder.dim, mlp_layers(mlp_hidden, dim, proj_layers, last_norm="bn_noaffine"))
        self.base = nn.Sequential(encoder, projector)
        self.predictor = build_mlp(dim, mlp_layers(mlp_hidden, dim, 2, last_norm="bn_noaffine" if pred_last_bn else None))
        self.momentum_encoder = make_target(self.base)

    def ctr(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        keys = dist.gather_no_grad(k)  # keys carry no gradient: gathering without it is exact
        return 2 * self.temperature * in_batch_contrastive(q, keys, self.temperature, offset=dist.rank() * q.shape[0])

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        x1, x2 = views[:2]
        q1, q2 = self.predictor(self.base(x1)), self.predictor(self.base(x2))
        with torch.no_grad():
            k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        loss = self.ctr(q1, k2) + self.ctr(q2, k1)
        return StepOutput(loss, {"q_std": collapse_std(q1), "k_std": collapse_std(k1)}, embedding=q1)

    def after_step(self, progress: float) -> None:
        ema_update_(self.momentum_encoder, self.base, schedule(progress, 1.0, start=self.momentum, end=self.momentum_end))
