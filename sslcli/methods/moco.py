"""MoCo v1 (He et al., 2020, "Momentum Contrast for Unsupervised Visual Representation Learning")
and MoCo v2 (Chen et al., 2020, "Improved Baselines with Momentum Contrastive Learning").

    q = normalize(g_q(f_q(x_q)))              # query: backbone + head
    k = normalize(g_k(f_k(x_k)))  no grad     # key encoder = EMA of the query encoder, Shuffling BN
    loss = InfoNCE(q, k, queue, t)            # positive k, negatives = the K queued keys
    enqueue(all_gather(k)); (f_k, g_k) <- m (f_k, g_k) + (1 - m) (f_q, g_q)

v1 has a linear head and t = 0.07; v2 a 2-layer MLP head (no BN), blur and t = 0.2.  Both are
one-directional in the papers; ``symmetric=True`` adds the swapped term.  ``head_norm="bn"``
puts BN in the head (MoCo v3's choice); the papers' heads have none.  ``loss_chunk`` > 0 computes the same
InfoNCE that many queue rows at a time (``losses/chunked.py``: measured 2.3x faster, 4.6x less peak memory at
K = 65,536 on a CPU; docs/benchmarks.md); 0 keeps the reference ``info_nce``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from sslcli import distributed as dist
from sslcli.engine import shuffle_bn
from sslcli.engine.ema import ema_update_, make_target
from sslcli.engine.feature_queue import FeatureQueue
from sslcli.engine.schedule import schedule
from sslcli.losses import collapse_std, info_nce, info_nce_chunked
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.heads import build_mlp


@register_method("mocov2")
class MoCo(Method):
    """MoCo v2 (Chen et al., 2020): momentum key encoder, a queue of negatives, an MLP head."""

    def __init__(self, encoder: Encoder, dim: int = 128, mlp_hidden: int = 2048, head_norm: str | None = None,
                 queue_size: int = 65536, momentum: float = 0.999, momentum_end: float | None = None,
                 temperature: float = 0.2, symmetric: bool = False, shuffle_splits: int = 4,
                 loss_chunk: int = 0) -> None:
        super().__init__(encoder)
        self.temperature, self.symmetric, self.shuffle_splits = temperature, symmetric, shuffle_splits
        self.momentum, self.momentum_end = momentum, momentum if momentum_end is None else momentum_end
        hidden = [(mlp_hidden, head_norm, "relu")] if mlp_hidden else []
        self.query = nn.Sequential(encoder, build_mlp(encoder.dim, [*hidden, (dim, head_norm, None)]))
        self.key = make_target(self.query)
        self.queue = FeatureQueue(queue_size, dim)
        self.contrast = partial(info_nce_chunked, chunk_size=loss_chunk) if loss_chunk > 0 else info_nce

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(shuffle_bn.shuffled_forward(self.key, x, self.shuffle_splits), dim=1)

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        x1, x2 = views[:2]
        negatives = self.queue.negatives()
        q1, k2 = self.query(x1), self._keys(x2)
        loss = self.contrast(q1, k2, negatives, self.temperature)
        keys = k2
        if self.symmetric:
            q2, k1 = self.query(x2), self._keys(x1)
            loss = (loss + self.contrast(q2, k1, negatives, self.temperature)) / 2
            keys = torch.cat([k1, k2])
        self.queue.enqueue(dist.gather_no_grad(keys))
        return StepOutput(loss, {"q_std": collapse_std(q1), "k_std": collapse_std(keys)}, embedding=q1)

    def after_step(self, progress: float) -> None:
        m = schedule(progress, 1.0, start=self.momentum, end=self.momentum_end)
        ema_update_(self.key, self.query, m)

    def describe(self) -> dict[str, str]:
        return {"shuffle_bn": shuffle_bn.mode(self.shuffle_splits), "queue": str(self.queue.size)}


@register_method("mocov1")
class MoCoV1(MoCo):
    """MoCo v1 (He et al., CVPR 2020): momentum key encoder, a queue of negatives, a linear head."""

    def __init__(self, encoder: Encoder, dim: int = 128, mlp_hidden: int = 0, head_norm: str | None = None,
                 queue_size: int = 65536, momentum: float = 0.999, momentum_end: float | None = None,
                 temperature: float = 0.07, symmetric: bool = False, shuffle_splits: int = 4,
                 loss_chunk: int = 0) -> None:
        super().__init__(encoder, dim, mlp_hidden, head_norm, queue_size, momentum, momentum_end, temperature,
                         symmetric, shuffle_splits, loss_chunk)
