"""Autoregressive context networks over a grid of patch embeddings.

CPC v2's context network (Henaff et al., 2020, Appendix A.2) is a PixelCNN-style stack of
residual blocks whose vertical convolution only looks up: the input is padded by one row at the
top and convolved with a ``2 x 1`` kernel without padding, so output row ``i`` mixes input rows
``i - 1`` and ``i``.  After ``n`` blocks the context ``c_{i,j}`` depends on rows ``i - n .. i`` and
never on a row below ``i``: exactly what predicting rows ``i + k`` from it needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MaskedConvBlock(nn.Module):
    """``c = 1x1(ReLU(2x1_valid(pad_top(1x3(ReLU(1x1(x)))))))``; returns ``x + c``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(dim, hidden, 1)
        self.horizontal = nn.Conv2d(hidden, hidden, (1, 3), padding=(0, 1))
        self.vertical = nn.Conv2d(hidden, hidden, (2, 1))  # applied after one row of top padding
        self.expand = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.horizontal(F.relu(self.reduce(x)))
        c = F.relu(self.vertical(F.pad(c, (0, 0, 1, 0))))
        return x + self.expand(c)


class MaskedConvContext(nn.Module):
    """``[B, D, G, W]`` patch embeddings -> contexts of the same shape; row ``i`` sees rows ``<= i`` only."""

    def __init__(self, dim: int, hidden: int = 256, blocks: int = 5) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(MaskedConvBlock(dim, hidden) for _ in range(blocks)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.relu(self.blocks(z))


class GridPredictor(nn.Module):
    """One prediction direction of CPC: a context network, a target projection and one ``W_k`` per offset.

    ``forward(z)`` with ``z`` ``[B, D, G, W]`` (rows along the prediction direction) returns the
    targets ``T z`` ``[B, G, W, t]`` and, for each offset ``k``, the predictions ``W_k c`` ``[B, G, W, t]``
    (the pseudo-code of Appendix A.2: 1x1 convolutions to ``target_dim`` for both).
    """

    def __init__(self, dim: int, offsets: Sequence[int], hidden: int = 256, blocks: int = 5,
                 target_dim: int = 64) -> None:
        super().__init__()
        self.offsets = tuple(offsets)
        self.context = MaskedConvContext(dim, hidden, blocks)
        self.target = nn.Linear(dim, target_dim)
        self.predictors = nn.ModuleList(nn.Linear(dim, target_dim) for _ in self.offsets)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        c = self.context(z).permute(0, 2, 3, 1)
        targets = self.target(z.permute(0, 2, 3, 1))
        return targets, [w_k(c) for w_k in self.predictors]
