"""Context prediction (Doersch, Gupta, Efros, 2015, "Unsupervised Visual Representation Learning by Context
Prediction"), a classic pretext task: where does a patch sit relative to the centre patch?

    patches = 3 x 3 grid of p-px patches, gaps between them, each jittered by up to `jitter` px (Sec. 3)
    patches = colour dropping: keep one random channel (Sec. 3.1, against chromatic aberration shortcuts)
    L = cross_entropy(fc(concat(fc6(f(centre)), fc6(f(neighbour_k)))), k),  k = 0..7

Every image contributes all 8 (centre, neighbour) pairs, sharing the encoding of its 9 patches, where the
paper samples one pair per image: the same objective in expectation, 8x the pairs per forward pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sslcli.engine.device import laid_out_for
from sslcli.engine.patches import augment_patches, extract_patches, random_crops
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.heads import build_mlp

NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)  # raster positions around the centre (4); label k is NEIGHBOURS[k]


@register_method("relative-position")
class RelativePosition(Method):
    """Context prediction (Doersch et al., 2015): which of the 8 neighbouring positions a patch came from."""

    def __init__(self, encoder: Encoder, patch_size: int = 96, jitter: int = 7, color_drop_p: float = 1.0,
                 fc6_dim: int = 4096, hidden: int = 4096) -> None:
        super().__init__(encoder)
        self.patch_size, self.jitter, self.color_drop_p = patch_size, jitter, color_drop_p
        self.fc6 = build_mlp(encoder.dim, [(fc6_dim, "bn", "relu")])
        self.classifier = build_mlp(2 * fc6_dim, [(hidden, "bn", "relu"), (len(NEIGHBOURS), None, None)])

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, S, S]`` -> ``[B, 9, C, p, p]``: the jittered, colour-dropped 3 x 3 patch grid, raster order."""
        b, c = images.shape[:2]
        cell = self.patch_size + self.jitter
        cells = extract_patches(images, 3, cell).reshape(b * 9, c, cell, cell)
        patches = augment_patches(random_crops(cells, self.patch_size), color_drop_p=self.color_drop_p)
        return patches.reshape(b, 9, c, self.patch_size, self.patch_size)

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        patches = self.patches(views[0])
        b = patches.shape[0]
        features = self.backbone(laid_out_for(patches.flatten(0, 1), self.backbone))
        h = self.fc6(features).reshape(b, 9, -1)
        neighbours = h[:, list(NEIGHBOURS)]  # [B, 8, fc6]
        pairs = torch.cat([h[:, 4:5].expand_as(neighbours), neighbours], dim=2).flatten(0, 1)
        labels = torch.arange(len(NEIGHBOURS), device=h.device).repeat(b)
        logits = self.classifier(pairs)
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        return StepOutput(F.cross_entropy(logits.float(), labels), {"position_acc": accuracy},
                          embedding=features.reshape(b, 9, -1)[:, 4])
