"""A corpus of deliberately broken and unusual images, in a shard and in a folder: the bad ones are skipped,
counted per batch and logged; the unusual ones come out as the right RGB."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shard_corpus import png, to_tensor, write_shards

from sslcli.data import StreamOptions, build_loader, resolve_source
from sslcli.data.formats import decode_rgb
from sslcli.data.shards import ShardWriter, sample_fields, sample_key, write_index
from sslcli.errors import UserError

PIXEL_LIMIT = 64 * 64  # PIL.Image.MAX_IMAGE_PIXELS for these tests, so "huge" images stay small


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def palette_image() -> Image.Image:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 12, 200, 34] + [0] * 762)
    return image


def corpus() -> list[tuple[str, bytes, tuple[int, int, int] | None]]:
    """(file name, bytes, expected RGB of every pixel, or None for a bad sample), in stream order."""
    jpeg = encoded(Image.new("RGB", (16, 16), (90, 90, 90)), "JPEG")
    return [
        ("00_good.png", png((10, 20, 30)), (10, 20, 30)),
        ("01_empty.png", b"", None),
        ("02_garbage.png", b"this is not an image" * 10, None),
        ("03_truncated.jpg", jpeg[: len(jpeg) // 2], None),
        ("04_cmyk.tif", encoded(Image.new("CMYK", (8, 8), (0, 255, 0, 0)), "TIFF"), (255, 0, 255)),
        # 16-bit grey 32896 = 128 * 257 is 8-bit 128 (PIL's own convert would clip it to 255).
        ("05_grey16.png", encoded(Image.fromarray(np.full((8, 8), 32896, np.uint16)), "PNG"), (128, 128, 128)),
        ("06_grey.png", encoded(Image.new("L", (8, 8), 77), "PNG"), (77, 77, 77)),
        ("07_palette.png", encoded(palette_image(), "PNG"), (12, 200, 34)),
        # Half-transparent blue over white: 255 * (1 - 128/255) = 127 in red and green.
        ("08_rgba.png", encoded(Image.new("RGBA", (8, 8), (0, 0, 255, 128)), "PNG"), (127, 127, 255)),
        ("09_grey_alpha.png", encoded(Image.new("LA", (8, 8), (200, 0)), "PNG"), (255, 255, 255)),
        ("10_huge.png", png((1, 2, 3), size=80), None),  # over the pixel limit, not a JPEG: skipped
        ("11_huge.jpg", encoded(Image.new("RGB", (80, 80), (250, 250, 250)), "JPEG"), (250, 250, 250)),
        ("12_bomb.jpg", encoded(Image.new("RGB", (100, 100), (0, 0, 0)), "JPEG"), None),  # over twice the limit
    ]


def small(image: Image.Image) -> torch.Tensor:
    """Every image at 8 px (nearest keeps solid colours exact) so that batches stack."""
    return to_tensor(image.resize((8, 8), Image.Resampling.NEAREST))


@pytest.fixture(autouse=True)
def low_pixel_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PIXEL_LIMIT)  # forked workers inherit it


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, object]:
    folder = tmp_path / "folder"
    folder.mkdir()
    shards = tmp_path / "shards"
    shards.mkdir()
    with ShardWriter(shards, "train", 100) as writer:
        for index, (name, data, _) in enumerate(corpus()):
            (folder / name).write_bytes(data)
            writer.write(sample_key("train", index), sample_fields(data, name.rsplit(".", 1)[1], index=index))
        entry = writer.close()
    write_index(shards, classes=None, splits={"train": entry})
    return {"folder": resolve_source(folder), "shards": resolve_source(shards)}


def test_huge_jpeg_is_decoded_smaller() -> None:
    image = decode_rgb(corpus()[11][1])
    assert image is not None and image.size == (40, 40)  # JPEG's DCT scaling by 2 fits 40x40 in 64x64


@pytest.mark.parametrize("kind", ["shards", "folder"])
@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_replaced_counted_and_logged(sources: dict, kind: str, workers: int,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    expected = [colour for _, _, colour in corpus()]
    bad = [i for i, colour in enumerate(expected) if colour is None]
    loader = build_loader(sources[kind], small, batch_size=13, shuffle=False, num_workers=workers)
    with caplog.at_level(logging.WARNING, logger="sslcli.data"):
        (batch,) = list(loader)
    assert batch["bad_samples"] == loader.skipped == len(bad) == 5
    # Each bad slot holds the nearest good sample before it in the batch.
    donors = [max(j for j in range(i + 1) if expected[j] is not None) for i in range(13)]
    assert batch["index"].tolist() == donors
    for slot, donor in enumerate(donors):
        pixels = batch["image"][slot].permute(1, 2, 0).reshape(-1, 3).int()
        want = torch.tensor(expected[donor], dtype=torch.int32)
        tolerance = 3 if corpus()[donor][0].endswith(".jpg") else 1  # JPEG is lossy; alpha blending rounds
        assert (pixels - want).abs().max() <= tolerance, (corpus()[donor][0], pixels[0], want)
    names = [corpus()[i][0] if kind == "folder" else f"train-000000.tar:{sample_key('train', i)}" for i in bad]
    assert "skipped 5 undecodable or missing" in caplog.text
    assert all(name in caplog.text for name in names)  # the first five bad names, here all of them


def test_a_batch_with_no_good_sample_borrows_one(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes(png((i * 40, 0, 0)) if i >= 3 else b"")
    loader = build_loader(resolve_source(folder), to_tensor, batch_size=2, shuffle=False)
    batches = list(loader)
    assert [b["bad_samples"] for b in batches] == [2, 1, 0]
    assert [b["index"].tolist() for b in batches] == [[3, 3], [3, 3], [4, 5]]
    for i in range(3):
        (folder / f"{i + 3}.png").write_bytes(b"")
    with pytest.raises(UserError, match="none of the images .* decode"):
        list(build_loader(resolve_source(folder), to_tensor, batch_size=2, shuffle=False))


@pytest.mark.parametrize("mode", ["shard", "sample"])
def test_truncated_shard_samples_are_bad_samples_in_every_mode(tmp_path: Path, mode: str) -> None:
    data = write_shards(tmp_path / "d", [10] * 8)
    shard = data / "train-000003.tar"
    shard.write_bytes(shard.read_bytes()[: 15 * 512])  # a sample is 3 members (png, cls, idx) of 2 blocks each
    per_rank = []
    for rank in range(2):
        loader = build_loader(resolve_source(data), to_tensor, batch_size=5, shuffle=True, rank=rank, world_size=2,
                              options=StreamOptions(split_by=mode))  # type: ignore[arg-type]
        batches = list(loader)
        assert len(batches) == 8 and loader.mode == mode
        per_rank.append(sum(b["bad_samples"] for b in batches))
    assert sum(per_rank) == 8  # two whole samples before the cut; the rest is lost, and counted, not fatal


def test_zero_byte_shard_in_an_index_fails_before_training(tmp_path: Path) -> None:
    data = write_shards(tmp_path / "d", [4, 4])
    (data / "train-000001.tar").write_bytes(b"")
    with pytest.raises(UserError, match=r"train-000001\.tar' is empty"):
        resolve_source(data)
