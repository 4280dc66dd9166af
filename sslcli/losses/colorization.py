"""Colourisation as classification (Zhang, Isola, Efros, ECCV 2016, "Colorful Image Colorization", Sec. 2.1-2.2).

The ab plane is cut into ``grid``-unit squares; the squares that sRGB colours reach are the Q classes (for a grid of
10 the paper counts 313; sampling the sRGB cube on a 48^3 lattice and rounding to the nearest centre finds 261). A pixel's target is a soft encoding over its ``k`` nearest bin centres; rare colours are up-weighted:

    Z_q  = exp(-||ab - c_q||^2 / (2 sigma^2)) over the k nearest centres c_q, normalised     (k 5, sigma 5)
    w    = ((1 - lambda) p~ + lambda / Q)^-1,  rescaled so that E_p~[w] = 1                  (lambda 0.5)
    L    = -sum_{h,w} w[argmax_q Z_hw] sum_q Z_hwq log softmax(logits)_hwq               (averaged over h, w, batch)

``p~`` is the empirical bin distribution of the training pixels smoothed by a Gaussian (sigma 5) over the bins.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from sslcli.colorspace import rgb_to_lab
from sslcli.losses.float32 import float32_loss


@functools.cache
def ab_bins(grid: int = 10, levels: int = 48) -> torch.Tensor:
    """Centres ``[Q, 2]`` (a, b) of the ``grid``-wide squares of the ab plane that sRGB colours reach.

    The gamut is sampled on a ``levels``^3 RGB lattice; squares are centred on multiples of ``grid``.
    """
    axis = torch.linspace(0, 1, levels)
    rgb = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")).reshape(3, -1, 1)
    ab = rgb_to_lab(rgb.double())[1:].reshape(2, -1).T
    cells = torch.unique(torch.round(ab / grid).long(), dim=0)
    return (cells * grid).float()


def soft_encode(ab: torch.Tensor, bins: torch.Tensor, neighbours: int = 5, sigma: float = 5.0) -> torch.Tensor:
    """ab values ``[B, 2, H, W]`` -> soft targets ``[B, Q, H, W]``: Gaussian weights on the ``neighbours`` nearest
    bin centres, summing to 1 at every pixel."""
    b, _, h, w = ab.shape
    points = ab.permute(0, 2, 3, 1).reshape(-1, 2).float()
    distances = torch.cdist(points, bins)
    nearest, index = distances.topk(neighbours, dim=1, largest=False)
    weights = torch.softmax(-nearest.pow(2) / (2 * sigma**2), dim=1)
    targets = torch.zeros(points.shape[0], bins.shape[0], device=ab.device).scatter_(1, index, weights)
    return targets.view(b, h, w, -1).permute(0, 3, 1, 2)


def rebalance_weights(counts: torch.Tensor, bins: torch.Tensor, mix: float = 0.5, sigma: float = 5.0) -> torch.Tensor:
    """Class weights ``[Q]`` from pixel counts per bin ``[Q]``: ``((1 - mix) p~ + mix / Q)^-1`` with ``p~`` the
    counts' distribution smoothed by a Gaussian of ``sigma`` over the bin centres, normalised so ``sum p~ w = 1``."""
    prior = counts.double() / counts.sum().clamp_min(1)
    kernel = torch.exp(-torch.cdist(bins.double(), bins.double()).pow(2) / (2 * sigma**2))
    smoothed = kernel @ prior
    smoothed = smoothed / smoothed.sum()
    weights = 1.0 / ((1 - mix) * smoothed + mix / bins.shape[0])
    return (weights / (smoothed * weights).sum()).float()


@float32_loss
def colorization_loss(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Class-rebalanced multinomial cross-entropy; ``logits``, ``targets`` ``[B, Q, H, W]``, ``class_weights`` ``[Q]``."""
    per_pixel = -(targets * F.log_softmax(logits.float(), dim=1)).sum(1)
    return (class_weights[targets.argmax(1)] * per_pixel).mean()
