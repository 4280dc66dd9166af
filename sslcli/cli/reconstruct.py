"""`sslcli reconstruct RUN IMAGES... --out DIR`: MAE reconstructions (original | masked | reconstruction |
reconstruction + visible) as PNGs, with the per-image errors in OUT/reconstruct.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslcli.cli.options import Device, Images, ImagesLimit, ImagesSplit, Zoom, check_image_options
from sslcli.distributed import first_rank_only


@first_rank_only("sslcli reconstruct")
def reconstruct_command(
    source: Annotated[str, typer.Argument(
        help="An MAE run directory (its latest checkpoint) or one of its checkpoints/epoch-NNNN.pt files.")],
    images: Images,
    out: Annotated[Path, typer.Option("--out", help="Directory for the PNGs and reconstruct.json (created).")
                   ] = Path("reconstructions"),
    mask_ratio: Annotated[float | None, typer.Option(
        "--mask-ratio", help="Fraction of patches hidden; default: the run's.", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random masks.")] = 0,
    split: ImagesSplit = "test",
    limit: ImagesLimit = 8,
    zoom: Zoom = None,
    results: Annotated[Path | None, typer.Option(
        "--results", help="Results JSON; default: OUT/reconstruct.json.", show_default=False)] = None,
    device: Device = "auto",
) -> None:
    """Hides random patches of each image and shows what the MAE decoder fills in (MAE, Fig. 2)."""
    from rich.console import Console

    from sslcli.engine.device import resolve_device
    from sslcli.reconstruct import RESULTS_NAME, reconstruct

    check_image_options(limit, zoom)
    metrics = reconstruct(source, images, out, mask_ratio=mask_ratio, seed=seed, split=split, limit=limit,
                          device=resolve_device(device), zoom=zoom, results=results)
    Console().print(
        f"wrote {len(metrics['images'])} PNG(s) to {out} and {results or out / RESULTS_NAME}: masked-patch loss "
        f"{metrics['loss']:.3f} (mean-patch baseline {metrics['mean_patch_loss']:.3f}); pixel MSE "
        f"{metrics['pixel_mse']:.4f} vs {metrics['masked_input_pixel_mse']:.4f} for the masked input", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("reconstruct")(reconstruct_command)
