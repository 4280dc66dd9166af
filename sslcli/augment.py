"""Augmented views, built with torchvision.transforms.v2 from one config per view group.

A recipe lists view groups; each group has a ``count`` so multi-crop is just more groups,
e.g. ``[{count: 2, size: 224, scale: [0.14, 1]}, {count: 6, size: 96, scale: [0.05, 0.14]}]``.
Asymmetric pipelines (BYOL's blur 1.0 / 0.1) are two groups of ``count: 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torchvision import tv_tensors

from sslcli.colorspace import ToInputSpace

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
    # None: the first view's size. A method trained on parts of its crops (CPC's patches) may set another.
    eval_image_size: int | None = None

    @property
    def num_views(self) -> int:
        return sum(v.count for v in self.views)

    @property
    def eval_size(self) -> int:
        """Evaluation resolution: ``eval_image_size``, else the first (global) view's size."""
        return self.eval_image_size or self.views[0].size


def _to_tensor(mean: Sequence[float], std: Sequence[float]) -> list[T.Transform]:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]


def _spatial_ops(v: ViewConfig) -> list[T.Transform]:
    """Crop and flip: the ops that extra fields (depth, ...) share with the image."""
    ops: list[T.Transform] = [T.RandomResizedCrop(v.size, scale=tuple(v.scale), ratio=tuple(v.ratio), antialias=True)]
    if v.flip > 0:
        ops.append(T.RandomHorizontalFlip(v.flip))
    return ops


def _photometric_ops(v: ViewConfig) -> list[T.Transform]:
    """Colour, blur and solarisation: the image's alone."""
    ops: list[T.Transform] = []
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
    return ops


def view_transform(v: ViewConfig, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    return T.Compose(_spatial_ops(v) + _photometric_ops(v) + _to_tensor(mean, std))


# Extra fields (depth, normals, ...) in [0, 1] are mapped to [-1, 1]; they get no colour statistics.
EXTRA_MEAN, EXTRA_STD = 0.5, 0.5


class MultiView:
    """PIL image -> list of view tensors, in view-group order.

    With ``extra_fields`` (sample field -> channels, e.g. ``{"depth.png": 1}``) it is called as
    ``(image, extras)`` with ``extras`` mapping each field to a float ``[C, H, W]`` tensor in
    ``[0, 1]`` (see :func:`sslcli.data.formats.decode_field`): every view's crop and flip are
    applied to the image and to each extra alike (one draw of the random parameters), colour
    ops to the image only.  The output is the image views, then for each extra field (in the
    given order) its crop of each view: ``[img_0 .. img_{V-1}, depth_0 .. depth_{V-1}, ...]``;
    extras are normalised by ``(x - 0.5) / 0.5``.  An extra of another size than the image is
    first resized to it (bilinear).  The loader sees ``extra_fields`` and supplies ``extras``.
    """

    def __init__(self, cfg: AugmentConfig, extra_fields: Mapping[str, int] | None = None) -> None:
        self.extra_fields: dict[str, int] = dict(extra_fields or {})
        views = [v for v in cfg.views for _ in range(v.count)]
        self.transforms = [view_transform(v, cfg.mean, cfg.std) for v in views]
        self._spatial = [T.Compose(_spatial_ops(v)) for v in views]
        self._rest = [T.Compose(_photometric_ops(v) + _to_tensor(cfg.mean, cfg.std)) for v in views]

    def __call__(self, img: Image.Image, extras: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        if not self.extra_fields:
            return [t(img) for t in self.transforms]
        if extras is None or set(extras) != set(self.extra_fields):
            raise ValueError(f"expected extra fields {sorted(self.extra_fields)}, got {sorted(extras or {})}")
        size = [img.height, img.width]
        fields = [tv_tensors.Image(_resized(extras[name], size)) for name in self.extra_fields]
        images, per_field = [], [[] for _ in fields]
        for spatial, rest in zip(self._spatial, self._rest):
            img_v, *fields_v = spatial(img, *fields)  # one draw of crop and flip for all of them
            images.append(rest(img_v))
            for out, field in zip(per_field, fields_v):
                out.append(((field.as_subclass(torch.Tensor) - EXTRA_MEAN) / EXTRA_STD).contiguous())
        return images + [view for views in per_field for view in views]


def _resized(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    if list(x.shape[-2:]) == size:
        return x
    return torch.nn.functional.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def eval_transform(size: int, crop_pct: float = 0.875, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD,
                   input_space: str = "rgb") -> Callable[[Image.Image], torch.Tensor]:
    """Resize the shorter side to ``size / crop_pct``, then centre-crop ``size``.

    ``crop_pct`` 0.875 is the ImageNet protocol; 1.0 keeps the whole image (small data whose
    objects may touch the border, such as the embedded dataset).  ``input_space`` other than
    ``rgb`` (e.g. ``lab_l``, see :mod:`sslcli.colorspace`) converts the ``[0, 1]`` image before
    ``mean`` / ``std``, which then hold one value per channel of that space.
    """
    ops: list = [T.Resize(round(size / crop_pct), antialias=True), T.CenterCrop(size)]
    if input_space == "rgb":
        return T.Compose([*ops, *_to_tensor(mean, std)])
    return T.Compose([*ops, T.ToImage(), T.ToDtype(torch.float32, scale=True), ToInputSpace(input_space),
                      T.Normalize(list(mean), list(std))])
