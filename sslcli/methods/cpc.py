"""CPC v2 (Henaff et al., 2020, "Data-Efficient Image Recognition with Contrastive Predictive Coding",
arXiv:1905.09272) on images; CPC v1: van den Oord et al., 2018, "Representation Learning with
Contrastive Predictive Coding", arXiv:1807.03748.

    x = patch_grid(image)                      # G x G overlapping patches (paper: 7 x 7 of 64 px, stride 32)
    x = augment_each_patch(x)                  # colour dropping, flips, sub-crops
    z[i, j] = mean_pool(f(x[i, j]))            # the backbone (BatchNorm -> LayerNorm) on every patch
    for each direction d (down, up, right, left), turned so that d runs down the rows:
        c = g_d(z)                             # masked-conv context: c[i, j] sees rows <= i only
        for k in offsets:                      # A.2: k = 3 (steps 2..3 of a 7-row grid)
            p = 0.1 * W_k c[i, j];  t = T z    # linear predictions and targets (64-d)
            loss += InfoNCE(p[i, j], t[i + k, j]; negatives = every other patch of the batch)

Only the patch encoder ``f`` is exported; ``norm="ln"`` builds it with layer norm (recorded in the
export's ``timm_kwargs``), ``"bn"`` keeps the backbone's BatchNorm (CPC v1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sslcli import distributed as dist
from sslcli.engine.device import laid_out_for
from sslcli.engine.patches import DIRECTIONS, augment_patches, extract_patches, orient
from sslcli.errors import UserError
from sslcli.losses import collapse_std
from sslcli.losses.cpc import cpc_info_nce
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.context import GridPredictor
from sslcli.models.encoders import Encoder
from sslcli.models.norms import with_layer_norm


@register_method("cpc")
class CPC(Method):
    """CPC v2 (Henaff et al., 2020): predict patch embeddings k rows away from a masked-conv context, InfoNCE."""

    def __init__(self, encoder: Encoder, grid: int = 7, patch_size: int = 64,
                 directions: Sequence[str] = DIRECTIONS, min_offset: int = 3, max_offset: int = 3,
                 context_dim: int = 256, context_blocks: int = 5, target_dim: int = 64, emb_scale: float = 0.1,
                 norm: str = "ln", color_drop_p: float = 1.0, patch_flip_p: float = 0.5, patch_jitter: int = 0) -> None:
        if norm not in ("ln", "bn"):
            raise UserError(f"method_args.norm must be 'ln' (CPC v2's layer norm) or 'bn' (keep BatchNorm), got {norm!r}")
        if not 0 < min_offset <= max_offset < grid:
            raise UserError(f"prediction offsets {min_offset}..{max_offset} do not fit a grid of {grid} rows; "
                            f"use 1 <= min_offset <= max_offset <= {grid - 1}")
        for d in directions:
            orient(torch.zeros(1, 1, 1, 1), d)  # rejects unknown names early
        super().__init__(with_layer_norm(encoder) if norm == "ln" else encoder)
        self.grid, self.patch_size, self.directions, self.norm = grid, patch_size, tuple(directions), norm
        self.offsets = tuple(range(min_offset, max_offset + 1))
        self.emb_scale = emb_scale
        self.patch_aug = {"flip_p": patch_flip_p, "color_drop_p": color_drop_p, "jitter": patch_jitter}
        self.predictors = torch.nn.ModuleList(
            GridPredictor(self.backbone.dim, self.offsets, context_dim, context_blocks, target_dim)
            for _ in self.directions)

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        x = views[0]
        b, g, p = x.shape[0], self.grid, self.patch_size
        patches = extract_patches(x, g, p).reshape(b * g * g, x.shape[1], p, p)
        patches = laid_out_for(augment_patches(patches, **self.patch_aug), self.backbone)
        h = self.backbone(patches)  # [B G G, D]
        z = h.view(b, g, g, -1).permute(0, 3, 1, 2)  # [B, D, G, G]
        loss = h.new_zeros((), dtype=torch.float32)
        for direction, predictor in zip(self.directions, self.predictors):
            targets, preds = predictor(orient(z, direction))
            keys = dist.gather_with_grad(targets.reshape(b * g * g, -1))  # negatives from every rank
            for k, pred in zip(self.offsets, preds):
                loss = loss + cpc_info_nce(pred * self.emb_scale, targets, k, keys, offset=dist.rank() * b * g * g)
        return StepOutput(loss, {"z_std": collapse_std(h)}, embedding=h)

    def describe(self) -> dict[str, str]:
        return {"patches": f"{self.grid} x {self.grid} grid of {self.patch_size}-px patches",
                "predictions": f"offsets {list(self.offsets)} along {', '.join(self.directions)}",
                "norm": "layer norm (GroupNorm(1, C))" if self.norm == "ln" else "batch norm"}
