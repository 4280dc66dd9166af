"""Tests for the embedded dataset's generator (sslcli.data.synth): rendering, determinism, the index, arguments."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.data import CLASSES, generate_synthetic, read_index, resolve_source, synth
from sslcli.data.formats import iter_tar_samples
from sslcli.data.shards import sample_key
from sslcli.data.synth_pairs import held_out_colours
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



def test_shape_size_draws_every_shape_in_that_size_and_leaves_the_default_alone(tmp_path: Path) -> None:
    """``--shape-size large`` (for the patch pretexts): one large shape per image, covering much more of it."""
    def coverage(shape_size: str | None) -> tuple[list[str], float]:
        words, covered = [], []
        for i in range(40):
            image, _, caption, mask = synth.render_sample_with_mask(synth.sample_rng(0, "train", i), 64,
                                                                    shape_size=shape_size)
            words.append(caption.split()[:2])
            covered.append(float((np.asarray(mask) > 127).mean()))
        return [" ".join(w) for w in words], float(np.mean(covered))

    large, large_cover = coverage("large")
    small, small_cover = coverage("small")
    default, default_cover = coverage(None)
    assert set(large) == {"a large"} and {w.split()[1] for w in small} == {"small"}
    assert {w.split()[0] for w in small} == {"a", "two", "three"}
    assert len(set(default)) > 3  # the default still mixes counts and sizes
    assert large_cover > 1.5 * default_cover and small_cover < default_cover
    # The default draws are unchanged, so the embedded data stays byte-identical.
    assert synth.render_sample(synth.sample_rng(0, "train", 3), 32)[2] == \
        synth.render_sample_with_mask(synth.sample_rng(0, "train", 3), 32, shape_size=None)[2]
    index = generate_synthetic(tmp_path / "large", train=4, test=2, size=16, shape_size="large")
    assert index["shape_size"] == "large"
    assert "shape_size" not in generate_synthetic(tmp_path / "any", train=4, test=2, size=16)
    with pytest.raises(UserError, match="--shape-size must be one of small, medium, large"):
        generate_synthetic(tmp_path / "x", shape_size="huge")


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


# --- held-out colour-shape pairs and classes.txt --------------------------------------------

HOLD_OUT = dict(train=60, test=20, unseen=20, size=32, seed=0, shard_size=25, hold_out_pairs=True)


@pytest.fixture(scope="module")
def held_out_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("held_out") / "shapes"
    generate_synthetic(out, **HOLD_OUT)
    return out


def pairs_of(directory: Path, split: str) -> list[tuple[str, str, str]]:
    """(class, shape colour, background colour) of every sample of a split, from label and caption."""
    found = []
    for shard in sorted(directory.glob(f"{split}-*.tar")):
        for _, fields in iter_tar_samples(shard):
            words = fields["txt"].decode().split()  # "two small red circles on a plain blue background"
            background = [word for word in words[4:] if word in synth._COLOURS]
            assert words[2] in synth._COLOURS and len(background) == 1, words
            found.append((CLASSES[int(fields["cls"])], words[2], background[0]))
    return found


def test_held_out_map_is_one_distinct_colour_per_class_fixed_by_the_seed(held_out_data: Path) -> None:
    pairs = read_index(held_out_data)["held_out_pairs"]
    assert list(pairs) == list(CLASSES)
    assert len(set(pairs.values())) == len(CLASSES) and set(pairs.values()) <= set(synth._COLOURS)
    assert pairs == held_out_colours(0, CLASSES, tuple(synth._COLOURS))
    assert held_out_colours(1, CLASSES, tuple(synth._COLOURS)) != pairs


def test_train_and_test_never_show_a_held_out_pair(held_out_data: Path) -> None:
    pairs = read_index(held_out_data)["held_out_pairs"]
    for split, count in (("train", 60), ("test", 20)):
        seen = pairs_of(held_out_data, split)
        assert len(seen) == count
        assert not [(name, fg) for name, fg, _ in seen if pairs[name] == fg]
    # Colours held out for one class still appear on other classes, so every colour word is trained on.
    assert {fg for _, fg, _ in pairs_of(held_out_data, "train")} & set(pairs.values())


def test_unseen_split_shows_only_held_out_pairs_balanced(held_out_data: Path) -> None:
    index = read_index(held_out_data)
    pairs = index["held_out_pairs"]
    assert list(index["splits"]) == ["train", "test", "unseen"] and index["splits"]["unseen"]["count"] == 20
    unseen = pairs_of(held_out_data, "unseen")
    assert all(fg == pairs[name] and bg != fg for name, fg, bg in unseen)
    assert set(Counter(name for name, _, _ in unseen).values()) == {2}
    source = resolve_source(held_out_data, "unseen")
    assert (source.num_samples, source.classes) == (20, list(CLASSES))
    assert [Path(url).name for url in source.urls] == ["unseen-000000.tar"]


def test_held_out_generation_is_deterministic_for_any_process_count(
    held_out_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate_synthetic(tmp_path / "again", **HOLD_OUT)
    assert files_of(tmp_path / "again") == files_of(held_out_data)
    monkeypatch.setattr(synth, "_POOL_THRESHOLD", 0)
    monkeypatch.setattr(synth, "_CHUNK", 7)
    monkeypatch.setattr(synth, "_worker_count", lambda: 2)
    generate_synthetic(tmp_path / "pool", **HOLD_OUT)
    assert files_of(tmp_path / "pool") == files_of(held_out_data)


def test_classes_txt_lists_the_classes_in_label_order(synth_data: Path, held_out_data: Path) -> None:
    for directory in (synth_data, held_out_data):
        assert (directory / "classes.txt").read_text() == "".join(f"{name}\n" for name in CLASSES)
    assert "held_out_pairs" not in read_index(synth_data)


def test_overwrite_replaces_classes_txt_and_stale_unseen_shards(tmp_path: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "classes.txt").write_text("stale\n")  # a leftover label list is not a dataset: it blocks nothing
    generate_synthetic(out, train=10, test=10, size=16, hold_out_pairs=True, unseen=10)
    assert (out / "classes.txt").read_text().splitlines() == list(CLASSES)
    with pytest.raises(UserError, match="overwrite"):
        generate_synthetic(out, train=10, test=10, size=16)
    index = generate_synthetic(out, train=10, test=10, size=16, overwrite=True)
    assert "held_out_pairs" not in index and not list(out.glob("unseen-*.tar"))
    with pytest.raises(UserError, match="no split 'unseen'"):
        resolve_source(out, "unseen")
    assert (out / "classes.txt").read_text().splitlines() == list(CLASSES)


def test_unseen_must_be_positive() -> None:
    with pytest.raises(UserError, match="--unseen must be at least 1"):
        generate_synthetic(Path("unused"), hold_out_pairs=True, unseen=0)


@pytest.mark.parametrize(("extra", "message"), [
    (["--unseen", "5"], "--unseen 5 needs --hold-out-pairs"),
    (["--hold-out-pairs", "--unseen", "0"], "--unseen must be at least 1, got 0"),
])
def test_cli_rejects_bad_unseen_in_one_line(tmp_path: Path, extra: list[str], message: str) -> None:
    out = tmp_path / "d"
    result = CliRunner().invoke(app, ["data", "synth", str(out), "--train", "10", "--test", "10", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_writes_the_unseen_split(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", "synth", str(tmp_path / "d"), "--train", "10", "--test", "10",
                                      "--size", "16", "--hold-out-pairs", "--unseen", "10"])
    assert result.exit_code == 0, result.output
    assert "unseen 10" in result.output and read_index(tmp_path / "d")["held_out_pairs"]


def test_varied_captions_drop_details_but_keep_the_shape_and_the_images(held_out_data: Path, tmp_path: Path) -> None:
    varied = tmp_path / "varied"
    index = generate_synthetic(varied, **HOLD_OUT, varied_captions=True)
    assert index["varied_captions"] is True
    for split in ("train", "test", "unseen"):
        for shard in sorted(held_out_data.glob(f"{split}-*.tar")):
            full = dict(iter_tar_samples(shard))
            short = dict(iter_tar_samples(varied / shard.name))
            assert full.keys() == short.keys()
            lengths = Counter()
            for key, fields in full.items():
                assert short[key]["png"] == fields["png"] and short[key]["cls"] == fields["cls"]  # images unchanged
                words, kept = fields["txt"].decode().split(), short[key]["txt"].decode().split()
                assert kept[0] == words[0] and words[3] in kept  # the count word and the (plural) shape noun
                remaining = iter(words)
                assert all(word in remaining for word in kept)  # a subsequence: details left out, none invented
                lengths[len(kept)] += 1
            assert len(lengths) > 2  # captions of several lengths
