"""``reconstruct``: MAE reconstructions of images, as PNG panels plus a results JSON.

Each panel is one row, as in the MAE paper's figures: the original | the masked input (hidden
patches at the dataset's mean colour) | the reconstruction | the reconstruction with the visible
patches pasted back.  Usable from Python::

    from sslcli.reconstruct import reconstruct
    reconstruct("runs/mae", ["demo/data"], "recon", mask_ratio=0.75, seed=0)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslcli.augment import eval_transform
from sslcli.data.images import iter_images
from sslcli.errors import UserError
from sslcli.evaluation.panels import default_zoom, tile_row, to_uint8
from sslcli.evaluation.results import write_results
from sslcli.methods.mae import MAE
from sslcli.runs import load_run

RESULTS_NAME = "reconstruct.json"


def _pixels(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised ``[C, H, W]`` -> RGB in ``[0, 1]`` (unclamped), the scale the pixel errors are reported on."""
    return image.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((a - b).pow(2) * mask).sum() / mask.sum().clamp(min=1))


def reconstruct(source: str | Path, images: Sequence[str], out: str | Path, *, mask_ratio: float | None = None,
                seed: int = 0, split: str = "test", limit: int = 8, device: torch.device | str = "cpu",
                zoom: int | None = None, results: str | Path | None = None) -> dict[str, Any]:
    """Writes ``OUT/<image>.png`` for every image and ``results`` (default ``OUT/reconstruct.json``);
    returns the metrics.  ``mask_ratio`` defaults to the run's; ``seed`` fixes which patches are hidden."""
    started = time.perf_counter()
    run = load_run(Path(source), "reconstruct needs the decoder, which only the checkpoint holds", expect=MAE,
                   wrong_method="it does not predict pixels: reconstruct takes an MAE run (sslcli pretrain mae ...)")
    method, cfg = run.method, run.config
    ratio = method.mask_ratio if mask_ratio is None else mask_ratio
    if not 0 <= ratio < 1:
        raise UserError(f"--mask-ratio must be in [0, 1), got {ratio}")
    aug = cfg.augment
    transform = eval_transform(aug.eval_size, aug.eval_crop_pct, aug.mean, aug.std)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    method.to(device)
    generator = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for stem, image in iter_images(images, transform, split=split, limit=limit):
        noise = torch.rand(1, method.grid[0] * method.grid[1], generator=generator)
        rec = method.reconstruct(image[None].to(device), ratio, noise.to(device))
        recon, mask = rec.images[0].cpu(), rec.mask[0].cpu()
        masked, pasted = image * (1 - mask), image * (1 - mask) + recon * mask
        original = _pixels(image, aug.mean, aug.std)
        seen[stem] = seen.get(stem, 0) + 1
        name = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
        panel = tile_row([to_uint8(x, aug.mean, aug.std) for x in (image, masked, recon, pasted)],
                         zoom=zoom or default_zoom(image.shape[-1]))
        panel.save(out / f"{name}.png")
        rows.append({"image": name, "png": f"{name}.png", "loss": float(rec.loss[0]),
                     "mean_patch_loss": float(rec.mean_patch_loss[0]),
                     "pixel_mse": _masked_mse(_pixels(recon, aug.mean, aug.std), original, mask),
                     "masked_input_pixel_mse": _masked_mse(_pixels(masked, aug.mean, aug.std), original, mask)})
    if not rows:
        raise UserError("no images to reconstruct; pass image files, a folder of images or a dataset")
    keys = ("loss", "mean_patch_loss", "pixel_mse", "masked_input_pixel_mse")
    metrics = {**{k: float(np.mean([r[k] for r in rows])) for k in keys}, "images": rows}
    write_results(Path(results) if results else out / RESULTS_NAME, command="reconstruct", metrics=metrics,
                  encoder={"run": str(source), "checkpoint": str(run.checkpoint), "method": cfg.method,
                           "arch": cfg.arch, "epochs": run.epochs_done},
                  data={"inputs": list(images), "split": split, "limit": limit},
                  params={"mask_ratio": ratio, "seed": seed, "image_size": aug.eval_size,
                          "target": "norm-pix" if method.norm_pix_loss else "pixels"},
                  seed=seed, started=started)
    return metrics
