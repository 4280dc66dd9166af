"""Self-attention maps of a ViT's CLS token (DINO, Caron et al. 2021, Fig. 1; official visualize_attention.py).

For each head of the last block, the attention of the CLS token over the patch tokens is a
distribution over the image patches; on DINO-trained ViTs it outlines the objects without any
label.  timm's ``Attention`` fuses the softmax into ``scaled_dot_product_attention`` and never
materialises it, so a forward hook on the last block's attention module recomputes it from the
module's own input and weights (``qkv``, ``num_heads``, ``scale``, ``q_norm``/``k_norm``):

    q, k = split(qkv(x));  A = softmax(q k^T * scale);  map_h = A[h, CLS, patches] / sum(A[h, CLS, patches])

The maps are upsampled to the image (nearest, one patch = one block of pixels, as DINO does) and
written next to the image as one PNG per input.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sslcli.errors import UserError
from sslcli.evaluation.panels import default_zoom, tile_row, to_uint8


def last_attention_module(model: nn.Module, name: str) -> nn.Module:
    """The last transformer block's attention module of a timm ViT with a CLS token, else a UserError."""
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if isinstance(blocks, nn.Sequential) and len(blocks) else None
    if attn is None or not all(hasattr(attn, a) for a in ("qkv", "num_heads", "scale")):
        raise UserError(f"{name} is not a ViT (no transformer blocks with a qkv attention); attention maps need a "
                        "ViT encoder, e.g. a run trained with --arch vit_s16 or vit_tiny_p4")
    if getattr(model, "cls_token", None) is None:
        raise UserError(f"{name} is a ViT without a CLS token; attention maps follow the CLS token, so pass a "
                        "ViT with one (timm's vit_* models have it)")
    return attn


def _cls_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, N]``: each head's softmax attention row of token 0 (CLS), recomputed from ``x``."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q, k = attn.q_norm(q) if hasattr(attn, "q_norm") else q, attn.k_norm(k) if hasattr(attn, "k_norm") else k
    scores = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # only the CLS query row is needed
    return scores.float().softmax(dim=-1)[:, :, 0]


@torch.no_grad()
def cls_attention_maps(encoder: nn.Module, images: torch.Tensor, name: str = "the encoder") -> torch.Tensor:
    """``[B, heads, H/p, W/p]``: per head, the last block's CLS attention over the patch grid, summing to 1.

    ``encoder`` wraps a timm ViT as ``encoder.model`` (an :class:`~sslcli.models.encoders.Encoder`) or is
    one; ``images`` ``[B, C, H, W]`` are normalised model inputs.  Attention to the CLS (and register)
    tokens is dropped and the rest renormalised, so each map is a distribution over the patches.
    """
    model = getattr(encoder, "model", encoder)
    attn = last_attention_module(model, name)
    captured: list[torch.Tensor] = []
    handle = attn.register_forward_hook(lambda module, args, output: captured.append(_cls_attention(module, args[0])))
    try:
        encoder(images)
    finally:
        handle.remove()
    patch_h, patch_w = model.patch_embed.patch_size
    grid = (images.shape[-2] // patch_h, images.shape[-1] // patch_w)
    prefix = getattr(model, "num_prefix_tokens", 1)
    patches = captured[-1][:, :, prefix:]
    if patches.shape[-1] != grid[0] * grid[1]:
        raise UserError(f"{name}: {patches.shape[-1]} patch tokens do not form the {grid[0]}x{grid[1]} grid of "
                        f"{images.shape[-2]}x{images.shape[-1]} px inputs; pass --image-size of the encoder")
    patches = patches / patches.sum(dim=-1, keepdim=True)
    return patches.reshape(*patches.shape[:2], *grid)


# Viridis at five stops: dark blue (no attention) to yellow (most attention).
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)


def colorize(heat: np.ndarray) -> np.ndarray:
    """``[H, W]`` values -> ``[H, W, 3]`` uint8 viridis, min-max scaled per map (as ``plt.imsave``)."""
    lo, hi = float(heat.min()), float(heat.max())
    t = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    stops = np.linspace(0, 1, len(_VIRIDIS))
    return np.stack([np.interp(t, stops, _VIRIDIS[:, c]) for c in range(3)], axis=-1).astype(np.uint8)


def attention_panel(image: torch.Tensor, maps: torch.Tensor, mean: Sequence[float], std: Sequence[float], *,
                    zoom: int = 1, gap: int = 2) -> Image.Image:
    """One row: the (un-normalised) input image, then each head's map upsampled to it; ``zoom`` enlarges tiles.

    ``image`` ``[C, H, W]`` normalised, ``maps`` ``[heads, h, w]``.  Size: ``(heads + 1) * H * zoom +
    heads * gap`` by ``H * zoom`` pixels.
    """
    height, width = image.shape[-2:]
    # Nearest upsampling: each patch stays a visible block, as in DINO's figures.
    upsampled = F.interpolate(maps[None].float().cpu(), size=(height, width), mode="nearest")[0]
    tiles = [to_uint8(image, mean, std)] + [colorize(m.numpy()) for m in upsampled]
    return tile_row(tiles, zoom=zoom, gap=gap)


def write_attention_maps(encoder: nn.Module, images: Iterator[tuple[str, torch.Tensor]], out: Path, *,
                         mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu",
                         zoom: int | None = None, name: str = "the encoder") -> list[Path]:
    """Writes ``OUT/<image name>.png`` (image, then one map per head) for every image; returns the paths.

    ``zoom`` defaults to the integer that brings the tiles near 224 px (7 for 32-px inputs, 1 for 224).
    """
    last_attention_module(getattr(encoder, "model", encoder), name)  # fail before reading any image
    out.mkdir(parents=True, exist_ok=True)
    encoder.eval().to(device)
    written: list[Path] = []
    seen: dict[str, int] = {}
    for stem, image in images:
        maps = cls_attention_maps(encoder, image[None].to(device), name)[0]
        seen[stem] = seen.get(stem, 0) + 1
        unique = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"  # two files with one name stay apart
        side = image.shape[-1]
        panel = attention_panel(image, maps, mean, std, zoom=zoom or default_zoom(side))
        panel.save(out / f"{unique}.png")
        written.append(out / f"{unique}.png")
    if not written:
        raise UserError("no images to visualise; pass image files, a folder of images or a dataset")
    return written
