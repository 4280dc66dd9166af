"""Colourisation (Zhang, Isola, Efros, ECCV 2016, "Colorful Image Colorization"), a classic pretext task: predict a
distribution over quantised ab colours at every location from the lightness channel L alone.

    L, ab = Lab(crop)                                                # CIE Lab, D65
    Z = soft_encode(avg_pool(ab, stride), bins)                      # [B, Q, H/stride, W/stride]
    logits = upsample(conv1x1(f_dense(L)))                            # the backbone takes L only (1 channel)
    L_col = -sum w[argmax Z] sum_q Z_q log softmax(logits)_q          # class-rebalanced (losses/colorization.py)

The class weights come from the training pixels' colour histogram, counted once before the first epoch. The exported
backbone is the L encoder (metadata ``input_space: lab_l``, as CMC's), so ``knn`` / ``linear-probe`` feed it L.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslcli import distributed as dist
from sslcli.augment import AugmentConfig
from sslcli.colorspace import LAB_MEAN, LAB_STD, normalised_rgb_to_lab
from sslcli.engine.device import laid_out_for
from sslcli.losses.colorization import ab_bins, colorization_loss, rebalance_weights, soft_encode
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.view_encoders import build_view_encoder, view_spec


def dense_grid(encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` unpooled features of a CNN, or of a ViT's patch tokens laid back on their grid."""
    features = encoder.forward_dense(x)
    if features.ndim == 4:
        return features
    tokens = features[:, getattr(encoder.model, "num_prefix_tokens", 0):]
    side = int(tokens.shape[1] ** 0.5)
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


class _AbHistogram(nn.Module):
    """Per-image pixel counts ``[B, Q]`` over the ab bins (nearest centre) of normalised RGB images."""

    def __init__(self, lab: Callable[[torch.Tensor], torch.Tensor], bins: torch.Tensor) -> None:
        super().__init__()
        self.lab, self.bins = lab, bins  # plain attributes: the method is not a submodule to move or switch to eval

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ab = self.lab(images)[:, 1:]
        nearest = torch.cdist(ab.permute(0, 2, 3, 1).reshape(ab.shape[0], -1, 2), self.bins[None]).argmin(-1)
        counts = torch.zeros(ab.shape[0], self.bins.shape[0], device=ab.device)
        return counts.scatter_add_(1, nearest, torch.ones_like(nearest, dtype=counts.dtype))


@register_method("colorization")
class Colorization(Method):
    """Colorful Image Colorization (Zhang et al., 2016): classify each location's quantised ab colour from L."""

    def __init__(self, encoder: Encoder, grid: int = 10, neighbours: int = 5, sigma: float = 5.0,
                 rebalance: float = 0.5, target_stride: int = 4, augment: AugmentConfig | None = None) -> None:
        super().__init__(build_view_encoder(view_spec(encoder.spec, 1), encoder))  # the L encoder
        self.neighbours, self.sigma, self.rebalance, self.target_stride = neighbours, sigma, rebalance, target_stride
        self.register_buffer("bins", ab_bins(grid), persistent=False)
        self.head = nn.Conv2d(self.backbone.dim, self.bins.shape[0], kernel_size=1)
        self.register_buffer("class_weights", torch.ones(self.bins.shape[0]))
        self.register_buffer("weights_fitted", torch.zeros((), dtype=torch.bool))
        aug = augment or AugmentConfig()
        # The loader's views are RGB normalised by the recipe's mean/std; Lab needs [0, 1] RGB back.
        self.register_buffer("rgb_mean", torch.tensor(aug.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("rgb_std", torch.tensor(aug.std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("zero", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("one", torch.ones(1, 3, 1, 1), persistent=False)

    def lab(self, rgb_normalised: torch.Tensor) -> torch.Tensor:
        """Raw CIE Lab ``[B, 3, H, W]`` (L in [0, 100]) of the loader's normalised RGB."""
        return normalised_rgb_to_lab(rgb_normalised, self.rgb_mean, self.rgb_std, self.zero, self.one)

    def before_epoch(self, epoch: int, dataset_features: Callable[[nn.Module], torch.Tensor]) -> list[nn.Parameter]:
        if bool(self.weights_fitted):  # counted once; a resumed run keeps its checkpoint's weights
            return []
        counts = dist.broadcast_(dataset_features(_AbHistogram(self.lab, self.bins)).sum(0).to(self.bins.device))
        self.class_weights.copy_(rebalance_weights(counts, self.bins, self.rebalance, self.sigma))
        self.weights_fitted.fill_(True)
        return []

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        lab = self.lab(views[0])
        lightness = (lab[:, :1] - LAB_MEAN[0]) / LAB_STD[0]
        targets = soft_encode(F.avg_pool2d(lab[:, 1:], self.target_stride), self.bins, self.neighbours, self.sigma)
        features = dense_grid(self.backbone, laid_out_for(lightness, self.backbone))
        logits = F.interpolate(self.head(features), size=targets.shape[-2:], mode="bilinear", align_corners=False)
        with torch.no_grad():
            accuracy = (logits.argmax(1) == targets.argmax(1)).float().mean()
        return StepOutput(colorization_loss(logits, targets, self.class_weights), {"colour_acc": accuracy},
                          embedding=features.mean(dim=(2, 3)))

    def export_metadata(self) -> dict[str, Any]:
        return {"input_space": "lab_l", "mean": [LAB_MEAN[0]], "std": [LAB_STD[0]]}
