"""BEiT's masked-input forward of a timm ViT (Bao et al. 2022, Sec. 2.3; official ``modeling_pretrain.py``).

The patch embeddings at masked positions are replaced by one learned ``[M]`` embedding before the
CLS token and positions are added; the rest is the backbone's own forward.  Both timm families
work: ``VisionTransformer`` (absolute positions) and ``Beit`` (relative position bias and layer scale,
the paper's backbone), so the exported weights load into the matching timm model unchanged.
"""

from __future__ import annotations

import torch
from timm.models.beit import Beit
from torch import nn

from sslcli.models.mae import checked_vit


def check_maskable(model: nn.Module, name: str) -> nn.Module:
    """``model`` if it is a timm ``Beit``, or a ``VisionTransformer`` that passes MAE's check (CLS token, no
    register tokens, one patch grid)."""
    return model if isinstance(model, Beit) else checked_vit(model, name, "beit")


def forward_with_mask_token(model: nn.Module, images: torch.Tensor, mask: torch.Tensor,
                            mask_token: torch.Tensor) -> torch.Tensor:
    """``[B, 1 + N, D]`` final (normed) tokens, CLS first, of ``images`` with the patches where ``mask``
    (``[B, N]`` bool) is True replaced by ``mask_token`` (``[1, 1, D]``)."""
    x = model.patch_embed(images)
    w = mask[..., None].to(x.dtype)
    x = x * (1 - w) + mask_token.to(x.dtype) * w
    if isinstance(model, Beit):
        x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        x = model.pos_drop(x)
        rel_pos_bias = model.rel_pos_bias() if model.rel_pos_bias is not None else None
        for block in model.blocks:
            x = block(x, shared_rel_pos_bias=rel_pos_bias)
        return model.norm(x)
    x = model.norm_pre(model.patch_drop(model._pos_embed(x)))
    return model.norm(model.blocks(x))
