"""Classification losses over discrete visual tokens (BEiT's masked image modelling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslcli.losses.float32 import float32_loss


@float32_loss
def masked_token_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BEiT's masked image modelling loss: ``-mean_{i in M} log p(z_i | x^M)`` over the masked positions ``M``
    only (Bao et al. 2022, Eq. 1).  As in the official code the head runs on the masked positions alone,
    so ``logits`` holds their rows, in the row-major order of ``mask``.

    Shapes: ``logits`` ``[M, K]``, ``tokens`` ``[B, N]`` long in ``[0, K)``, ``mask`` ``[B, N]`` bool with ``M``
    True entries, or the ``[M]`` long flat indices of those entries (row-major; computed on the host they
    spare the device the sync of a boolean index) -> scalar.  float32.
    """
    targets = tokens[mask] if mask.dtype == torch.bool else tokens.flatten()[mask]
    return F.cross_entropy(logits.float(), targets)
