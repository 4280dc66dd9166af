"""Batched augmentation on a device (sslcli.device_augment) against the per-image PIL path (MultiView).

    python -m benchmarks.device_augment --method simclr --recipe small --size 64 --batch 128 --device cpu \\
        --threads 1 --out benchmarks/results/device-augment-cpu.json

Both paths turn the same encoded images (the embedded dataset's renderer at ``--size`` px, PNG or JPEG)
into one batch of the recipe's views:

- *per-image*: what one DataLoader worker does per batch: ``decode_rgb`` (PIL) and ``MultiView`` for each
  image, then the loader's stacking of each view (its per-sample reseeding is left out); on the CPU;
- *batched*: ``decode_batch`` (nvJPEG for JPEGs on CUDA) and ``BatchedViews`` on ``--device``, with a
  device synchronisation before the clock stops.

Each is timed with and without decoding (*augment only* starts from decoded PIL images / a uint8 tensor
on the device). The rounds alternate the paths so that load from other jobs hits both; the best round
is reported, with the process's CPU time per batch. The per-image figure is one worker's: a loader with
N workers on N free cores delivers at most N times it. ``numerics`` gives, per op, the mean and largest
difference (in 1/255) between MultiView's 8-bit PIL op and the batched float op for the same parameters.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from benchmarks.machine import describe
from sslcli.augment import AugmentConfig, MultiView
from sslcli.config import CropOptions, build_config
from sslcli.data.formats import decode_rgb
from sslcli.data.synth import render_sample, sample_rng
from sslcli.device_augment import (
    SOLARIZE_THRESHOLD,
    BatchedViews,
    adjust_hue,
    as_batch,
    blend,
    crop_resize,
    decode_batch,
    gaussian_blur,
    grayscale,
)
from sslcli.engine.device import resolve_device


def encoded_images(count: int, size: int, fmt: str) -> list[bytes]:
    """``count`` rendered images of the embedded dataset's kind, encoded as PNG or JPEG (quality 90)."""
    out = []
    for i in range(count):
        image, _, _ = render_sample(sample_rng(0, "train", i), size)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if fmt == "png" else "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def per_image(views: MultiView, images: list[Image.Image]) -> list[torch.Tensor]:
    outputs = [views(image) for image in images]
    return [torch.stack([o[v] for o in outputs]) for v in range(len(outputs[0]))]


def timed(fn: Callable[[], Any], device: torch.device, steps: int) -> dict[str, float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    sync()
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start}


def compare(cfg: AugmentConfig, data: list[bytes], device: torch.device, steps: int, warmup: int,
            rounds: int) -> dict[str, Any]:
    """img/s of each path and phase: the best of ``rounds`` alternating rounds of ``steps`` batches."""
    multiview, batched = MultiView(cfg), BatchedViews(cfg)
    generator = torch.Generator(device=device).manual_seed(0)
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    pil = [decode_rgb(d) for d in data]
    decoded = torch.stack(decode_batch(encoded, device))
    cases: dict[str, Callable[[], Any]] = {
        "per_image_decode_and_augment": lambda: per_image(multiview, [decode_rgb(d) for d in data]),
        "per_image_augment_only": lambda: per_image(multiview, pil),
        "batched_decode_and_augment": lambda: batched(decode_batch(encoded, device), generator),
        "batched_augment_only": lambda: batched(decoded, generator),
    }
    for fn in cases.values():  # allocations, nvJPEG and kernel set-up
        for _ in range(warmup):
            fn()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            runs[name].append(timed(fn, device, steps))
    result = {}
    for name, measured in runs.items():
        best = min(measured, key=lambda r: r["seconds"])
        result[name] = {"img_per_s": round(steps * len(data) / best["seconds"], 1),
                        "batch_ms": round(1000 * best["seconds"] / steps, 2),
                        "cpu_ms_per_batch": round(1000 * best["cpu_seconds"] / steps, 2),
                        "rounds_img_per_s": [round(steps * len(data) / r["seconds"], 1) for r in measured]}
    for phase in ("decode_and_augment", "augment_only"):
        result[f"speedup_{phase}"] = round(result[f"batched_{phase}"]["img_per_s"]
                                           / result[f"per_image_{phase}"]["img_per_s"], 2)
    return result


