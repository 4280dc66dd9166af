"""Colour-space conversions in torch, and the named input spaces an encoder can expect.

CIE L*a*b* as scikit-image's ``rgb2lab`` computes it (the conversion CMC's code applies to every
crop): sRGB in ``[0, 1]`` -> linear RGB (inverse sRGB gamma) -> XYZ (sRGB/D65 matrix) -> divided
by the D65 2-degree white point -> ``f(t) = t^(1/3)`` above ``0.008856``, else ``7.787 t + 16/116``
-> ``L = 116 f(Y) - 16``, ``a = 500 (f(X) - f(Y))``, ``b = 200 (f(Y) - f(Z))``.  ``L`` lies in
``[0, 100]``, ``a`` and ``b`` roughly in ``[-87, 99]`` and ``[-108, 95]`` for sRGB colours.

An exported encoder records the space its input is in (metadata ``input_space``); the evaluation
transform converts the ``[0, 1]`` RGB image to it before normalising with the recorded mean/std:

- ``rgb``: the image itself (3 channels), every method but CMC;
- ``lab``: L, a, b (3 channels);
- ``lab_l``: L only (1 channel), CMC's exported L encoder;
- ``lab_ab``: a and b (2 channels), CMC's ab encoder;
- ``sobel``: horizontal and vertical Sobel gradients of the grey image (2 channels), DeepCluster's
  fixed input filter (grey = 0.299 R + 0.587 G + 0.114 B, 3x3 Sobel kernels, zero padding).
"""

from __future__ import annotations

import torch

# CMC (train_CMC.py): each Lab channel mapped from its sRGB range to [-1, 1] by (x - mid) / half-range.
LAB_MEAN = ((0 + 100) / 2, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
LAB_STD = ((100 - 0) / 2, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)

# scikit-image's sRGB (D65) -> XYZ matrix and D65 2-degree reference white.
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)

# Lab spaces -> the channels of the full Lab image they keep.
_LAB_CHANNELS: dict[str, tuple[int, ...]] = {"lab": (0, 1, 2), "lab_l": (0,), "lab_ab": (1, 2)}
# space -> number of channels.
INPUT_SPACES: dict[str, int] = {"rgb": 3, **{k: len(v) for k, v in _LAB_CHANNELS.items()}, "sobel": 2}
_GREY = (0.299, 0.587, 0.114)
_SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE Lab of sRGB values in ``[0, 1]``, channels at dim ``-3`` (``[..., 3, H, W]``).

    Computed in float32 (float64 input stays float64); values outside ``[0, 1]`` are clamped.
    Matches ``skimage.color.rgb2lab`` (D65, 2-degree observer), see the module docstring.
    """
    if rgb.ndim < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"expected RGB channels at dim -3, got shape {tuple(rgb.shape)}")
    dtype = torch.float64 if rgb.dtype == torch.float64 else torch.float32
    c = rgb.to(dtype).clamp(0.0, 1.0)
    linear = torch.where(c > 0.04045, ((c + 0.055) / 1.055).pow(2.4), c / 12.92)
    matrix = torch.tensor(_XYZ_FROM_RGB, dtype=dtype, device=c.device)
    white = torch.tensor(_WHITE_D65, dtype=dtype, device=c.device)
    xyz = torch.einsum("ij,...jhw->...ihw", matrix, linear) / white[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856).pow(1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(dim=-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def sobel(rgb: torch.Tensor) -> torch.Tensor:
    """Sobel gradients ``[..., 2, H, W]`` (x then y) of the grey image of ``rgb`` ``[..., 3, H, W]``.

    Linear in ``rgb``, so it commutes with any per-image affine intensity change up to scale; it keeps
    edges and drops colour, the trivial cue DeepCluster's clustering would otherwise latch onto.
    """
    lead = rgb.shape[:-3]
    x = rgb.reshape(-1, 3, *rgb.shape[-2:])
    grey = torch.einsum("c,bchw->bhw", torch.tensor(_GREY, dtype=x.dtype, device=x.device), x)[:, None]
    kx = torch.tensor(_SOBEL_X, dtype=x.dtype, device=x.device)
    kernels = torch.stack([kx, kx.T])[:, None]  # [2, 1, 3, 3]: d/dx, d/dy
    return torch.nn.functional.conv2d(grey, kernels, padding=1).reshape(*lead, 2, *rgb.shape[-2:])


def to_input_space(rgb: torch.Tensor, space: str) -> torch.Tensor:
    """``rgb`` (``[..., 3, H, W]`` in ``[0, 1]``) converted to the named input space (module docstring)."""
    if space not in INPUT_SPACES:
        raise ValueError(f"unknown input space {space!r}; known: {', '.join(INPUT_SPACES)}")
    if space == "rgb":
        return rgb
    if space == "sobel":
        return sobel(rgb)
    channels = _LAB_CHANNELS[space]
    lab = rgb_to_lab(rgb)
    return lab if channels == (0, 1, 2) else lab[..., list(channels), :, :]


def input_channels(space: str) -> int:
    """Number of channels of an input space."""
    return INPUT_SPACES[space]


class ToInputSpace:
    """A transform: a ``[3, H, W]`` float RGB tensor in ``[0, 1]`` -> the named input space."""

    def __init__(self, space: str) -> None:
        if space not in INPUT_SPACES:
            raise ValueError(f"unknown input space {space!r}; known: {', '.join(INPUT_SPACES)}")
        self.space = space

    def __call__(self, rgb: torch.Tensor) -> torch.Tensor:
        # A plain tensor: later v2 transforms treat it as the image (tv_tensor subclasses are dropped).
        return to_input_space(rgb.as_subclass(torch.Tensor), self.space).contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.space!r})"


def normalised_rgb_to_lab(x: torch.Tensor, rgb_mean: torch.Tensor, rgb_std: torch.Tensor, lab_mean: torch.Tensor,
                          lab_std: torch.Tensor) -> torch.Tensor:
    """Normalised Lab ``(Lab(x * rgb_std + rgb_mean) - lab_mean) / lab_std`` of normalised RGB ``[B, 3, H, W]``.

    Always float32 and outside autocast: the cube root and the gamma curve lose too much in bf16.
    Mean and std are ``[1, 3, 1, 1]`` tensors on ``x``'s device.
    """
    with torch.autocast(x.device.type, enabled=False):
        return (rgb_to_lab(x.float() * rgb_std + rgb_mean) - lab_mean) / lab_std
