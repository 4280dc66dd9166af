"""Small shard datasets for the loader tests: shards of chosen, unequal sizes, written directly."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sslcli.data.shards import ShardWriter, sample_fields, sample_key, shard_name, write_index


def png(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(out: Path, sizes: list[int], *, split: str = "train") -> Path:
    """Shards of ``sizes`` samples each (sample ``i`` is a solid image whose red channel is ``i % 256``)
    plus an index.json that records the per-shard counts."""
    out.mkdir(parents=True, exist_ok=True)
    shards, index = [], 0
    for number, size in enumerate(sizes):
        # One writer per shard, renamed to its number: ShardWriter itself cuts equal-sized shards.
        with ShardWriter(out, f"tmp{number}", size) as writer:
            for _ in range(size):
                image = png((index % 256, index // 256 % 256, 7))
                writer.write(sample_key(split, index), sample_fields(image, "png", index=index, label=index % 3))
                index += 1
        (out / shard_name(f"tmp{number}", 0)).rename(out / shard_name(split, number))
        shards.append(shard_name(split, number))
    write_index(out, classes=["a", "b", "c"],
                splits={split: {"count": index, "shards": shards, "shard_counts": list(sizes)}})
    return out


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 RGB -> CHW uint8 tensor."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def noisy(image: Image.Image) -> torch.Tensor:
    """A random transform drawing from torch's and Python's generators, as augmentations do."""
    return to_tensor(image).float() + torch.rand(3, 1, 1) + random.random()
