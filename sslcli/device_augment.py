"""MultiView's augmentations for a whole batch at once, on the device the images are on (issue 10).

:class:`sslcli.augment.MultiView` augments one PIL image at a time in the DataLoader workers, so a
16-core host caps how many images a fast accelerator can see per second.  :class:`BatchedViews` takes
a batch of decoded images where they already are (on a GPU, after :func:`decode_batch`) and returns
what the loader collates MultiView's outputs to: one ``[B, 3, size, size]`` float32 tensor per view,
in view-group order, normalised by the config's mean and std.  Every random draw is per sample and
vectorised over the batch; the hot path is tensor ops only, with no host-device synchronisation.

The ops and their random parameters follow torchvision.transforms.v2 (the version MultiView builds):

- RandomResizedCrop: the same sampling rule (10 tries of area ~ U(scale), log ratio ~ U(log ratio),
  then the centre fallback), and torch's antialiased bilinear resize (``interpolate(...,
  antialias=True)``, what ``F.resized_crop`` does to a tensor), written as two per-sample resampling
  matrices applied with batched matmuls; the horizontal flip reverses the rows of the column matrix.
- ColorJitter with ``p = jitter_p``: per-sample factors and a per-sample random order of brightness,
  contrast, saturation and hue; RandomGrayscale; GaussianBlur with per-sample sigma; RandomSolarize at
  128 of 255.  Each equals v2.functional's float tensor op for the same parameters (tests check it).

Where it is not MultiView: MultiView works on 8-bit PIL images, so each op's output is rounded to
1/255 and PIL's own colour ops (e.g. its 8-bit HSV hue) run; here everything stays float32 from the
decoded pixels to the normalised views.  The random streams differ too (one generator per batch,
not the loader's per-sample seeds), so the views are identically distributed, not identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from sslcli.augment import AugmentConfig, ViewConfig

# RandomSolarize(threshold=128) inverts uint8 values >= 128; on [0, 1] floats that is x >= 128 / 255.
SOLARIZE_THRESHOLD = 128 / 255
# ITU-R 601 luma with torchvision's rounding of the weights (rgb_to_grayscale on tensors).
LUMA = (0.2989, 0.587, 0.114)
_JPEG_MAGIC = (0xFF, 0xD8, 0xFF)
_CROP_TRIES = 10
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def decode_batch(encoded: Sequence[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Encoded images (1-D uint8 CPU tensors, e.g. ``torch.frombuffer(data, dtype=torch.uint8)``) to
    uint8 ``[3, H_i, W_i]`` RGB tensors on ``device``.

    On CUDA the JPEGs are decoded on the GPU in one ``decode_jpeg(list, device=...)`` call (nvJPEG);
    other formats (the embedded shards' PNGs) are decoded on the CPU and copied.  Unlike
    :func:`sslcli.data.formats.decode_rgb`, an alpha channel is dropped, not composited onto white.
    torchvision 0.29 deprecates its image codecs in favour of TorchCodec (a DeprecationWarning).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return [decode_image(data, mode=ImageReadMode.RGB).to(device) for data in encoded]
    jpeg = [i for i, data in enumerate(encoded) if tuple(data[:3].tolist()) == _JPEG_MAGIC]
    out: list[torch.Tensor | None] = [None] * len(encoded)
    if jpeg:
        decoded = decode_jpeg([encoded[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        for i, image in zip(jpeg, decoded):
            out[i] = image
    for i, data in enumerate(encoded):
        if out[i] is None:
            out[i] = decode_image(data, mode=ImageReadMode.RGB).to(device, non_blocking=True)
    return out  # type: ignore[return-value]


def as_batch(images: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pixels, heights, widths)``: float32 ``[B, 3, H, W]`` in ``[0, 1]`` and each image's size ``[B]``.

    A uint8 batch is scaled as ``ToDtype(float32, scale=True)`` does (times 1/255); a float batch is
    taken to be in ``[0, 1]`` already.  A list of ``[3, H_i, W_i]`` images of different sizes is
    zero-padded at the bottom and right to the largest; the crops never reach the padding.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a [B, 3, H, W] batch, got shape {list(images.shape)}")
        batch, (b, _, h, w) = images, images.shape
        heights = torch.full((b,), float(h), device=images.device)
        widths = torch.full((b,), float(w), device=images.device)
    else:
        if not images or any(image.ndim != 3 or image.shape[0] != 3 for image in images):
            raise ValueError("expected a non-empty list of [3, H, W] images")
        if len({image.shape for image in images}) == 1:
            return as_batch(torch.stack(list(images)))
        h, w = max(image.shape[1] for image in images), max(image.shape[2] for image in images)
        batch = images[0].new_zeros((len(images), 3, h, w))
        for slot, image in zip(batch, images):  # shapes differ: no batched copy exists
            slot[:, :image.shape[1], :image.shape[2]] = image
        # An asynchronous copy: a blocking one from pageable memory would wait for the device's queue.
        sizes = torch.tensor([image.shape[1:] for image in images], dtype=torch.float32)
        heights, widths = sizes.to(images[0].device, non_blocking=True).unbind(dim=1)
    if batch.is_floating_point():
        return batch.float(), heights, widths
    return batch.float().mul_(1.0 / 255), heights, widths


@dataclass
class ViewParams:
    """One view's random draws for a batch of ``B`` images (all tensors on the batch's device).

    ``top``, ``left``, ``height``, ``width``: the crop in pixels (float32 holding integers), ``[B]``;
    ``flip``, ``jitter``, ``gray``, ``blur``, ``solarize``: bool ``[B]``, whether each op applies;
    ``order``: ``[B, 4]`` long, the colour ops' order (0 brightness, 1 contrast, 2 saturation, 3 hue);
    ``factors``: ``[B, 4]`` float, the factors in that same index order; ``sigma``: ``[B]``, the blur's.
    """

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor


def _uniform(shape: tuple[int, ...], low: float, high: float, gen: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=device).mul_(high - low).add_(low)


def _bernoulli(n: int, p: float, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) < p


def draw_crops(view: ViewConfig, heights: torch.Tensor, widths: torch.Tensor,
               gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(top, left, height, width)`` per image ``[B]``: ``RandomResizedCrop.make_params``'s rule with its
    10 tries drawn at once; each image takes its first try that fits, else the centre fallback."""
    n, device = heights.shape[0], heights.device
    log_lo, log_hi = math.log(view.ratio[0]), math.log(view.ratio[1])
    area = (heights * widths)[:, None] * _uniform((n, _CROP_TRIES), view.scale[0], view.scale[1], gen, device)
    aspect = _uniform((n, _CROP_TRIES), log_lo, log_hi, gen, device).exp_()
    w = (area * aspect).sqrt_().round_()  # round half to even, as Python's round()
    h = (area / aspect).sqrt_().round_()
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = fits.int().argmax(dim=1, keepdim=True)  # argmax returns the first of equal maxima
    found = fits.any(dim=1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # The fallback: the whole image, cut to the nearest ratio bound when it lies outside them.
    low, high = min(view.ratio), max(view.ratio)
    in_ratio = widths / heights
    fallback_w = torch.where(in_ratio > high, (heights * high).round(), widths)
    fallback_h = torch.where(in_ratio < low, (widths / low).round(), heights)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    # randint(0, H - h + 1) for a found crop, (H - h) // 2 for the fallback.
    u = torch.rand((2, n), generator=gen, device=device)
    top = torch.where(found, (u[0] * (heights - h + 1)).floor().clamp_(max=heights - h), (heights - h).div(2).floor())
    left = torch.where(found, (u[1] * (widths - w + 1)).floor().clamp_(max=widths - w), (widths - w).div(2).floor())
    return top, left, h, w


def resample_matrix(start: torch.Tensor, length: torch.Tensor, size: int, extent: int) -> torch.Tensor:
    """``[B, size, extent]`` weights that resize pixels ``[start, start + length)`` of an axis to ``size``.

    torch's antialiased bilinear rule (``interpolate(..., mode="bilinear", antialias=True)``): output
    pixel ``i`` has centre ``c = (i + 0.5) * s`` in crop pixels, ``s = length / size``, and input pixel
    ``j`` weight ``max(0, 1 - |j + 0.5 - c| / max(s, 1))``, normalised over the crop's pixels.  When
    upsampling (``s < 1``) that is plain bilinear with ``align_corners=False``.
    """
    scale = (length / size)[:, None, None]
    centre = (torch.arange(size, device=start.device, dtype=torch.float32)[None, :, None] + 0.5) * scale
    j = torch.arange(extent, device=start.device, dtype=torch.float32)[None, None, :] - start[:, None, None]
    weights = (1 - (j + 0.5 - centre).abs_() / scale.clamp(min=1)).clamp_(min=0)
    weights = weights * ((j >= 0) & (j < length[:, None, None]))
    return weights / weights.sum(dim=-1, keepdim=True)


def crop_resize(pixels: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor,
                width: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, 3, size, size]``: ``F.resized_crop(x, top, left, h, w, size, antialias=True)``
    then ``F.horizontal_flip`` where ``flip``, per sample, as ``rows @ x @ columns^T``."""
    rows = resample_matrix(top, height, size, pixels.shape[-2])
    cols = resample_matrix(left, width, size, pixels.shape[-1])
    cols = torch.where(flip[:, None, None], cols.flip(1), cols)  # mirrored output columns
    return rows.unsqueeze(1) @ pixels @ cols.unsqueeze(1).transpose(-1, -2)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, 1, H, W]``: ``0.2989 r + 0.587 g + 0.114 b`` (``F.rgb_to_grayscale``)."""
    r, g, b = x.unbind(dim=1)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values[:, None, None, None]


def blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``: ``clamp(ratio * x + (1 - ratio) * other, 0, 1)`` with ``ratio`` ``[B]``.
    Brightness blends with 0, contrast with the grayscale mean, saturation with the grayscale image."""
    ratio = _per_sample(ratio)
    return (x * ratio).add_(other * (1 - ratio)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``F.adjust_hue`` with a factor per sample ``[B]``: RGB -> HSV (PIL's formulas, as torchvision
    writes them), hue shifted by ``factor`` turns, HSV -> RGB.

    The way back uses the closed form ``c = v - v s clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6 h) mod 6``, ``n = 5, 3, 1`` for r, g, b: the same function as torchvision's
    sector table (``v, p, q, t`` picked by ``floor(6 h)``), without its index and gather, which
    cost more than the rest of the op; the results differ by float rounding only.
    """
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    # Grey pixels have spread 0, so saturation 0 and hue 0; the floors only avoid 0 / 0 there
    # (torchvision swaps in 1), and leave every other value as it is.
    tiny = torch.finfo(x.dtype).tiny
    spread = maxc - minc
    s = spread / maxc.clamp_min(tiny)
    spread = spread.clamp_min(tiny)
    rc, gc, bc = (maxc - r) / spread, (maxc - g) / spread, (maxc - b) / spread
    # Hue in sixths of a turn, in [-1, 5).
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = h.add_(6.0 * factor[:, None, None])
    offsets = torch.arange(5.0, 0.0, -2.0, device=x.device)  # n = 5, 3, 1, made on the device: no copy
    k = (h[:, None] + offsets[None, :, None, None]).remainder_(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0, 1)
    v = maxc[:, None]
    return v - v * s[:, None] * ramp


def color_jitter(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor, use_hue: bool = True) -> torch.Tensor:
    """``ColorJitter.transform`` per sample: ``x`` ``[B, 3, H, W]`` in ``[0, 1]``, the ops in ``order``
    ``[B, 4]`` with ``factors`` ``[B, 4]`` (brightness, contrast, saturation, hue).

    At step ``k`` each sample runs op ``order[:, k]``: the three blends are one blend whose target and
    ratio are picked per sample, hue is computed for the batch and kept where it is the op (so hue
    costs four passes: choosing the samples that need it would cost a host-device sync).  A blend
    factor of 1 leaves a sample unchanged, as an op ColorJitter was built without; with
    ``use_hue=False`` the hue steps leave it unchanged too (``ColorJitter(hue=0)``).
    """
    zero = x.new_zeros(())
    for k in range(4):
        op = order[:, k]
        gray = grayscale(x)
        target = torch.where(_per_sample(op == CONTRAST), gray.mean(dim=(1, 2, 3), keepdim=True), gray)
        target = torch.where(_per_sample(op == BRIGHTNESS), zero, target)
        ratio = factors.gather(1, op.clamp(max=SATURATION)[:, None]).squeeze(1)
        mixed = blend(x, target, torch.where(op == HUE, torch.ones_like(ratio), ratio))
        if use_hue:
            mixed = torch.where(_per_sample(op == HUE), adjust_hue(x, factors[:, HUE]), mixed)
        x = mixed
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """``F.gaussian_blur(x, kernel, sigma)`` with a sigma per sample ``[B]``: weights
    ``softmax(-(t / sigma)^2)`` at ``t = linspace(-lim, lim, kernel)``, ``lim = (kernel - 1) / (2 sqrt 2)``,
    reflect padding; applied as two 1-D grouped convolutions (torchvision uses their 2-D outer product)."""
    b, c, h, w = x.shape
    lim = (kernel - 1) / (2.0 * math.sqrt(2.0))
    t = torch.linspace(-lim, lim, kernel, device=x.device, dtype=x.dtype)
    weights = torch.softmax(-(t[None] / sigma[:, None]).pow(2), dim=1)
    weights = weights[:, None].expand(b, c, kernel).reshape(b * c, kernel)  # one filter per channel
    pad = kernel // 2
    y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, weights[:, None, None, :], groups=b * c)
    y = F.conv2d(y, weights[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def blur_kernel(size: int) -> int:
    """The blur kernel of a view of side ``size``: about 10%, odd, at least 3 (as sslcli.augment)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


class BatchedViews:
    """A batch of images -> :class:`~sslcli.augment.MultiView`'s views for each, batched on their device.

    Call it with uint8 or float (``[0, 1]``) images, ``[B, 3, H, W]`` or a list of ``[3, H_i, W_i]``
    (e.g. :func:`decode_batch`'s output), and optionally a ``torch.Generator`` on their device for
    reproducible draws.  It returns ``num_views`` float32 tensors ``[B, 3, size_v, size_v]`` in
    view-group order, normalised: the loader's ``batch["views"]`` for MultiView(cfg).
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.views = [v for v in cfg.views for _ in range(v.count)]
        self._stats = torch.tensor([cfg.mean, cfg.std], dtype=torch.float32)[:, None, :, None, None]
        self._stats_on: dict[torch.device, torch.Tensor] = {}

    def _normalisation(self, device: torch.device) -> torch.Tensor:
        """``[2, 1, 3, 1, 1]``: mean and std, copied to ``device`` once, without blocking (the source lives on)."""
        if device not in self._stats_on:
            self._stats_on[device] = self._stats.to(device, non_blocking=True)
        return self._stats_on[device]

    @property
    def num_views(self) -> int:
        return len(self.views)

    def draw(self, view: ViewConfig, heights: torch.Tensor, widths: torch.Tensor,
             gen: torch.Generator | None = None) -> ViewParams:
        """One view's parameters for images of sizes ``heights``, ``widths`` ``[B]``, drawn as v2's
        transforms draw them per image (ColorJitter's ranges: ``[max(0, 1 - x), 1 + x]``, hue ``[-x, x]``)."""
        n, device = heights.shape[0], heights.device
        top, left, height, width = draw_crops(view, heights, widths, gen)
        flip = _bernoulli(n, view.flip, gen, device)
        jitter = _bernoulli(n, view.jitter_p, gen, device)
        order = torch.rand((n, 4), generator=gen, device=device).argsort(dim=1)  # a uniform permutation each
        bounds = [(max(0.0, 1 - x), 1 + x) for x in view.jitter[:3]] + [(-view.jitter[3], view.jitter[3])]
        factors = torch.stack([_uniform((n,), lo, hi, gen, device) for lo, hi in bounds], dim=1)
        gray = _bernoulli(n, view.gray_p, gen, device)
        blur = _bernoulli(n, view.blur_p, gen, device)
        sigma = _uniform((n,), view.blur_sigma[0], view.blur_sigma[1], gen, device)
        solarize = _bernoulli(n, view.solarize_p, gen, device)
        return ViewParams(top, left, height, width, flip, jitter, order, factors, gray, blur, sigma, solarize)

    def render(self, pixels: torch.Tensor, view: ViewConfig, p: ViewParams) -> torch.Tensor:
        """One view of each image of ``pixels`` (float ``[B, 3, H, W]`` in ``[0, 1]``) with drawn ``p``:
        crop + flip, jitter, grayscale, blur, solarize, normalise, in MultiView's order."""
        x = crop_resize(pixels, p.top, p.left, p.height, p.width, p.flip, view.size)
        # The config's constants decide which ops exist at all, as in sslcli.augment: no data-dependent branch.
        if view.jitter_p > 0 and any(view.jitter):
            jittered = color_jitter(x, p.order, p.factors, use_hue=view.jitter[3] > 0)
            x = torch.where(_per_sample(p.jitter), jittered, x)
        if view.gray_p > 0:
            x = torch.where(_per_sample(p.gray), grayscale(x).expand_as(x), x)
        if view.blur_p > 0:
            x = torch.where(_per_sample(p.blur), gaussian_blur(x, p.sigma, blur_kernel(view.size)), x)
        if view.solarize_p > 0:
            x = torch.where(_per_sample(p.solarize) & (x >= SOLARIZE_THRESHOLD), 1.0 - x, x)
        mean, std = self._normalisation(x.device)
        return x.sub_(mean).div_(std)

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor],
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
        pixels, heights, widths = as_batch(images)
        return [self.render(pixels, v, self.draw(v, heights, widths, generator)) for v in self.views]
