"""Images as grids of overlapping patches, patch-level augmentation, and grid orientations.

CPC encodes every patch of a ``G x G`` grid on its own (van den Oord et al., 2018, Sec. 3.3: a 7 x 7
grid of 64-px patches with 32 px overlap; Henaff et al., 2020, Sec. 3.1), augments each patch
independently (CPC v2, Sec. 4.1: colour dropping, flips; v1: random sub-crops padded back), and
predicts along several directions of the grid (v2: top-down, bottom-up, left-right, right-left).

Everything works on batched tensors on the training device, so the data pipeline stays the
ordinary image pipeline of :mod:`sslcli.augment`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslcli.errors import UserError

DIRECTIONS = ("down", "up", "right", "left")


def grid_stride(size: int, grid: int, patch: int) -> int:
    """The stride at which a ``grid x grid`` of ``patch``-px patches exactly tiles a ``size``-px image."""
    if grid < 2 or patch < 1 or patch > size or (size - patch) % (grid - 1):
        fits = [s * (grid - 1) + patch for s in (1, max(1, patch // 2), patch)] if grid >= 2 else []
        raise UserError(f"a {grid} x {grid} grid of {patch}-px patches does not tile {size}-px crops; set the view "
                        f"size to (grid - 1) * stride + patch (e.g. {', '.join(map(str, fits))}) or change "
                        "method_args.grid / method_args.patch_size")
    return (size - patch) // (grid - 1)


def extract_patches(x: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """``[B, C, S, S]`` images -> ``[B, G, G, C, p, p]``; patch ``(i, j)`` is ``x[..., i s : i s + p, j s : j s + p]``."""
    if x.shape[-1] != x.shape[-2]:
        raise UserError(f"patch grids need square crops, got {x.shape[-2]} x {x.shape[-1]}; set the view ratio to [1, 1]")
    s = grid_stride(x.shape[-1], grid, patch)
    return x.unfold(2, patch, s).unfold(3, patch, s).permute(0, 2, 3, 1, 4, 5)


def augment_patches(patches: torch.Tensor, *, flip_p: float = 0.0, color_drop_p: float = 0.0,
                    jitter: int = 0) -> torch.Tensor:
    """Independent random augmentation of each patch of ``patches`` ``[N, C, p, p]`` (normalised pixels).

    - ``flip_p``: horizontal flip;
    - ``color_drop_p``: keep one random channel and zero the other two, i.e. set them to the dataset
      mean (Doersch et al., 2015, "colour dropping"; CPC v2 "RC");
    - ``jitter``: a random ``(p - jitter)``-px sub-crop, zero-padded back to ``p`` px around the centre
      (CPC v1: 60-px sub-crops of 64-px patches).
    """
    n, c, p, _ = patches.shape
    dev = patches.device
    if flip_p > 0:
        flip = torch.rand(n, device=dev) < flip_p
        patches = torch.where(flip[:, None, None, None], patches.flip(-1), patches)
    if color_drop_p > 0 and c > 1:
        keep = F.one_hot(torch.randint(c, (n,), device=dev), c).bool()
        drop = torch.rand(n, device=dev) < color_drop_p
        patches = patches * (keep | ~drop[:, None]).to(patches.dtype)[:, :, None, None]
    if jitter > 0:
        if jitter >= p:
            raise UserError(f"patch jitter {jitter} px leaves nothing of a {p}-px patch; use a value below {p}")
        crops = random_crops(patches, p - jitter)
        lo = jitter // 2
        patches = F.pad(crops, (lo, jitter - lo, lo, jitter - lo))
    return patches


def random_crops(patches: torch.Tensor, size: int) -> torch.Tensor:
    """An independent, uniformly placed ``size x size`` crop of each of ``patches`` ``[N, C, p, p]``."""
    n, c, p, _ = patches.shape
    dev = patches.device
    oy, ox = (torch.randint(p - size + 1, (n,), device=dev) for _ in range(2))
    rows = (oy[:, None] + torch.arange(size, device=dev))[:, None, :, None]  # [n, 1, size, 1]
    cols = (ox[:, None] + torch.arange(size, device=dev))[:, None, None, :]  # [n, 1, 1, size]
    idx = torch.arange(n, device=dev)[:, None, None, None]
    chans = torch.arange(c, device=dev)[None, :, None, None]
    return patches[idx, chans, rows, cols]


def orient(grid: torch.Tensor, direction: str) -> torch.Tensor:
    """Turns a ``[B, D, G, G]`` grid so that ``direction`` runs down its rows (dim 2).

    A context network that reads rows top to bottom then predicts along ``direction``:
    ``"down"`` (CPC v1), ``"up"`` (v2 "BU"), ``"right"`` and ``"left"`` (v2 "HP").
    """
    if direction == "down":
        return grid
    if direction == "up":
        return grid.flip(2)
    if direction == "right":
        return grid.transpose(2, 3)
    if direction == "left":
        return grid.transpose(2, 3).flip(2)
    raise UserError(f"unknown prediction direction '{direction}'; choose from {', '.join(DIRECTIONS)}")
