"""Images named on the command line (files, folders, shard datasets) for the per-image commands
(``attention``, ``reconstruct``), one transformed image at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sslcli.data.formats import decode_rgb, is_image_file
from sslcli.data.reader import build_loader, resolve_source
from sslcli.errors import UserError


def image_file(spec: str) -> Image.Image | None:
    """The decoded image when ``spec`` names an image file; None when it names something else (a folder or a
    dataset); an image file that does not decode is a :class:`UserError`."""
    path = Path(spec).expanduser()
    if not (path.is_file() and is_image_file(path)):
        return None
    image = decode_rgb(path.read_bytes())
    if image is None:
        raise UserError(f"'{spec}' is not a readable image; pass PNG/JPEG files, a folder or a dataset")
    return image


def iter_images(specs: Sequence[str], transform: Callable[[Any], torch.Tensor], *, split: str = "train",
                limit: int = 8) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, transformed image)`` for each image file in ``specs``, and the first ``limit`` samples of
    each other spec (a folder of images or a shard dataset, read by :func:`resolve_source`)."""
    for spec in specs:
        image = image_file(spec)
        if image is not None:
            yield Path(spec).expanduser().stem, transform(image)
            continue
        source = resolve_source(spec, split)
        loader = build_loader(source, transform, batch_size=1, shuffle=False, drop_last=False)
        for count, batch in enumerate(loader):
            if count == limit:
                break
            index = int(batch["index"][0])
            folder = source.kind == "folder"
            stem = Path(source.urls[index]).stem if folder else f"{Path(spec).name}-{split}-{index:06d}"
            yield stem, batch["image"][0]

