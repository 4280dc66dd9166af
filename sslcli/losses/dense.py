"""Dense (per-location) contrastive learning: cross-view correspondence and the dense InfoNCE.

DenseCL (Wang et al., CVPR 2021, "Dense Contrastive Learning for Self-Supervised Visual
Pre-Training", Sec. 3; official code github.com/WXinlong/DenseCL) treats every location of a
feature map as a query.  Its positive is the location of the other view whose *backbone* feature
is most similar (cosine); negatives are pooled dense vectors of other images, in their own queue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslcli.losses.contrastive import info_nce
from sslcli.losses.float32 import float32_loss


@torch.no_grad()
def dense_correspondence(query_feats: torch.Tensor, key_feats: torch.Tensor) -> torch.Tensor:
    """For every query location, the index of the key location with the highest cosine similarity.

    ``c_i = argmax_j cos(f_i, f'_j)`` within each image, where ``f`` and ``f'`` are
    the two views' backbone feature maps flattened to locations (not the dense head's outputs).
    An argmax has no gradient, so none is kept.

    Shapes: ``query_feats`` ``[B, P, C]``, ``key_feats`` ``[B, P', C]`` -> ``[B, P]`` (long, in ``[0, P')``).
    Cosines in float32, so bf16 autocast cannot create ties that float32 would break.
    """
    q = F.normalize(query_feats.float(), dim=-1)
    k = F.normalize(key_feats.float(), dim=-1)
    return torch.bmm(q, k.transpose(1, 2)).argmax(dim=2)


def gather_locations(grid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, i] = grid[b, index[b, i]]``: the matched location of each query location.

    Shapes: ``grid`` ``[B, P', D]``, ``index`` ``[B, P]`` -> ``[B, P, D]``.
    """
    return torch.gather(grid, 1, index.unsqueeze(-1).expand(-1, -1, grid.shape[-1]))


@float32_loss
def dense_info_nce(query_grid: torch.Tensor, key_grid: torch.Tensor, match: torch.Tensor, negatives: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """DenseCL's dense loss: InfoNCE of every query location against its corresponding key location.

    ``L_dense = -mean_{b, i} log( e(r_bi, t_b,c_bi) / (e(r_bi, t_b,c_bi) + sum_k e(r_bi, n_k)) )``,
    ``e(a, b) = exp(a . b / tau)``, with ``r`` the query view's dense vectors, ``t`` the key view's,
    ``c`` the correspondence of :func:`dense_correspondence` and ``n`` the dense negatives queue; cosine
    similarities (inputs are L2-normalised in :func:`~sslcli.losses.contrastive.info_nce`).
    The mean runs over all ``B * P`` locations, as in the official code.

    Shapes: ``query_grid`` ``[B, P, D]``, ``key_grid`` ``[B, P', D]``, ``match`` ``[B, P]``,
    ``negatives`` ``[K, D]``.
    """
    dim = query_grid.shape[-1]
    positives = gather_locations(key_grid, match)
    return info_nce(query_grid.reshape(-1, dim), positives.reshape(-1, dim), negatives, temperature)
