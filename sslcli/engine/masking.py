"""Images as sequences of patches, and the masks of masked image modelling.

- :func:`patchify` / :func:`unpatchify`: ``[B, C, H, W]`` <-> ``[B, N, p*p*C]`` in raster order, the
  layout of MAE's targets (He et al., 2022, official ``models_mae.py``).
- :func:`random_masking`: MAE's per-sample uniform masking without replacement, by shuffling the
  tokens with ``argsort`` of uniform noise and keeping the first ``N (1 - ratio)``; ``ids_restore``
  unshuffles (Sec. 3, "Masking").
- :func:`blockwise_mask`: BEiT's blockwise masking (Bao et al., 2022, Algorithm 1): rectangles of at
  least ``min_block`` patches with aspect ratio in ``[0.3, 1/0.3]`` until about ``ratio`` of the grid is
  covered.

Masks are ``1`` for a masked (hidden) patch and ``0`` for a visible one, as in both papers' code.
"""

from __future__ import annotations

import math

import torch


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), p*p*C]``; row-major patches, each flattened as ``(p, p, C)``."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"{h}x{w} images do not split into {patch}-px patches")
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """The inverse of :func:`patchify`: ``[B, gh*gw, p*p*C]`` -> ``[B, C, gh*p, gw*p]``."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * patch, gw * patch)


def random_masking(tokens: torch.Tensor, ratio: float, noise: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's random masking: keeps ``round(N (1 - ratio))`` tokens of each sample, chosen uniformly.

    ``tokens`` ``[B, N, D]``; ``noise`` ``[B, N]`` (default: uniform) decides the order, lowest kept.
    Returns ``visible`` ``[B, N_keep, D]`` (kept tokens in shuffled order), ``mask`` ``[B, N]`` (1 =
    masked, in the original order) and ``ids_restore`` ``[B, N]``: gathering ``cat(visible, fillers)``
    with it puts every token back at its original position.
    """
    b, n, d = tokens.shape
    keep = int(round(n * (1 - ratio)))
    if not 0 < keep <= n:
        raise ValueError(f"mask ratio {ratio} leaves {keep} of {n} patches visible; use a ratio in [0, 1)")
    if noise is None:
        noise = torch.rand(b, n, device=tokens.device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep]
    visible = tokens.gather(1, ids_keep[..., None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=tokens.device)
    mask[:, :keep] = 0
    return visible, mask.gather(1, ids_restore), ids_restore


def restore_order(visible: torch.Tensor, filler: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Unshuffles: ``visible`` ``[B, K, D]`` then ``N - K`` copies of ``filler`` ``[D]`` (MAE's mask token),
    put back in the original token order -> ``[B, N, D]``."""
    b, k, d = visible.shape
    n = ids_restore.shape[1]
    full = torch.cat([visible, filler.to(visible.dtype).expand(b, n - k, d)], dim=1)
    return full.gather(1, ids_restore[..., None].expand(-1, -1, d))


def blockwise_mask(grid: tuple[int, int], num_masked: int, *, min_block: int = 16, max_block: int | None = None,
                   min_aspect: float = 0.3, generator: torch.Generator | None = None) -> torch.Tensor:
    """BEiT's blockwise mask of a ``grid`` of patches: ``[gh, gw]`` bool, about ``num_masked`` True.

    Algorithm 1 of Bao et al. (2022): repeat { s ~ U(min_block, remaining); r ~ logU(min_aspect,
    1/min_aspect); a = sqrt(s r), b = sqrt(s / r); a random a x b rectangle joins the mask } until
    ``num_masked`` patches are covered.  As in the official ``masking_generator.py``, a block adding
    more patches than are still wanted is redrawn, so the count never exceeds ``num_masked``, and the
    loop stops early after 10 draws that add nothing.
    """
    gh, gw = grid
    max_block = max_block or num_masked
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    while int(mask.sum()) < num_masked:
        wanted = min(num_masked - int(mask.sum()), max_block)
        added = 0
        for _ in range(10):
            target = uniform(min_block, wanted)
            aspect = math.exp(uniform(*log_aspect))
            h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if not (0 < h < gh and 0 < w < gw):
                continue
            top = int(torch.randint(0, gh - h + 1, (), generator=generator))
            left = int(torch.randint(0, gw - w + 1, (), generator=generator))
            block = mask[top:top + h, left:left + w]
            new = h * w - int(block.sum())
            if 0 < new <= wanted:
                block.fill_(True)
                added = new
                break
        if added == 0:
            break
    return mask
