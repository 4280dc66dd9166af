"""`sslcli attention SOURCE IMAGES... --out DIR`: DINO's CLS self-attention maps, one PNG per image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslcli.cli.options import Device, Images, ImagesLimit, ImagesSplit, Zoom, check_image_options
from sslcli.distributed import first_rank_only


@first_rank_only("sslcli attention")
def attention_command(
    source: Annotated[str, typer.Argument(
        help="A ViT's run directory (uses RUN/encoder.safetensors) or exported .safetensors file.")],
    images: Images,
    out: Annotated[Path, typer.Option("--out", help="Directory for the PNGs (created).")] = Path("attention"),
    split: ImagesSplit = "test",
    limit: ImagesLimit = 8,
    image_size: Annotated[int | None, typer.Option(
        "--image-size", help="Input resolution; default: SOURCE's (other sizes need a ViT trained with multi-crop).",
        show_default=False)] = None,
    zoom: Zoom = None,
    device: Device = "auto",
) -> None:
    """Self-attention of the CLS token in the last block, per head, next to each image (DINO, Fig. 1)."""
    from rich.console import Console

    from sslcli.data.images import iter_images
    from sslcli.engine.device import resolve_device
    from sslcli.evaluation import resolve_encoder
    from sslcli.evaluation.attention import last_attention_module, write_attention_maps

    check_image_options(limit, zoom)
    encoder, info = resolve_encoder(source, arch=None, random_init=False, image_size=image_size)
    last_attention_module(encoder.model, f"'{source}' ({info.arch})")  # a ResNet fails here, before any image
    written = write_attention_maps(encoder, iter_images(images, info.transform(), split=split, limit=limit), out,
                                   mean=info.mean, std=info.std, device=resolve_device(device), zoom=zoom,
                                   name=f"'{source}' ({info.arch})")
    heads = last_attention_module(encoder.model, info.arch).num_heads
    Console().print(f"wrote {len(written)} PNG(s) to {out}: the image, then the CLS attention of each of the "
                    f"{heads} heads of the last block ({info.name})", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("attention")(attention_command)
