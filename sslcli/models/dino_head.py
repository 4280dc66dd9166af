"""DINO's projection head (Caron et al. 2021, official code: facebookresearch/dino, ``DINOHead``).

    MLP (3 layers, hidden 2048, GELU, no BN) -> 256-d bottleneck -> L2 normalisation
    -> weight-normalised Linear(256, K = 65536, bias=False)

The last layer is ``w_k = g_k * v_k / ||v_k||`` per output row.  With ``norm_last_layer`` the gain
``g`` is fixed to 1 (filled with 1, not trained), so every logit is the cosine between the
bottleneck and a prototype direction ``v_k``: the logits stay in [-1, 1] and the temperatures set
the sharpness alone, which the paper found necessary for stable ViT-B training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from sslcli.models.heads import build_mlp, mlp_layers


class DINOHead(nn.Module):
    """``forward(h) = last_layer(bottleneck(h))``: ``[B, in_dim]`` -> ``[B, out_dim]`` logits."""

    def __init__(self, in_dim: int, out_dim: int = 65536, *, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        self.mlp = build_mlp(in_dim, mlp_layers(hidden_dim, bottleneck_dim, layers, norm="bn" if use_bn else None,
                                                act="gelu"))
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):  # the official init: truncated normal, std 0.02
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0  # g, [out_dim, 1]
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    @property
    def gain(self) -> nn.Parameter:
        """The weight-norm gain ``g`` of the last layer (fixed to 1 with ``norm_last_layer``)."""
        return self.last_layer.parametrizations.weight.original0

    def bottleneck(self, h: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck embedding ``[B, bottleneck_dim]``."""
        return F.normalize(self.mlp(h), dim=-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(h))
