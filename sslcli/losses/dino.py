"""DINO's self-distillation loss and centre (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers", Eq. 3 and Sec. 3.1; official code ``DINOLoss``).

    P_t = softmax((g_t(x_t) - C) / tau_t)        teacher, global crops t only, no gradient
    P_s = softmax(g_s(x_s) / tau_s)              student, every crop s
    L   = mean over pairs (t, s), s != t, of  -sum_k P_t[k] log P_s[k]   (mean over the batch)
    C  <- m C + (1 - m) mean_{global batch} g_t(x_t)

Centring stops one dimension from dominating, sharpening (tau_t < tau_s) stops the uniform
output: together they avoid collapse without negatives or a predictor.  Everything is computed
in float32: the K = 65536-way softmax at tau_t = 0.04 overflows in fp16 (DINO's known NaN pitfall).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sslcli import distributed as dist
from sslcli.losses.float32 import float32_loss


@float32_loss
def dino_loss(student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor], center: torch.Tensor, *,
              student_temp: float = 0.1, teacher_temp: float | torch.Tensor = 0.04) -> torch.Tensor:
    """Cross-entropy between the centred, sharpened teacher and the student, over all crop pairs.

    ``student_out``: one ``[B, K]`` logit tensor per student crop, the teacher's crops first (crop
    ``i < len(teacher_out)`` of the student is the same image crop as the teacher's crop ``i``, and
    that pair is skipped).  ``teacher_out``: one ``[B, K]`` per global crop (detached here).
    ``center``: ``[K]`` or ``[1, K]``.  Returns the mean over the ``T * S - T`` pairs of the
    batch-mean cross-entropy.
    """
    if not 0 < len(teacher_out) <= len(student_out):
        raise ValueError(f"need 1..{len(student_out)} teacher crops, got {len(teacher_out)}")
    targets = F.softmax((torch.stack(list(teacher_out)).detach().float() - center.float()) / teacher_temp, dim=-1)
    log_probs = F.log_softmax(torch.stack(list(student_out)).float() / student_temp, dim=-1)
    # cross[t, s] = mean_b -sum_k P_t log P_s, for every (teacher crop, student crop) pair at once
    cross = -torch.einsum("tbk,sbk->ts", targets, log_probs) / targets.shape[1]
    same_crop = torch.eye(len(teacher_out), len(student_out), dtype=torch.bool, device=cross.device)
    # Zeroed, not indexed out: a boolean index's data-dependent shape is a graph break under torch.compile.
    return cross.masked_fill(same_crop, 0.0).sum() / (cross.numel() - len(teacher_out))


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """The new centre ``m C + (1 - m) mean(teacher_out)``, the mean taken over every rank's rows.

    ``teacher_out``: ``[N, K]`` (all global crops of the local batch, stacked).  The mean is exact
    across ranks: the all-reduced sum of rows divided by ``N * world_size`` (equal ``N`` per rank).
    """
    batch_sum = dist.all_reduce_sum_(teacher_out.detach().float().sum(dim=0, keepdim=True))
    batch_center = batch_sum / (teacher_out.shape[0] * dist.world_size())
    return center * momentum + batch_center.reshape(center.shape).to(center.dtype) * (1 - momentum)

