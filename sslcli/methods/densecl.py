"""DenseCL (Wang, Zhang, Shen, Kong, Li, CVPR 2021, "Dense Contrastive Learning for Self-Supervised
Visual Pre-Training", arXiv:2011.09157; official code github.com/WXinlong/DenseCL).

    F_q = f_q(x_q);  F_k = f_k(x_k)  no grad, Shuffling BN   # backbone maps, S x S locations
    q, r = g(avgpool(F_q)), h(F_q)                            # global MLP; dense head: 1x1 conv-ReLU-1x1 conv
    k, t = g_k(avgpool(F_k)), h_k(F_k)                        # key encoder = EMA of (f, g, h)
    c_i = argmax_j cos(F_q[i], F_k[j])                        # correspondence from BACKBONE features
    L_g = InfoNCE(q, k, queue)                                # MoCo v2
    L_d = mean_i InfoNCE(r_i, t_{c_i}, dense_queue)           # every location is a query
    loss = (1 - lambda) L_g + lambda L_d                      # lambda = 0.5, tau = 0.2 for both
    enqueue(k); enqueue_dense(avgpool(t)); (f_k, g_k, h_k) <- m (f_k, g_k, h_k) + (1 - m) (f, g, h)

The dense negatives are one vector per key image, the average of its dense head outputs, as in
the official code.  A 1x1 convolution is a linear layer applied at every location, so the dense
head is a :func:`build_mlp` head run on the ``[B * S * S, C]`` locations (BN over locations, when
asked for, is BatchNorm2d's statistics).  CNN backbones only: the paper has no ViT variant.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslcli import distributed as dist
from sslcli.engine import shuffle_bn
from sslcli.engine.ema import ema_update_, make_target
from sslcli.engine.feature_queue import FeatureQueue
from sslcli.engine.metrics import info
from sslcli.engine.schedule import schedule
from sslcli.errors import UserError
from sslcli.losses import collapse_std, info_nce
from sslcli.losses.dense import dense_correspondence, dense_info_nce
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.heads import Layer, build_mlp


class DenseNeck(nn.Module):
    """Backbone plus DenseCL's two heads: ``x -> (z [B, D], dense [B, P, D], backbone map [B, P, C])``."""

    def __init__(self, encoder: Encoder, layers: list[Layer]) -> None:
        super().__init__()
        self.encoder = encoder
        self.global_head = build_mlp(encoder.dim, layers)
        self.dense_head = build_mlp(encoder.dim, layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap = self.encoder.forward_dense(x)
        if fmap.dim() != 4:
            raise UserError(f"densecl needs a convolutional backbone with a spatial feature map; "
                            f"'{self.encoder.spec.arch}' gives tokens {tuple(fmap.shape)} (use e.g. --arch resnet50)")
        b, c = fmap.shape[:2]
        feats = fmap.flatten(2).transpose(1, 2)  # [B, P, C], P = H * W locations
        z = self.global_head(feats.mean(dim=1))  # adaptive average pool, as the encoder's own pooling
        dense = self.dense_head(feats.reshape(-1, c)).view(b, feats.shape[1], -1)
        return z, dense, feats


@register_method("densecl")
class DenseCL(Method):
    """DenseCL (Wang et al., CVPR 2021): MoCo v2 plus a dense InfoNCE between corresponding locations."""

    def __init__(self, encoder: Encoder, dim: int = 128, mlp_hidden: int = 2048, head_norm: str | None = None,
                 queue_size: int = 65536, momentum: float = 0.999, momentum_end: float | None = None,
                 temperature: float = 0.2, loss_lambda: float = 0.5, shuffle_splits: int = 4) -> None:
        super().__init__(encoder)
        if not 0.0 <= loss_lambda <= 1.0:
            raise UserError(f"method_args.loss_lambda must lie in [0, 1], got {loss_lambda}")
        self.temperature, self.loss_lambda, self.shuffle_splits = temperature, loss_lambda, shuffle_splits
        self.momentum, self.momentum_end = momentum, momentum if momentum_end is None else momentum_end
        hidden: list[Layer] = [(mlp_hidden, head_norm, "relu")] if mlp_hidden else []
        self.query = DenseNeck(encoder, [*hidden, (dim, head_norm, None)])
        self.key = make_target(self.query)
        self.queue = FeatureQueue(queue_size, dim)
        self.dense_queue = FeatureQueue(queue_size, dim)
        self._reported, self._dense_locations = False, 0  # the grid size is known at the first step only

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return shuffle_bn.shuffled_forward(self.key, x, self.shuffle_splits)

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        x_q, x_k = views[:2]
        q, q_dense, q_feats = self.query(x_q)
        k, k_dense, k_feats = self._keys(x_k)
        match = dense_correspondence(q_feats, k_feats)  # [B, P]
        loss_global = info_nce(q, k, self.queue.negatives(), self.temperature)
        loss_dense = dense_info_nce(q_dense, k_dense, match, self.dense_queue.negatives(), self.temperature)
        loss = (1.0 - self.loss_lambda) * loss_global + self.loss_lambda * loss_dense
        self.queue.enqueue(dist.gather_no_grad(F.normalize(k.float(), dim=1)))
        self.dense_queue.enqueue(dist.gather_no_grad(F.normalize(k_dense.float().mean(dim=1), dim=1)))
        logs = {"loss_global": loss_global.detach(), "loss_dense": loss_dense.detach(),
                "q_std": collapse_std(q), "dense_std": collapse_std(q_dense.reshape(-1, q_dense.shape[-1]))}
        self._dense_locations = match.shape[1]  # reported once by after_step, outside a compiled forward
        return StepOutput(loss, logs, embedding=q)

    def after_step(self, progress: float) -> None:
        if not self._reported:
            self._reported = True
            info(f"  dense locations per view: {self._dense_locations}" + ("" if self._dense_locations > 1 else
                 " (a 1x1 map: the dense loss is only a second global loss; use larger crops)"))
        m = schedule(progress, 1.0, start=self.momentum, end=self.momentum_end)
        ema_update_(self.key, self.query, m)

    def describe(self) -> dict[str, str]:
        return {"shuffle_bn": shuffle_bn.mode(self.shuffle_splits), "queues": f"2 x {self.queue.size}",
                "loss": f"(1 - {self.loss_lambda}) global + {self.loss_lambda} dense"}
