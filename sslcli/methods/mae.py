"""MAE (He, Chen, Xie, Li, Dollar, Girshick, 2022, "Masked Autoencoders Are Scalable Vision Learners").

The official ``forward``:

    latent, mask, ids_restore = encoder(imgs, mask_ratio)   # ViT on the 25% visible patches + CLS
    pred = decoder(latent, ids_restore)                     # mask tokens fill the gaps; [B, N, p*p*3]
    target = patchify(imgs)  (standardised per patch if norm_pix_loss)
    loss = mean over masked patches of mean_j (pred - target)^2

Positional embeddings are fixed 2-D sin-cos in encoder and decoder; linear layers start
xavier-uniform.  Only the encoder is exported, as the timm ViT it is.
"""

from __future__ import annotations

from typing import Any

import torch

from sslcli.engine.masking import patchify, unpatchify
from sslcli.errors import UserError
from sslcli.losses import masked_mse, normalized_patches
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.mae import (MAEDecoder, Reconstruction, checked_vit, encode_visible, freeze_sincos_pos_embed_,
                               mae_init_)


@register_method("mae")
class MAE(Method):
    """MAE (He et al., 2022): a ViT encodes the visible 25% of patches, a light decoder predicts the pixels of the rest."""

    def __init__(self, encoder: Encoder, mask_ratio: float = 0.75, norm_pix_loss: bool = True, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, decoder_mlp_ratio: float = 4.0) -> None:
        super().__init__(encoder)
        vit = checked_vit(encoder.model, f"'{encoder.spec.arch}'", "mae")
        if not 0 <= mask_ratio < 1:
            raise UserError(f"method_args.mask_ratio must be in [0, 1), got {mask_ratio}")
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch = vit.patch_embed.patch_size[0]
        self.grid = tuple(vit.patch_embed.grid_size)
        mae_init_(vit)
        patch_weight = vit.patch_embed.proj.weight  # initialised like a linear layer on the flattened patch
        torch.nn.init.xavier_uniform_(patch_weight.data.view(patch_weight.shape[0], -1))
        torch.nn.init.normal_(vit.cls_token, std=0.02)
        freeze_sincos_pos_embed_(vit)
        self.decoder = MAEDecoder(encoder.dim, self.grid, self.patch, vit.patch_embed.proj.in_channels,
                                  dim=decoder_dim, depth=decoder_depth, heads=decoder_heads, mlp_ratio=decoder_mlp_ratio)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        patches = patchify(images, self.patch)
        return normalized_patches(patches) if self.norm_pix_loss else patches

    def predict(self, images: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pred [B, N, p*p*C], mask [B, N], cls [B, D])`` for ``images``, masking ``mask_ratio`` of the patches."""
        latent, mask, ids_restore = encode_visible(self.backbone.model, images, self.mask_ratio if mask_ratio is None
                                                   else mask_ratio, noise)
        return self.decoder(latent, ids_restore), mask, latent[:, 0]

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        images = views[0]
        pred, mask, cls = self.predict(images)
        loss = masked_mse(pred, self.target(images), mask)
        return StepOutput(loss, embedding=cls)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
                    ) -> Reconstruction:
        """Reconstructs ``images`` ``[B, C, H, W]`` (normalised model inputs) from ``1 - mask_ratio`` of their patches.

        With norm-pix targets the decoder predicts standardised patches; they are mapped back with each
        patch's own mean and std (from the original image), as MAE's visualisation does.
        """
        pred, mask, _ = self.predict(images, mask_ratio, noise)
        patches, target = patchify(images, self.patch), self.target(images)
        per_patch = (pred.float() - target.float()).pow(2).mean(-1)
        # The trivial predictor that knows each hidden patch's mean value: its error is the patch's variance.
        baseline = target.float().var(-1, unbiased=False)
        if self.norm_pix_loss:
            pred = pred * (patches.var(-1, keepdim=True) + 1e-6) ** 0.5 + patches.mean(-1, keepdim=True)
        channels = images.shape[1]
        pixel_mask = mask[..., None].expand(-1, -1, self.patch * self.patch * channels)
        hidden = mask.sum(1).clamp(min=1)
        return Reconstruction(unpatchify(pred, self.patch, self.grid, channels),
                              unpatchify(pixel_mask, self.patch, self.grid, channels),
                              (per_patch * mask).sum(1) / hidden, (baseline * mask).sum(1) / hidden)

    def describe(self) -> dict[str, str]:
        return {"masking": f"{self.mask_ratio:.0%} of {self.grid[0]}x{self.grid[1]} patches of {self.patch} px",
                "target": "per-patch normalised pixels" if self.norm_pix_loss else "pixels"}
