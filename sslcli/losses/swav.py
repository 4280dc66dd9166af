"""SwAV's swapped prediction (Caron et al., 2020, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", Eq. 2-3 and Sec. 3.2 for multi-crop).

Each crop ``t``'s prototype scores ``z_t . c_k`` predict the code ``q_s`` of another crop ``s``:

    l(z_t, q_s) = - sum_k q_s^(k) log softmax(z_t . C / tau)^(k)
    L = mean over code crops s [ mean over crops t != s [ mean over the batch of l(z_t, q_s) ] ]

Codes come from the global crops only (their Sinkhorn codes, fixed targets); predictions come
from every crop, global and local, other than the code's own.  With two crops this is the
paper's ``(l(z_1, q_2) + l(z_2, q_1)) / 2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sslcli.losses.float32 import float32_loss


@float32_loss
def swav_loss(scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], temperature: float = 0.1) -> torch.Tensor:
    """Swapped-prediction cross-entropy, averaged over the ``(code crop, predicting crop)`` pairs.

    Shapes: ``scores`` holds one ``[B, K]`` tensor per crop (cosine of the L2-normalised embedding
    with each L2-normalised prototype), the code crops first; ``codes`` holds ``[B, K]`` codes
    (rows summing to 1) of the first ``len(codes)`` crops, detached here.  Computed in float32.
    """
    if len(scores) < 2 or not 1 <= len(codes) <= len(scores):
        raise ValueError(f"swav_loss needs >= 2 crops and 1..{len(scores)} code crops, got {len(scores)}, {len(codes)}")
    if temperature <= 0:
        raise ValueError(f"swav temperature must be positive, got {temperature}")
    log_probs = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]
    total = scores[0].new_zeros((), dtype=torch.float32)
    for s, code in enumerate(codes):
        q = code.detach().float()
        preds = [lp for t, lp in enumerate(log_probs) if t != s]
        total = total + sum(-(q * lp).sum(dim=1).mean() for lp in preds) / len(preds)
    return total / len(codes)
