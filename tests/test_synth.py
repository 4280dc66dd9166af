"""Tests for the embedded dataset's generator (sslcli.data.synth): rendering, determinism, the index, arguments."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslcli.data import CLASSES, generate_synthetic, read_index, synth
from sslcli.data.formats import iter_tar_samples
from sslcli.data.shards import sample_key
from sslcli.errors import UserError


def files_of(directory: Path) -> dict[str, bytes]:
    """Name -> bytes of every file in a directory, for byte-identity checks."""
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}



def test_render_sample_is_rgb_labelled_and_captioned() -> None:
    for i in range(24):
        image, label, caption = synth.render_sample(np.random.default_rng(i), 40)
        assert image.mode == "RGB" and image.size == (40, 40)
        assert 0 <= label < len(CLASSES)
        assert CLASSES[label] in caption and "background" in caption


def test_segmentation_mask_is_the_foreground_and_the_image_is_unchanged() -> None:
    image, label, caption, mask = synth.render_sample_with_mask(np.random.default_rng(5), 48)
    assert (image, label, caption) == synth.render_sample(np.random.default_rng(5), 48)
    assert mask.mode == "L" and mask.size == (48, 48)
    seg = np.asarray(mask, np.float32) / 255
    assert 0.02 < seg.mean() < 0.6  # shapes cover part of the image, never all of it
    # Inside the mask the pixels are the shape's colour, outside the background's: their mean colours differ.
    rgb = np.asarray(image, np.float32)
    inside, outside = rgb[seg > 0.99].mean(0), rgb[seg < 0.01].mean(0)
    assert np.abs(inside - outside).max() > 20


def test_max_rotation_keeps_shapes_upright() -> None:
    """A square drawn upright fills its bounding box; at any angle it mostly does not."""
    def box_fill(max_rotation: float, seed: int) -> float:
        rng = np.random.default_rng(seed)
        alpha = synth._mask(rng, "square", 1, "large", 64, max_rotation)
        rows, cols = np.nonzero(alpha > 0.5)
        return float((alpha > 0.5).sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1)))

    assert min(box_fill(0.0, s) for s in range(20)) > 0.9
    assert np.mean([box_fill(180.0, s) for s in range(20)]) < 0.8
    with pytest.raises(UserError, match="--max-rotation"):
        generate_synthetic(Path("unused"), max_rotation=200)


def test_generation_is_deterministic_and_seeded(tmp_path: Path) -> None:
    args = dict(train=30, test=12, size=24, shard_size=10)
    first = generate_synthetic(tmp_path / "a", seed=3, **args)
    second = generate_synthetic(tmp_path / "b", seed=3, **args)
    assert first == second
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    generate_synthetic(tmp_path / "c", seed=4, **args)
    assert files_of(tmp_path / "a")["train-000000.tar"] != files_of(tmp_path / "c")["train-000000.tar"]


def test_generation_does_not_depend_on_process_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = dict(train=20, test=6, size=16, shard_size=8, seed=1)
    generate_synthetic(tmp_path / "serial", **args)
    monkeypatch.setattr(synth, "_POOL_THRESHOLD", 0)
    monkeypatch.setattr(synth, "_CHUNK", 3)
    monkeypatch.setattr(synth, "_worker_count", lambda: 2)
    generate_synthetic(tmp_path / "pool", **args)
    assert files_of(tmp_path / "serial") == files_of(tmp_path / "pool")


def test_index_lists_counts_classes_and_shards(synth_data: Path) -> None:
    index = read_index(synth_data)
    assert index["format"] == "sslcli-shards/1"
    assert index["classes"] == list(CLASSES) and len(CLASSES) >= 10
    assert (index["image_size"], index["source"], index["seed"], index["max_rotation"]) == (32, "synth", 0, 180.0)
    assert index["splits"]["train"]["count"] == 600 and index["splits"]["test"]["count"] == 300
    assert index["splits"]["train"]["shards"] == [f"train-{i:06d}.tar" for i in range(3)]
    assert index["splits"]["test"]["shards"] == ["test-000000.tar", "test-000001.tar"]
    assert sorted(p.name for p in synth_data.glob("*.tar")) == sorted(
        index["splits"]["train"]["shards"] + index["splits"]["test"]["shards"]
    )


def test_samples_are_balanced_and_captioned(synth_data: Path) -> None:
    labels, idx = [], []
    for shard in sorted(synth_data.glob("train-*.tar")):
        for key, fields in iter_tar_samples(shard):
            label = int(fields["cls"])
            caption = fields["txt"].decode()
            assert key == sample_key("train", int(fields["idx"]))
            assert CLASSES[label] in caption
            assert Image.open(io.BytesIO(fields["png"])).size == (32, 32)
            assert Image.open(io.BytesIO(fields[synth.SEGMENTATION_FIELD])).mode == "L"
            labels.append(label)
            idx.append(int(fields["idx"]))
    assert idx == list(range(600))
    counts = Counter(labels)
    assert set(counts) == set(range(len(CLASSES)))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_generation_validates_arguments(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="size"):
        generate_synthetic(tmp_path / "x", size=8)
    with pytest.raises(UserError, match="train"):
        generate_synthetic(tmp_path / "x", train=0)
    generate_synthetic(tmp_path / "d", train=4, test=2, size=16)
    with pytest.raises(UserError, match="overwrite"):
        generate_synthetic(tmp_path / "d", train=4, test=2, size=16)
    index = generate_synthetic(tmp_path / "d", train=3, test=2, size=16, shard_size=2, overwrite=True)
    assert index["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar"]
    assert sorted(p.name for p in (tmp_path / "d").glob("train-*.tar")) == index["splits"]["train"]["shards"]
