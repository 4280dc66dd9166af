"""Knowledge distillation with soft teacher labels (SimCLR v2's third stage).

Chen et al., 2020, "Big Self-Supervised Models are Strong Semi-Supervised Learners", Eq. 2:

    L = - sum_x sum_y P_T(y | x; t) log P_S(y | x; t),   P(y | x; t) = softmax(logits / t)_y

averaged over the batch here.  The teacher's probabilities are fixed targets (no gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslcli.losses.float32 import float32_loss


@float32_loss
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of the student's tempered softmax against the teacher's, mean over the batch.

    Shapes: both ``[B, C]``.  Computed in float32; ``teacher_logits`` is detached.
    """
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be positive, got {temperature}")
    target = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    return -(target * F.log_softmax(student_logits.float() / temperature, dim=1)).sum(dim=1).mean()
