"""Options shared by several subcommands, defined once."""

from __future__ import annotations

from typing import Annotated

import typer

Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Data = Annotated[str, typer.Option("--data", help="Shard directory, brace pattern (train-{000000..000009}.tar) or image folder.")]
OptionalData = Annotated[str | None, typer.Option("--data", help="Shard directory, brace pattern or image folder.")]
Arch = Annotated[str | None, typer.Option("--arch", help="Backbone alias (resnet18, vit_b16, vit_tiny_p4, ...) or any timm name.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output.")]

# The per-image commands (attention, reconstruct).
Images = Annotated[list[str], typer.Argument(
    help="Image files, folders of images or datasets (shards); each folder or dataset gives --limit images.")]
ImagesSplit = Annotated[str, typer.Option("--split", help="Split of a dataset argument.")]
ImagesLimit = Annotated[int, typer.Option("--limit", help="Images taken from each folder or dataset.")]
Zoom = Annotated[int | None, typer.Option(
    "--zoom", help="Enlarge each tile this many times; default: about 224 px a tile.", show_default=False)]


def check_image_options(limit: int, zoom: int | None) -> None:
    """One-line errors for the per-image commands' ``--limit`` and ``--zoom``."""
    from sslcli.errors import UserError

    if limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if zoom is not None and zoom < 1:
        raise UserError(f"--zoom must be at least 1, got {zoom}")


def number_list(values: list[str] | None, option: str, kind: type[float] | type[int]) -> list | None:
    """``--opt 0.1,1 --opt 3`` -> ``[0.1, 1.0, 3.0]``; None when the option was not given.  Integer lists
    (counts such as ``--shots``) must be positive."""
    from sslcli.errors import UserError

    if values is None:
        return None
    parts = [part.strip() for value in values for part in value.split(",")]
    example = "1,2,4,8,16" if kind is int else "0.01,0.1,1"
    if not any(parts):
        raise UserError(f"{option} got an empty list; pass one value or several separated by commas, e.g. {example}")
    try:
        numbers = [kind(part) for part in parts]
    except ValueError:
        raise UserError(f"{option} takes numbers separated by commas such as {example}; got {','.join(values)!r}") \
            from None
    if kind is int and any(n < 1 for n in numbers):
        raise UserError(f"{option} counts must be at least 1; got {','.join(values)!r}")
    return numbers
