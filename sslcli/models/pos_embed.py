"""Fixed 2-D sine-cosine positional embeddings (MAE, He et al. 2022, Sec. 3 "MAE encoder/decoder";
official ``util/pos_embed.py``, after the Transformer's 1-D sin-cos).

For a ``gh x gw`` grid and width ``D`` (a multiple of 4): the first ``D/2`` channels encode the
column ``x``, the last ``D/2`` the row ``y``, each as ``[sin(pos w_k), cos(pos w_k)]`` with
``w_k = 10000^(-k / (D/4))``, ``k = 0 .. D/4 - 1``.  A CLS token gets an all-zero row in front.
"""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[M]`` positions -> ``[M, dim]`` = ``[sin(pos w), cos(pos w)]``, ``w_k = 10000^(-2k/dim)``."""
    if dim % 2:
        raise ValueError(f"sin-cos embeddings need an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double().reshape(-1)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """``[1, (cls) + gh*gw, dim]`` float32 embeddings of a row-major ``grid`` of patches."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embeddings need a width divisible by 4, got {dim}")
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, xs), sincos_1d(dim // 2, ys)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()[None]
