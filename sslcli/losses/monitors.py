"""Diagnostics logged next to the loss (never optimised)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def collapse_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised embeddings ``z`` ``[N, D]`` (SimSiam, Sec. 4.1).

    About ``1 / sqrt(D)`` for well-spread embeddings, 0 when every sample maps to the same
    point: the collapse that a wrong stop-gradient, queue or BN set-up produces.
    """
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()
