"""Rows of image tiles written as one PNG (attention maps, MAE reconstructions)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised ``[C, H, W]`` model input -> ``[H, W, 3]`` uint8 pixels (grey inputs repeated to RGB)."""
    pixels = image.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    pixels = pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels
    return (pixels.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def default_zoom(side: int) -> int:
    """The integer enlargement that brings a ``side``-px tile near 224 px (7 for 32 px, 1 for 224)."""
    return max(1, round(224 / side))


def tile_row(tiles: Sequence[np.ndarray], *, zoom: int = 1, gap: int = 2) -> Image.Image:
    """``[H, W, 3]`` uint8 tiles side by side, each enlarged ``zoom`` times (nearest), ``gap`` px of white
    between them: ``len(tiles) * W * zoom + (len(tiles) - 1) * gap`` by ``H * zoom`` pixels."""
    height, width = tiles[0].shape[:2]
    tile_w, tile_h = width * zoom, height * zoom
    panel = Image.new("RGB", (len(tiles) * tile_w + (len(tiles) - 1) * gap, tile_h), "white")
    for i, tile in enumerate(tiles):
        panel.paste(Image.fromarray(tile).resize((tile_w, tile_h), Image.NEAREST), (i * (tile_w + gap), 0))
    return panel
