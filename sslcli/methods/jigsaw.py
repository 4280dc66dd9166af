"""Jigsaw puzzles (Noroozi & Favaro, 2016, "Unsupervised Learning of Visual Representations by Solving
Jigsaw Puzzles"), a classic pretext task: the context-free network (CFN).

    cells = 3 x 3 grid of the crop;  tiles = a random sub-crop of each cell     # no edge continuity to exploit
    tiles = normalise each tile to zero mean / unit std on its own               # no low-level shortcuts
    k ~ U{P}; shuffled = tiles[permutations[k]]                                 # P fixed permutations
    L = cross_entropy(classifier(concat_i fc6(f(shuffled_i))), k)                # shared f for the 9 tiles

The permutation set is chosen once (seeded), greedily maximising the average Hamming distance to the
permutations already chosen, as the official ``select_permutations.py`` does (Sec. 3.2).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F

from sslcli.engine.device import laid_out_for
from sslcli.engine.patches import extract_patches, random_crops
from sslcli.errors import UserError
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.heads import build_mlp


def max_hamming_permutations(count: int, tiles: int = 9, seed: int = 0) -> torch.Tensor:
    """``[count, tiles]`` long: a random first permutation, then repeatedly the remaining one with the largest
    mean Hamming distance to those chosen (ties to the lowest index)."""
    pool = torch.tensor(list(itertools.permutations(range(tiles))), dtype=torch.int8)
    if not 1 <= count <= len(pool):
        raise UserError(f"{count} permutations of {tiles} tiles requested; choose 1..{len(pool)}")
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(len(pool), (), generator=generator))]
    total = torch.zeros(len(pool), dtype=torch.int32)  # summed distance to the chosen set
    available = torch.ones(len(pool), dtype=torch.bool)
    for _ in range(count - 1):
        last = chosen[-1]
        available[last] = False
        total += (pool != pool[last]).sum(1, dtype=torch.int32)
        chosen.append(int(torch.where(available, total, -1).argmax()))
    return pool[chosen].long()


def standardise_tiles(tiles: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each ``[C, t, t]`` tile of ``[N, C, t, t]`` to zero mean and unit std over its own pixels and channels."""
    mean = tiles.mean(dim=(1, 2, 3), keepdim=True)
    std = tiles.std(dim=(1, 2, 3), keepdim=True)
    return (tiles - mean) / (std + eps)


@register_method("jigsaw")
class Jigsaw(Method):
    """Jigsaw puzzles (Noroozi & Favaro, 2016): which of P permutations shuffled the 3 x 3 tiles of an image."""

    def __init__(self, encoder: Encoder, num_permutations: int = 1000, tile_fraction: float = 64 / 75,
                 tile_dim: int = 1024, hidden: int = 4096, seed: int = 0) -> None:
        super().__init__(encoder)
        if not 0 < tile_fraction <= 1:
            raise UserError(f"tile_fraction must be in (0, 1], got {tile_fraction}")
        self.tile_fraction = tile_fraction
        self.register_buffer("permutations", max_hamming_permutations(num_permutations, 9, seed))
        self.fc6 = build_mlp(encoder.dim, [(tile_dim, None, "relu")])
        self.classifier = build_mlp(9 * tile_dim, [(hidden, None, "relu"), (num_permutations, None, None)])

    def puzzle(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, S, S]`` -> shuffled, standardised tiles ``[B, 9, C, t, t]`` and the permutation labels ``[B]``."""
        b, c, size, _ = images.shape
        if size % 3:
            raise UserError(f"jigsaw cuts crops into 3 x 3 cells; {size} px is not a multiple of 3 (use e.g. 63 or 225)")
        cell = size // 3
        tile = max(1, int(cell * self.tile_fraction))
        cells = extract_patches(images, 3, cell).reshape(b * 9, c, cell, cell)
        tiles = standardise_tiles(random_crops(cells, tile)).reshape(b, 9, c, tile, tile)
        labels = torch.randint(len(self.permutations), (b,), device=images.device)
        order = self.permutations[labels]  # tile i of the puzzle is cell order[i]
        return tiles[torch.arange(b, device=images.device)[:, None], order], labels

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        tiles, labels = self.puzzle(views[0])
        b = tiles.shape[0]
        features = self.backbone(laid_out_for(tiles.flatten(0, 1), self.backbone))
        logits = self.classifier(self.fc6(features).reshape(b, -1))
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        return StepOutput(F.cross_entropy(logits.float(), labels), {"puzzle_acc": accuracy},
                          embedding=features.reshape(b, 9, -1)[:, 0])
