"""InvaSpread (Ye, Zhang, Yuen, Chang, CVPR 2019, "Unsupervised Embedding Learning via Invariant
and Spreading Instance Feature").

    x_hat = T(x)                                  # views[0]: the original (whole image, no augmentation),
                                                  # views[1]: one random augmentation of it
    f, f_hat = normalize(W h(cat[x, x_hat]))      # one encoder, one batch (shared BN statistics)
    P(j|i) = exp(f_j.f_i / t) / sum_{k!=i} exp(f_k.f_i / t)        # keys f_j, f_k detached
    loss = -1/2N sum_i [log P(pos(i)|i) + sum_{j!=i,pos(i)} log(1 - P(j|i))]

No memory bank and no momentum encoder: the negatives are the other 2(N-1) embeddings of the
global batch, gathered without gradient (the official code detaches the key side anyway).
``head_norm="bn"`` / ``mlp_hidden`` depart from the paper's single linear layer (small variant).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sslcli import distributed as dist
from sslcli.losses import collapse_std
from sslcli.losses.invaspread import invaspread_loss
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.heads import build_mlp


@register_method("invaspread")
class InvaSpread(Method):
    """InvaSpread (Ye et al., CVPR 2019): one encoder, (image, augmented) positives, in-batch negatives."""

    def __init__(self, encoder: Encoder, dim: int = 128, temperature: float = 0.1, mlp_hidden: int = 0,
                 head_norm: str | None = None) -> None:
        super().__init__(encoder)
        self.temperature = temperature
        hidden = [(mlp_hidden, head_norm, "relu")] if mlp_hidden else []
        self.head = build_mlp(encoder.dim, [*hidden, (dim, head_norm, None)])

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        if len(views) < 2:
            raise ValueError("invaspread needs two view groups: the original, then the augmented view")
        x, x_hat = views[:2]
        # One pass over originals and augmentations together, as the official code does: BN then
        # normalises both with the same statistics, so it cannot tell the two kinds of views apart.
        z = self.head(self.backbone(torch.cat([x, x_hat])))
        f, f_hat = z.chunk(2)
        loss = invaspread_loss(f, f_hat, self.temperature, keys=dist.gather_no_grad(f),
                               keys_hat=dist.gather_no_grad(f_hat), offset=dist.rank() * f.shape[0])
        return StepOutput(loss, {"z_std": collapse_std(z)}, embedding=f)
