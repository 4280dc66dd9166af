"""Augmented views, built with torchvision.transforms.v2 from one config per view group.

A recipe lists view groups; each group has a ``count`` so multi-crop is just more groups,
e.g. ``[{count: 2, size: 224, scale: [0.14, 1]}, {count: 6, size: 96, scale: [0.05, 0.14]}]``.
Asymmetric pipelines (BYOL's blur 1.0 / 0.1) are two groups of ``count: 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torchvision.transforms.v2 as T
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ViewConfig:
    """One group of identically distributed views."""

    count: int = 2
    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # scale [1, 1] + ratio [1, 1] = the whole image, resized
    flip: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


@dataclass
class AugmentConfig:
    views: list[ViewConfig] = field(default_factory=lambda: [ViewConfig()])
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    eval_crop_pct: float = 0.875

    @property
    def num_views(self) -> int:
        return sum(v.count for v in self.views)

    @property
    def eval_size(self) -> int:
        """Evaluation resolution: the first (global) view's size."""
        return self.views[0].size


def _to_tensor(mean: Sequence[float], std: Sequence[float]) -> list[T.Transform]:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]


def view_transform(v: ViewConfig, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    ops: list[T.Transform] = [T.RandomResizedCrop(v.size, scale=tuple(v.scale), ratio=tuple(v.ratio), antialias=True)]
    if v.flip > 0:
        ops.append(T.RandomHorizontalFlip(v.flip))
    if v.jitter_p > 0:
        ops.append(T.RandomApply([T.ColorJitter(*v.jitter)], p=v.jitter_p))
    if v.gray_p > 0:
        ops.append(T.RandomGrayscale(v.gray_p))
    if v.blur_p > 0:
        # Kernel of ~10% of the crop side, odd, as in SimCLR.
        kernel = max(3, int(0.1 * v.size) // 2 * 2 + 1)
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=tuple(v.blur_sigma))], p=v.blur_p))
    if v.solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=v.solarize_p))
    return T.Compose(ops + _to_tensor(mean, std))


class MultiView:
    """PIL image -> list of view tensors, in view-group order."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.transforms = [view_transform(v, cfg.mean, cfg.std) for v in cfg.views for _ in range(v.count)]

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [t(img) for t in self.transforms]


def eval_transform(size: int, crop_pct: float = 0.875, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the shorter side to ``size / crop_pct``, then centre-crop ``size``.

    ``crop_pct`` 0.875 is the ImageNet protocol; 1.0 keeps the whole image (small data whose
    objects may touch the border, such as the embedded dataset).
    """
    return T.Compose([T.Resize(round(size / crop_pct), antialias=True), T.CenterCrop(size), *_to_tensor(mean, std)])