def numerics(data: list[bytes], size: int) -> dict[str, dict[str, float]]:
    """Per op: MultiView's op on the 8-bit PIL image vs the batched float op, same parameters (in 1/255)."""
    pil = [decode_rgb(d) for d in data[:16]]
    x, _, _ = as_batch(torch.stack([TF.pil_to_tensor(p) for p in pil]))
    n, full = x.shape[0], torch.full((x.shape[0],), float(x.shape[-1]))
    ones, zero = torch.ones(n), torch.zeros(())
    gray = grayscale(x)
    ops: dict[str, tuple[Callable[[Image.Image], Image.Image], torch.Tensor]] = {
        "resize_whole_image": (lambda p: TF.resize(p, [size // 2] * 2, antialias=True),
                               crop_resize(x, zero.expand(n), zero.expand(n), full, full, ones < 0, size // 2)),
        "brightness_1.4": (lambda p: TF.adjust_brightness(p, 1.4), blend(x, zero, 1.4 * ones)),
        "contrast_0.6": (lambda p: TF.adjust_contrast(p, 0.6),
                         blend(x, gray.mean(dim=(1, 2, 3), keepdim=True), 0.6 * ones)),
        "saturation_1.4": (lambda p: TF.adjust_saturation(p, 1.4), blend(x, gray, 1.4 * ones)),
        "hue_0.2": (lambda p: TF.adjust_hue(p, 0.2), adjust_hue(x, 0.2 * ones)),
        "grayscale": (lambda p: TF.rgb_to_grayscale(p, num_output_channels=3), gray.expand_as(x)),
        "blur_k7_sigma1": (lambda p: TF.gaussian_blur(p, [7, 7], [1.0, 1.0]), gaussian_blur(x, ones, 7)),
        "solarize_128": (lambda p: TF.solarize(p, 128), torch.where(x >= SOLARIZE_THRESHOLD, 1 - x, x)),
    }
    out = {}
    for name, (pil_op, batched) in ops.items():
        ref = torch.stack([TF.pil_to_tensor(pil_op(p)) for p in pil]).float() / 255
        diff = (batched - ref).abs() * 255
        out[name] = {"mean": round(diff.mean().item(), 3), "max": round(diff.max().item(), 3)}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="simclr", help="the recipe's method (its augment section is used)")
    p.add_argument("--recipe", default="small", help="a variant, a YAML file, or 'paper' (the paper's defaults)")
    p.add_argument("--global-size", type=int, help="global crop side (pretrain --global-size)")
    p.add_argument("--local-crops", type=int, help="local crops per image (pretrain --local-crops)")
    p.add_argument("--local-size", type=int, help="local crop side (pretrain --local-size)")
    p.add_argument("--size", type=int, default=64, help="side of the rendered source images")
    p.add_argument("--format", choices=["png", "jpeg"], default="png")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="intra-op CPU threads (1: comparable with one loader worker)")
    p.add_argument("--steps", type=int, default=5, help="timed batches per round and path")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    crops = CropOptions(global_size=args.global_size, local_crops=args.local_crops, local_size=args.local_size)
    cfg = build_config(args.method, None if args.recipe == "paper" else args.recipe, crops=crops).augment
    data = encoded_images(args.batch, args.size, args.format)
    result: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.device_augment", *(argv if argv is not None else sys.argv[1:])]),
        "machine": describe(device),
        "setup": {"method": args.method, "recipe": args.recipe, "image_px": args.size, "format": args.format,
                  "batch": args.batch, "views": [[v.count, v.size] for v in cfg.views],
                  "view_configs": [vars(v) for v in cfg.views], "steps": args.steps, "rounds": args.rounds}}
    result["throughput"] = compare(cfg, data, device, args.steps, args.warmup, args.rounds)
    result["numerics"] = numerics(data, args.size)
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"throughput": result["throughput"], "numerics": result["numerics"]}, indent=2))
    return result


if __name__ == "__main__":
    main()
