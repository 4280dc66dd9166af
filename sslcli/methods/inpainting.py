"""Context encoders (Pathak, Krahenbuhl, Donahue, Darrell, Efros, CVPR 2016, "Context Encoders: Feature Learning by
Inpainting"), a classic pretext task: fill in a dropped region from its surroundings, with the L2 loss.

    M = the dropped region (the central square, or random blocks)      # filled with 0: the mean of normalised pixels
    z = f((1 - M) * x)                                                # the encoder sees the context only
    y = decoder(fc(z))                                                # up-convolutions back to the crop's size
    L = sum(W * (y - x)^2) / sum(W),  W = 1 inside the hole, overlap_weight on its `overlap`-px rim

With the central mask the hole is the centre square shrunk by ``overlap`` px on each side, while the loss covers
the whole centre square, its visible rim weighted ``overlap_weight`` times (the official code's overlapPred 4 and
weight 10: predictions must blend into the context). Random blocks (the paper's better mask for features) weigh
every dropped pixel 1. The paper adds an adversarial loss for sharper fills; features are learned with L2 alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sslcli.augment import AugmentConfig
from sslcli.engine.device import laid_out_for
from sslcli.errors import UserError
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder

MASKS = ("center", "blocks")


def center_mask(size: int, overlap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hole, region)``, both ``[S, S]`` bool: the centre square of side S/2 (``region``, what the loss covers) and
    the dropped pixels (``hole``: the region shrunk by ``overlap`` px on each side)."""
    lo, hi = size // 4, size // 4 + size // 2
    region = torch.zeros(size, size, dtype=torch.bool)
    region[lo:hi, lo:hi] = True
    hole = torch.zeros_like(region)
    hole[lo + overlap: hi - overlap, lo + overlap: hi - overlap] = True
    return hole, region


def block_masks(batch: int, size: int, blocks: int, block: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B, S, S]`` bool: the union of ``blocks`` random ``block`` x ``block`` squares per image."""
    corners = torch.randint(size - block + 1, (batch, blocks, 2), generator=generator)
    coords = torch.arange(size)
    rows = (coords[None, None] >= corners[..., :1]) & (coords[None, None] < corners[..., :1] + block)  # [B, n, S]
    cols = (coords[None, None] >= corners[..., 1:]) & (coords[None, None] < corners[..., 1:] + block)
    return (rows[..., :, None] & cols[..., None, :]).any(1)


class Decoder(nn.Sequential):
    """A code ``[B, D]`` -> an image ``[B, C, S, S]``: a fully connected layer to a ``4 x 4`` map, then stride-2
    up-convolutions (BN, ReLU) doubling it to ``S`` (DCGAN's generator, the paper's decoder)."""

    def __init__(self, dim: int, size: int, channels: int = 3, width: int = 512) -> None:
        steps = (size // 4).bit_length() - 1
        if size < 8 or 4 * 2**steps != size:
            raise UserError(f"inpainting decodes 4 x 4 maps by doubling, so crops must be 4 x 2^k px (32, 64, 128, "
                            f"...), got {size}")
        widths = [max(width >> i, 32) for i in range(steps)] + [channels]
        layers: list[nn.Module] = [nn.Linear(dim, widths[0] * 16), nn.Unflatten(1, (widths[0], 4, 4)),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        for i in range(steps):
            layers.append(nn.ConvTranspose2d(widths[i], widths[i + 1], 4, stride=2, padding=1))
            if i < steps - 1:
                layers += [nn.BatchNorm2d(widths[i + 1]), nn.ReLU(inplace=True)]
        super().__init__(*layers)


@register_method("inpainting")
class Inpainting(Method):
    """Context encoder (Pathak et al., 2016): reconstruct a dropped region of the image with an L2 loss."""

    def __init__(self, encoder: Encoder, mask: str = "center", overlap: int = 4, overlap_weight: float = 10.0,
                 blocks: int = 5, block_fraction: float = 0.25, decoder_width: int = 512,
                 augment: AugmentConfig | None = None) -> None:
        super().__init__(encoder)
        size = (augment or AugmentConfig()).views[0].size  # the decoder is built for the crops' size
        if mask not in MASKS:
            raise UserError(f"method_args.mask must be one of {list(MASKS)}, got {mask!r}")
        if not 0 <= overlap < size // 4:
            raise UserError(f"method_args.overlap must be in [0, {size // 4}) px for {size}-px crops, got {overlap}")
        self.mask, self.overlap, self.overlap_weight = mask, overlap, overlap_weight
        self.blocks, self.block = blocks, max(1, round(block_fraction * size))
        self.size = size
        self.decoder = Decoder(encoder.dim, size, width=decoder_width)

    def drop(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(context, weights)``: the images with the dropped pixels at 0, and the loss weights ``[B, 1, S, S]``."""
        b, _, s, _ = images.shape
        if s != self.size or images.shape[-1] != s:
            raise UserError(f"inpainting was built for {self.size} x {self.size} crops (the recipe's view size), got "
                            f"{images.shape[-2]} x {images.shape[-1]}; use one square view size")
        if self.mask == "center":
            hole, region = (m.to(images.device) for m in center_mask(s, self.overlap))
            weights = torch.where(hole, 1.0, torch.where(region, self.overlap_weight, 0.0)).expand(b, 1, s, s)
            dropped = hole.expand(b, 1, s, s)
        else:
            dropped = block_masks(b, s, self.blocks, self.block).to(images.device)[:, None]
            weights = dropped.float()
        return images.masked_fill(dropped, 0.0), weights

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        context, weights = self.drop(views[0])
        features = self.backbone(laid_out_for(context, self.backbone))
        filled = self.decoder(features)
        loss = (weights * (filled.float() - views[0].float()).pow(2)).sum() / (weights.sum() * views[0].shape[1])
        return StepOutput(loss, {"hole_fraction": (weights > 0).float().mean()}, embedding=features)
