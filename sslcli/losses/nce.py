"""Noise-contrastive estimation against a memory bank (InstDisc, CMC).

Wu et al., 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
Sec. 3.2 (Eqs. 4-7), after Gutmann & Hyvarinen (2010).  With ``N`` bank rows ``v``, feature
``f`` of sample ``i`` and temperature ``tau``:

    P(i | f) = exp(v_i . f / tau) / Z                          # Z held fixed, see estimate_partition
    h(i, f)  = P(i | f) / (P(i | f) + m * P_n),  P_n = 1 / N    # posterior "f came from the data"
    L        = -log h(i, f_i) - sum_{j in noise} log(1 - h(j, f_i))

averaged over the batch.  In log space ``-log h = softplus(log(m P_n) - log P)`` and
``-log(1 - h) = softplus(log P - log(m P_n))``, which cannot overflow for any similarity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sslcli.losses.float32 import float32_loss


def _noise_sims(f: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``[B, m]`` cosines of ``f`` ``[B, D]`` with shared ``[m, D]`` or per-sample ``[B, m, D]`` noise."""
    if noise.ndim == 2:
        return f @ noise.T
    if noise.ndim == 3 and noise.shape[0] == f.shape[0]:
        return torch.einsum("bd,bmd->bm", f, noise)
    raise ValueError(f"noise of shape {tuple(noise.shape)} does not fit features {tuple(f.shape)}")


@float32_loss
def nce_loss(
    features: torch.Tensor,
    positives: torch.Tensor,
    noise: torch.Tensor,
    temperature: float,
    partition: float | torch.Tensor,
    num_samples: int,
) -> torch.Tensor:
    """InstDisc's NCE loss (module docstring), mean over the batch.

    Shapes: ``features`` ``[B, D]`` (the batch's embeddings, with gradient); ``positives``
    ``[B, D]`` (each sample's own bank row ``v_i``); ``noise`` ``[m, D]``, one set of ``m``
    noise rows shared by the whole batch, or ``[B, m, D]``, a set per sample as lemniscate
    draws (sharing costs one ``[B, m]`` matmul instead of ``B`` gathers of ``m`` rows; the
    estimate is unbiased either way).  ``partition`` is ``Z`` (scalar), ``num_samples`` is ``N``.
    Inputs are L2-normalised here; computed in float32 whatever the autocast dtype.
    """
    f = F.normalize(features.float(), dim=-1)
    pos = F.normalize(positives.float(), dim=-1)
    neg = F.normalize(noise.float(), dim=-1)
    m = neg.shape[-2]
    log_z = torch.as_tensor(partition, dtype=torch.float32, device=f.device).log()
    log_noise = math.log(m / num_samples)  # log(m * P_n)
    log_p_pos = (f * pos).sum(dim=1) / temperature - log_z  # [B]
    log_p_noise = _noise_sims(f, neg) / temperature - log_z  # [B, m]
    loss_pos = F.softplus(log_noise - log_p_pos)
    loss_noise = F.softplus(log_p_noise - log_noise).sum(dim=1)
    return (loss_pos + loss_noise).mean()


@float32_loss
@torch.no_grad()
def estimate_partition(features: torch.Tensor, noise: torch.Tensor, temperature: float, num_samples: int) -> torch.Tensor:
    """Monte-Carlo ``Z ~= N * mean_j exp(v_j . f / tau)`` over noise rows and batch samples (Eq. 7).

    Shapes as in :func:`nce_loss`; returns a float32 scalar.  The paper (and lemniscate) estimate
    it once, on the first batch, and keep it fixed: a ``Z`` that moves with every batch would
    make ``P`` a moving target.  lemniscate also averages in the positive's term, 1 of ``m + 1``.
    """
    f = F.normalize(features.float(), dim=-1)
    neg = F.normalize(noise.float(), dim=-1)
    return (_noise_sims(f, neg) / temperature).exp().mean() * num_samples
