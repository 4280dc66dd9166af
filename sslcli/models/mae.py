"""MAE's asymmetric encoder-decoder on a timm ViT (He et al. 2022, "Masked Autoencoders Are Scalable
Vision Learners", Sec. 3; official ``models_mae.py``).

The encoder is the timm ``VisionTransformer`` itself, run on the visible patches only, so the
exported backbone is an ordinary timm ViT.  The decoder is a separate, light stack of timm blocks
that sees every position: the encoded visible tokens and a shared, learned mask token, each with a
fixed sin-cos positional embedding, and predicts the ``p*p*C`` pixels of every patch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from sslcli.engine.masking import random_masking, restore_order
from sslcli.errors import UserError
from sslcli.models.pos_embed import sincos_2d


class Reconstruction(NamedTuple):
    """A batch reconstructed from its visible patches, in the input's normalisation."""

    images: torch.Tensor           # [B, C, H, W]: the decoder's prediction of every patch
    mask: torch.Tensor             # [B, C, H, W]: 1 where the patch was hidden from the encoder
    loss: torch.Tensor             # [B]: the training loss on each image's hidden patches (target space)
    mean_patch_loss: torch.Tensor  # [B]: the same for predicting each hidden patch by its true mean


def checked_vit(model: nn.Module, name: str, method: str) -> VisionTransformer:
    """``model`` if it is a timm ViT with a CLS token, no register tokens and a fixed patch grid."""
    if not isinstance(model, VisionTransformer):
        raise UserError(f"{method} masks the patch tokens of a ViT, but {name} is not a timm ViT; "
                        "pass a ViT backbone (--arch vit_b16, or vit_tiny_p4 for 32-px images)")
    if model.cls_token is None or model.reg_token is not None or model.no_embed_class:
        raise UserError(f"{method} needs a ViT with a CLS token, no register tokens and a positional embedding on "
                        f"the CLS token (timm's vit_* defaults); {name} differs")
    if getattr(model, "dynamic_img_size", False):
        raise UserError(f"{method} trains on one image size; use a single view size")
    return model


def mae_init_(module: nn.Module) -> None:
    """The official MAE initialisation: xavier-uniform linear layers with zero biases, LayerNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def freeze_sincos_pos_embed_(vit: VisionTransformer) -> None:
    """Sets the ViT's positional embedding to fixed 2-D sin-cos (zero for CLS) and stops training it."""
    pos = sincos_2d(vit.pos_embed.shape[-1], vit.patch_embed.grid_size, cls_token=True)
    with torch.no_grad():
        vit.pos_embed.copy_(pos)
    vit.pos_embed.requires_grad_(False)


def encode_visible(vit: VisionTransformer, images: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's encoder: embed, add positions, drop ``mask_ratio`` of the patches, prepend CLS, run the blocks.

    Returns ``latent`` ``[B, 1 + N_keep, D]`` (CLS first), ``mask`` ``[B, N]`` (1 = masked) and
    ``ids_restore`` ``[B, N]`` (see :func:`~sslcli.engine.masking.random_masking`).
    """
    x = vit.patch_embed(images) + vit.pos_embed[:, 1:]
    x, mask, ids_restore = random_masking(x, mask_ratio, noise)
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = vit.norm_pre(torch.cat([cls, x], dim=1))
    return vit.norm(vit.blocks(x)), mask, ids_restore


class MAEDecoder(nn.Module):
    """Linear to the decoder width, mask tokens at the hidden positions, fixed sin-cos positions,
    ``depth`` pre-norm blocks, LayerNorm, and a linear layer to ``patch * patch * channels`` pixels."""

    def __init__(self, in_dim: int, grid: tuple[int, int], patch: int, channels: int = 3, dim: int = 512,
                 depth: int = 8, heads: int = 16, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % heads or dim % 4:
            raise UserError(f"decoder width {dim} must be divisible by its {heads} heads and by 4 (sin-cos "
                            "positions); change method_args.decoder_dim or decoder_heads")
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, grid, cls_token=True), persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=_layer_norm)
                                      for _ in range(depth)])
        self.norm = _layer_norm(dim)
        self.pred = nn.Linear(dim, patch * patch * channels)
        mae_init_(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``latent`` ``[B, 1 + K, D_enc]`` -> pixel predictions ``[B, N, p*p*C]`` for every patch."""
        x = self.embed(latent)
        patches = restore_order(x[:, 1:], self.mask_token[0, 0], ids_restore)
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        return self.pred(self.norm(self.blocks(x)))[:, 1:]


def _layer_norm(dim: int, **factory: object) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, **factory)
