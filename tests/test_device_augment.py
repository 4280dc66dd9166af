"""Batched device augmentation (sslcli.device_augment) against torchvision's per-image ops and MultiView.

Each op is checked against v2.functional's float tensor op for the same parameters (the "numerically
equal" check of issue 10), the random draws against the configured ranges and probabilities and
against RandomResizedCrop's own sampling.  Runs on the CPU; the code has no device-specific path
beyond decode_batch's nvJPEG call.  Speed: benchmarks/device_augment.py.
"""

from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import encode_jpeg, encode_png

from sslcli.augment import AugmentConfig, MultiView, ViewConfig
from sslcli.device_augment import (
    SOLARIZE_THRESHOLD,
    BatchedViews,
    ViewParams,
    adjust_hue,
    as_batch,
    blend,
    blur_kernel,
    color_jitter,
    crop_resize,
    decode_batch,
    draw_crops,
    gaussian_blur,
    grayscale,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# No colour op, no flip: only the crop and the normalisation (here the identity).
PLAIN = ViewConfig(count=1, size=24, flip=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
WHOLE = replace(PLAIN, scale=(1.0, 1.0), ratio=(1.0, 1.0))
IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean, std


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 images ``[n, 3, h, w]`` (upsampled noise: structure at several scales)."""
    coarse = torch.rand(n, 3, max(2, h // 6), max(2, w // 6), generator=gen(seed))
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    noisy = smooth + 0.05 * torch.randn(n, 3, h, w, generator=gen(seed + 1))
    return (noisy.clamp(0, 1) * 255).round().to(torch.uint8)


def single(view: ViewConfig) -> BatchedViews:
    return BatchedViews(AugmentConfig(views=[view], mean=IDENTITY[0], std=IDENTITY[1]))


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def test_views_match_multiview_in_number_shape_dtype_and_order() -> None:
    cfg = AugmentConfig(views=[ViewConfig(count=2, size=32, scale=(0.3, 1.0)),
                               ViewConfig(count=4, size=16, scale=(0.05, 0.3), solarize_p=0.2)])
    batch = images(5, 48, 40)
    views = BatchedViews(cfg)(batch, gen())
    reference = MultiView(cfg)(to_pil(batch[0]))
    assert len(views) == len(reference) == cfg.num_views == 6
    for got, ref in zip(views, reference):
        assert got.shape == (5, *ref.shape) and got.dtype == ref.dtype == torch.float32
    assert [v.shape[-1] for v in views] == [32, 32, 16, 16, 16, 16]
    assert all(torch.isfinite(v).all() for v in views)


def test_the_whole_image_crop_is_a_plain_resize_and_flip_mirrors_it_exactly() -> None:
    x = images(3, 40, 40)
    pixels = x.float() / 255
    for size in (24, 56):  # down- (antialiased) and upsampling
        view = replace(WHOLE, size=size)
        out = single(view)(x, gen())[0]
        ref = TF.resize(pixels, [size, size], antialias=True)
        assert (out - ref).abs().max() < 1e-5
        mirrored = single(replace(view, flip=1.0))(x, gen())[0]
        assert torch.equal(mirrored, out.flip(-1))


def test_the_whole_image_crop_is_close_to_multiviews_pil_resize() -> None:
    """MultiView resizes the 8-bit PIL image (PIL's antialiased bilinear, rounded to 1/255): the
    float path differs by about the rounding."""
    x = images(4, 64, 64)
    view = replace(WHOLE, size=32)
    out = single(view)(x, gen())[0]
    pil = torch.stack([MultiView(AugmentConfig(views=[view], mean=IDENTITY[0], std=IDENTITY[1]))(to_pil(i))[0]
                       for i in x])
    diff = (out - pil).abs()
    assert diff.mean() < 0.45 / 255 and diff.max() < 1.5 / 255  # measured: 0.29 / 255 and 0.95 / 255


def test_drawn_crops_are_resized_like_torchvisions_resized_crop_and_flip() -> None:
    x = images(12, 45, 60).float() / 255
    h, w = torch.full((12,), 45.0), torch.full((12,), 60.0)
    top, left, height, width = draw_crops(replace(PLAIN, scale=(0.05, 1.0)), h, w, gen(3))
    flip = torch.arange(12) % 2 == 1
    out = crop_resize(x, top, left, height, width, flip, 24)
    for i in range(12):
        ref = TF.resized_crop(x[i], int(top[i]), int(left[i]), int(height[i]), int(width[i]), [24, 24],
                              antialias=True)
        ref = TF.horizontal_flip(ref) if flip[i] else ref
        assert (out[i] - ref).abs().max() < 1e-5


def test_crop_sampling_follows_random_resized_crop() -> None:
    view = replace(PLAIN, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    n, height, width = 4000, 60, 80
    top, left, h, w = draw_crops(view, torch.full((n,), 60.0), torch.full((n,), 80.0), gen())
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area, log_aspect = h * w / (height * width), (w / h).log()
    # Rounding the sides to pixels moves the area and ratio slightly past the bounds.
    assert area.min() > 0.07 and area.max() <= 1.0
    assert log_aspect.abs().max() < math.log(4 / 3) + 0.1
    torch.manual_seed(0)
    rrc = T.RandomResizedCrop(24, scale=view.scale, ratio=view.ratio)
    drawn = [rrc.make_params([torch.zeros(3, height, width)]) for _ in range(2000)]
    ref_area = torch.tensor([d["height"] * d["width"] / (height * width) for d in drawn])
    ref_aspect = torch.tensor([math.log(d["width"] / d["height"]) for d in drawn])
    assert abs(area.mean() - ref_area.mean()) < 0.02 and abs(area.std() - ref_area.std()) < 0.02
    assert abs(log_aspect.mean() - ref_aspect.mean()) < 0.02 and abs(log_aspect.std() - ref_aspect.std()) < 0.02
    assert area.min() < 0.1 and area.max() > 0.95  # the whole range is drawn


@pytest.mark.parametrize("shape,ratio", [((40, 40), (2.0, 3.0)), ((20, 90), (0.5, 2.0)), ((30, 30), (1.0, 1.0))])
def test_the_fallback_is_torchvisions_centre_crop(shape: tuple[int, int], ratio: tuple[float, float]) -> None:
    """No try fits (scale 1 with a ratio the image does not have): the centre crop at the nearest ratio."""
    view = replace(PLAIN, scale=(1.0, 1.0), ratio=ratio)
    h, w = shape
    got = draw_crops(view, torch.full((8,), float(h)), torch.full((8,), float(w)), gen())
    ref = T.RandomResizedCrop(24, scale=view.scale, ratio=ratio).make_params([torch.zeros(3, h, w)])
    for value, key in zip(got, ("top", "left", "height", "width")):
        assert (value == ref[key]).all(), key


def test_probabilities_are_respected_per_sample() -> None:
    view = ViewConfig(flip=0.3, jitter_p=0.8, gray_p=0.2, blur_p=0.5, solarize_p=0.1)
    n = 20000
    p = BatchedViews(AugmentConfig(views=[view])).draw(view, torch.full((n,), 8.0), torch.full((n,), 8.0), gen())
    for drawn, expected in ((p.flip, 0.3), (p.jitter, 0.8), (p.gray, 0.2), (p.blur, 0.5), (p.solarize, 0.1)):
        assert abs(drawn.float().mean().item() - expected) < 0.015
    assert (p.sigma >= 0.1).all() and (p.sigma <= 2.0).all()
    lo, hi = torch.tensor([0.6, 0.6, 0.6, -0.1]), torch.tensor([1.4, 1.4, 1.4, 0.1])
    assert (p.factors >= lo).all() and (p.factors <= hi).all()
    assert (p.factors.mean(0) - (lo + hi) / 2).abs().max() < 0.01
    # Every op at every position about equally often: a uniform permutation per sample.
    counts = torch.stack([torch.bincount(p.order[:, k], minlength=4) for k in range(4)]).float() / n
    assert (counts - 0.25).abs().max() < 0.015
    assert len({tuple(o) for o in p.order.tolist()}) == 24


def test_rendered_views_grayscale_and_flip_at_their_rates() -> None:
    x = images(1, 12, 12).expand(600, -1, -1, -1)
    gray = single(replace(WHOLE, size=12, gray_p=0.3))(x, gen())[0]
    is_gray = (gray[:, 0] == gray[:, 1]).flatten(1).all(1) & (gray[:, 1] == gray[:, 2]).flatten(1).all(1)
    assert abs(is_gray.float().mean().item() - 0.3) < 0.06
    flipped = single(replace(WHOLE, size=12, flip=0.5))(x, gen(1))[0]
    plain = x[0].float() / 255
    is_flipped = (flipped - plain.flip(-1)).flatten(1).abs().amax(1) < 1e-6
    is_plain = (flipped - plain).flatten(1).abs().amax(1) < 1e-6
    assert (is_flipped ^ is_plain).all() and abs(is_flipped.float().mean().item() - 0.5) < 0.07


def test_each_colour_op_equals_torchvisions_for_the_same_factor() -> None:
    x = images(6, 20, 20).float() / 255
    factors = torch.tensor([0.0, 0.3, 0.9, 1.0, 1.4, 2.0])
    hues = torch.tensor([-0.5, -0.2, 0.0, 0.05, 0.3, 0.5])
    gray, black = grayscale(x), torch.zeros(())
    for i in range(6):
        f = factors[i].item()
        close = {
            "brightness": (blend(x, black, factors)[i], TF.adjust_brightness(x[i], f)),
            "contrast": (blend(x, gray.mean(dim=(1, 2, 3), keepdim=True), factors)[i], TF.adjust_contrast(x[i], f)),
            "saturation": (blend(x, gray, factors)[i], TF.adjust_saturation(x[i], f)),
            "hue": (adjust_hue(x, hues)[i], TF.adjust_hue(x[i], hues[i].item())),
            "grayscale": (gray[i].expand(3, -1, -1), TF.rgb_to_grayscale(x[i], num_output_channels=3)),
        }
        for name, (got, ref) in close.items():
            # Hue's closed-form way back to RGB rounds differently: measured up to 1.4e-6 (12 ulps of 1).
            assert (got - ref).abs().max() < (3e-6 if name == "hue" else 1e-6), (name, i)


def test_colour_jitter_runs_each_samples_own_order_like_color_jitter() -> None:
    x = images(24, 16, 16).float() / 255
    order = torch.stack([torch.randperm(4, generator=gen(i)) for i in range(24)])
    u = torch.rand(24, 4, generator=gen(1))
    factors = torch.cat([0.4 + 1.2 * u[:, :3], u[:, 3:] - 0.5], dim=1)
    out = color_jitter(x, order, factors)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(24):
        ref = x[i]
        for op in order[i].tolist():
            ref = ops[op](ref, factors[i, op].item())
        assert (out[i] - ref).abs().max() < 3e-6, i
    # Without hue the hue steps leave the image as it is.
    no_hue = color_jitter(x, order, factors, use_hue=False)
    for i in range(4):
        ref = x[i]
        for op in (o for o in order[i].tolist() if o != 3):
            ref = ops[op](ref, factors[i, op].item())
        assert (no_hue[i] - ref).abs().max() < 1e-6


def test_blur_and_solarize_equal_torchvisions_with_the_drawn_parameters() -> None:
    x = images(8, 24, 24)
    pixels = x.float() / 255
    view = replace(WHOLE, blur_p=1.0, blur_sigma=(0.1, 2.0))
    bv = single(view)
    params = bv.draw(view, torch.full((8,), 24.0), torch.full((8,), 24.0), gen())
    out = bv.render(pixels, view, params)
    kernel = blur_kernel(24)
    for i in range(8):
        ref = TF.gaussian_blur(pixels[i], [kernel, kernel], [params.sigma[i].item()] * 2)
        assert (out[i] - ref).abs().max() < 1e-6
    assert (gaussian_blur(pixels, torch.full((8,), 1.0), 3)[2] - TF.gaussian_blur(pixels[2], [3, 3], [1.0, 1.0])
            ).abs().max() < 1e-6
    solar = single(replace(WHOLE, solarize_p=1.0))(x, gen())[0]
    assert (solar - TF.solarize(pixels, SOLARIZE_THRESHOLD)).abs().max() < 1e-6
    # 128 / 255 is RandomSolarize(128) on 8-bit images, as MultiView applies it to PIL images.
    pil = MultiView(AugmentConfig(views=[replace(WHOLE, solarize_p=1.0)], mean=IDENTITY[0], std=IDENTITY[1]))
    assert (solar[0] - pil(to_pil(x[0]))[0]).abs().max() < 1e-6


def test_the_same_generator_seed_gives_the_same_views_and_samples_differ() -> None:
    cfg = AugmentConfig(views=[ViewConfig(count=2, size=16, blur_p=0.5, solarize_p=0.2)])
    x = images(1, 32, 32).expand(16, -1, -1, -1)
    first, again, other = (BatchedViews(cfg)(x, gen(seed)) for seed in (7, 7, 8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[1])  # two views of a group draw apart
    distinct = {tuple(v.flatten()[:64].tolist()) for v in first[0]}
    assert len(distinct) == 16  # one image, sixteen different views of it
    # uint8 and the same pixels as floats in [0, 1] (ToDtype's scaling) are one input.
    floats = BatchedViews(cfg)(x.float().mul(1 / 255), gen(7))
    assert all(torch.equal(a, b) for a, b in zip(first, floats))


def test_a_list_of_different_sizes_is_cropped_within_each_image() -> None:
    batch = [images(1, h, w, seed=h)[0] for h, w in ((40, 56), (64, 30), (33, 33))]
    pixels, heights, widths = as_batch(batch)
    assert pixels.shape == (3, 3, 64, 56) and heights.tolist() == [40, 64, 33] and widths.tolist() == [56, 30, 33]
    view = replace(PLAIN, scale=(0.05, 1.0), flip=0.5)
    bv = single(view)
    p = bv.draw(view, heights, widths, gen(2))
    out = bv.render(pixels, view, p)
    for i, image in enumerate(batch):
        assert p.top[i] + p.height[i] <= heights[i] and p.left[i] + p.width[i] <= widths[i]
        ref = TF.resized_crop(image.float() / 255, int(p.top[i]), int(p.left[i]), int(p.height[i]),
                              int(p.width[i]), [24, 24], antialias=True)
        ref = TF.horizontal_flip(ref) if p.flip[i] else ref
        assert (out[i] - ref).abs().max() < 1e-5
    cfg = AugmentConfig(views=[ViewConfig(count=2, size=32), ViewConfig(count=3, size=16)])
    views = BatchedViews(cfg)(batch, gen())
    assert [tuple(v.shape) for v in views] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 3


def test_views_are_distributed_like_multiviews() -> None:
    """The whole SimCLR small pipeline, 256 views of one image each way: per-channel mean and spread agree."""
    view = ViewConfig(count=1, size=32, scale=(0.5, 1.0), jitter=(0.6, 0.6, 0.6, 0.5), jitter_p=0.9, gray_p=0.3,
                      blur_p=0.5)
    cfg = AugmentConfig(views=[view])
    x = images(1, 64, 64)
    batched = BatchedViews(cfg)(x.expand(256, -1, -1, -1), gen())[0]
    torch.manual_seed(0)
    multiview = MultiView(cfg)
    pil = torch.stack([multiview(to_pil(x[0]))[0] for _ in range(256)])
    for stat in (lambda v: v.mean(dim=(0, 2, 3)), lambda v: v.std(dim=(0, 2, 3)),
                 lambda v: v.mean(dim=(2, 3)).std(dim=0)):
        assert (stat(batched) - stat(pil)).abs().max() < 0.08


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
def test_decode_batch_reads_png_and_jpeg_bytes_as_rgb() -> None:
    x = images(2, 24, 32)
    png = encode_png(x[0])
    jpeg = encode_jpeg(x[1], quality=95)
    decoded = decode_batch([png, jpeg], "cpu")
    assert torch.equal(decoded[0], x[0])
    # The loader's PIL decode of the same bytes gives the same pixels (JPEG: up to the decoders' rounding).
    for got, data in zip(decoded, (png, jpeg)):
        pil = torch.from_numpy(np.array(Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB")))
        assert got.shape == (3, 24, 32) and got.dtype == torch.uint8
        assert (got.float() - pil.permute(2, 0, 1).float()).abs().max() <= 2
    views = BatchedViews(AugmentConfig(views=[ViewConfig(count=2, size=16)]))(decoded, gen())
    assert [tuple(v.shape) for v in views] == [(2, 3, 16, 16)] * 2


def test_params_cover_every_field_the_render_reads() -> None:
    """ViewParams is a plain record: rendering with the fields of another draw swapped in changes the output."""
    view = ViewConfig(count=1, size=16, gray_p=0.0, blur_p=0.0)
    bv = single(view)
    x = images(4, 20, 20).float() / 255
    size = torch.full((4,), 20.0)
    a, b = bv.draw(view, size, size, gen(0)), bv.draw(view, size, size, gen(1))
    base = bv.render(x, view, a)
    for name in ("top", "left", "height", "width", "flip", "jitter", "order", "factors"):
        swapped = ViewParams(**{**a.__dict__, name: getattr(b, name)})
        if not torch.equal(getattr(a, name), getattr(b, name)):
            assert not torch.equal(bv.render(x, view, swapped), base), name


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
def test_on_cuda_the_views_equal_the_cpus_and_nothing_waits_for_the_device() -> None:
    cfg = AugmentConfig(views=[ViewConfig(count=1, size=32, blur_p=0.5, solarize_p=0.2),
                               ViewConfig(count=2, size=16, scale=(0.05, 0.3))])
    bv, x = BatchedViews(cfg), images(16, 48, 40)
    pixels, heights, widths = as_batch(x)
    for view in bv.views:
        p = bv.draw(view, heights, widths, gen())
        on_gpu = ViewParams(**{k: v.cuda() for k, v in p.__dict__.items()})
        diff = (bv.render(pixels.cuda(), view, on_gpu).cpu() - bv.render(pixels, view, p)).abs()
        # Rounding differs between the devices; only a value that lands on the solarisation threshold jumps.
        assert (diff > 1e-4).float().mean() < 1e-3 and diff.median() < 1e-5
    batch, generator = x.cuda(), torch.Generator(device="cuda").manual_seed(0)
    listed = [image.cuda() for image in images(4, 40, 56)] + [images(1, 30, 30)[0].cuda()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = bv(batch, generator) + bv(listed, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [v.device.type for v in views] == ["cuda"] * 6


@CUDA
@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
def test_decode_batch_decodes_jpegs_on_the_gpu() -> None:
    x = images(3, 40, 56)
    data = [encode_jpeg(image, quality=90) for image in x] + [encode_png(x[0])]
    on_gpu, on_cpu = decode_batch(data, "cuda"), decode_batch(data, "cpu")
    assert all(image.device.type == "cuda" and image.shape == (3, 40, 56) for image in on_gpu)
    for gpu, cpu in zip(on_gpu, on_cpu):  # nvJPEG and libjpeg round a little differently
        assert (gpu.cpu().float() - cpu.float()).abs().mean() < 1.5
    assert torch.equal(on_gpu[-1].cpu(), x[0])
