"""Tests for sslcli.data: source resolution, loading, folder conversion and the CLI (generation: test_synth.py)."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.data import CLASSES, build_loader, folder_to_shards, resolve_source
from sslcli.data.formats import iter_tar_samples
from sslcli.data.reader import DataSource
from sslcli.data.shards import ShardWriter, sample_fields, sample_key, write_index
from sslcli.errors import UserError


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A picklable transform: HWC uint8 RGB -> CHW tensor."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def two_views(image: Image.Image) -> list[torch.Tensor]:
    """A multi-crop style transform with views of different sizes."""
    return [to_tensor(image.resize((16, 16))), to_tensor(image.resize((8, 8)))]


def indices(loader: Iterable[dict]) -> list[int]:
    """Every sample index one pass over the loader yields, in order."""
    return [i for batch in loader for i in batch["index"].tolist()]


def make_image_folder(root: Path, per_class: dict[str, int], *, size: int = 12, ext: str = "png") -> None:
    """Writes class subfolders of small solid images (or flat images when the class is '')."""
    rng = np.random.default_rng(0)
    for name, count in per_class.items():
        directory = root / name if name else root
        directory.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            Image.new("RGB", (size, size), colour).save(directory / f"img{i:03d}.{ext}")


def cut_in_half(path: Path, *, at_member_boundary: bool = False) -> None:
    """Truncates a tar in the middle of a member, or exactly before a member's header."""
    data = path.read_bytes()
    if at_member_boundary:
        with tarfile.open(path) as handle:
            members = handle.getmembers()
        cut = members[len(members) // 2].offset
    else:
        cut = len(data) // 2 + 100
    path.write_bytes(data[:cut])


# --- resolving --------------------------------------------------------------------------


def test_resolve_index_directory(synth_data: Path) -> None:
    source = resolve_source(synth_data, "test")
    assert (source.kind, source.num_samples, source.classes) == ("shards", 300, list(CLASSES))
    assert [Path(url).name for url in source.urls] == ["test-000000.tar", "test-000001.tar"]


def test_resolve_shard_forms_without_index(synth_data: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for shard in synth_data.glob("*.tar"):
        shutil.copy(shard, bare / shard.name)
    assert resolve_source(bare, "train").num_samples == 600
    assert resolve_source(bare, "test").num_samples == 300
    pattern = resolve_source(f"{synth_data}/train-{{000000..000001}}.tar")
    assert (pattern.num_samples, len(pattern.urls), pattern.classes) == (400, 2, list(CLASSES))
    single = resolve_source(bare / "test-000001.tar")
    assert (single.kind, single.num_samples, single.urls) == ("shards", 100, [str(bare / "test-000001.tar")])
    assert resolve_source(f"{bare}/train-*.tar").num_samples == 600


def test_resolve_image_folders(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "labelled", {"cat": 3, "dog": 2, "ant": 1})
    source = resolve_source(tmp_path / "labelled")
    assert (source.kind, source.num_samples, source.classes) == ("folder", 6, ["ant", "cat", "dog"])
    assert source.labels == [0, 1, 1, 1, 2, 2]
    make_image_folder(tmp_path / "split" / "train", {"a": 2, "b": 2})
    make_image_folder(tmp_path / "split" / "val", {"b": 1})
    val = resolve_source(tmp_path / "split", "val")
    assert (val.num_samples, val.classes, val.labels) == (1, ["a", "b"], [1])
    make_image_folder(tmp_path / "flat", {"": 4}, ext="jpg")
    flat = resolve_source(tmp_path / "flat")
    assert (flat.kind, flat.num_samples, flat.labels, flat.classes) == ("folder", 4, None, None)


def test_resolve_errors_are_one_line(synth_data: Path, tmp_path: Path) -> None:
    cases = [
        (tmp_path / "missing", "train", "data path .* does not exist; pass a shard directory"),
        (f"{tmp_path}/train-{{000000..000003}}.tar", "train", "matches no files"),
        (f"{synth_data}/train-{{000000..000003}}.tar", "train", r"train-000003\.tar' from pattern .* does not exist"),
        (synth_data, "val", "no split 'val' .* available splits: test, train"),
    ]
    for spec, split, message in cases:
        with pytest.raises(UserError, match=message) as err:
            resolve_source(spec, split)
        assert "\n" not in str(err.value)


def test_resolve_rejects_broken_shards(synth_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(synth_data, bad)
    (bad / "train-000001.tar").write_bytes(b"")
    with pytest.raises(UserError, match=r"train-000001\.tar' is empty"):
        resolve_source(bad)  # with index: stat check only
    (bad / "index.json").unlink()
    with pytest.raises(UserError, match=r"train-000001\.tar' is empty"):
        resolve_source(bad)
    shutil.copy(synth_data / "train-000001.tar", bad / "train-000001.tar")
    cut_in_half(bad / "train-000002.tar")
    with pytest.raises(UserError, match=r"train-000002\.tar' is truncated"):
        resolve_source(bad)
    (bad / "junk.tar").write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(UserError, match=r"junk\.tar' is truncated or not a valid tar"):
        resolve_source(bad / "junk.tar")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images or shards"):
        resolve_source(empty)


def test_truncated_shard_found_while_reading(synth_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(synth_data, bad)
    cut_in_half(bad / "test-000001.tar")
    cut_in_half(bad / "test-000000.tar", at_member_boundary=True)
    with pytest.raises(UserError, match=r"test-000000\.tar' is truncated .*end-of-archive"):
        resolve_source(f"{bad}/test-000000.tar")
    shutil.copy(synth_data / "test-000000.tar", bad / "test-000000.tar")
    source = resolve_source(bad, "test")  # the index is trusted, so this succeeds
    with tarfile.open(synth_data / "test-000001.tar") as handle:
        members = handle.getmembers()
    cut = (len((bad / "test-000001.tar").read_bytes()))
    ends: dict[str, int] = {}
    for member in members:
        ends[member.name.split(".")[0]] = member.offset_data + member.size
    complete = sum(end <= cut for end in ends.values())  # samples wholly before the cut
    for workers in (0, 2):
        loader = build_loader(source, to_tensor, batch_size=50, shuffle=False, drop_last=False, num_workers=workers)
        batches = list(loader)  # the lost samples are bad samples: replaced, counted, and the run goes on
        assert [len(batch["index"]) for batch in batches] == [50] * 6
        assert sum(batch["bad_samples"] for batch in batches) == loader.skipped
        # tar reading notices a sample is complete on the next member, which the cut may take too
        assert 100 - complete <= loader.skipped <= 100 - complete + 1
        assert loader.bad_names == [f"{bad / 'test-000001.tar'} (truncated)"]
        assert indices(batches[:4]) == list(range(200))


def test_index_count_larger_than_shards_fails_cleanly(synth_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(synth_data, bad)
    index = json.loads((bad / "index.json").read_text())
    index["splits"]["test"]["count"] = 400
    (bad / "index.json").write_text(json.dumps(index))
    loader = build_loader(resolve_source(bad, "test"), to_tensor, batch_size=64, shuffle=True)
    with pytest.raises(UserError, match="ran out of samples"):
        indices(loader)


# --- loading ----------------------------------------------------------------------------


def test_batches_have_images_labels_indices_and_text(synth_data: Path) -> None:
    loader = build_loader(resolve_source(synth_data, "test"), to_tensor, batch_size=64, shuffle=False, drop_last=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 5
    first = batches[0]
    assert first["image"].shape == (64, 3, 32, 32) and first["image"].dtype == torch.uint8
    assert first["label"].dtype == torch.long and first["index"].tolist() == list(range(64))
    assert all(CLASSES[label] in text for label, text in zip(first["label"].tolist(), first["text"]))
    assert sum(len(batch["index"]) for batch in batches) == 300


def test_multi_view_transform_gives_views(synth_data: Path) -> None:
    loader = build_loader(resolve_source(synth_data, "test"), two_views, batch_size=32, shuffle=True)
    batch = next(iter(loader))
    assert [tuple(view.shape) for view in batch["views"]] == [(32, 3, 16, 16), (32, 3, 8, 8)]


def test_shuffle_is_reproducible_per_epoch(synth_data: Path) -> None:
    source = resolve_source(synth_data)
    loader = build_loader(source, to_tensor, batch_size=100, shuffle=True, seed=5)
    epoch0 = indices(loader)
    assert epoch0 == indices(build_loader(source, to_tensor, batch_size=100, shuffle=True, seed=5))
    assert sorted(epoch0) == list(range(600)) and epoch0 != list(range(600))
    loader.set_epoch(1)
    epoch1 = indices(loader)
    assert epoch1 != epoch0 and sorted(epoch1) == list(range(600))


@pytest.fixture(scope="module")
def odd_sources(tmp_path_factory: pytest.TempPathFactory) -> list[DataSource]:
    """25 images as a labelled folder and as 3 shards: an odd count exercises the rank split."""
    root = tmp_path_factory.mktemp("odd")
    make_image_folder(root / "folder", {"a": 9, "b": 8, "c": 8})
    folder_to_shards(root / "folder", root / "shards", shard_size=10)
    return [resolve_source(root / "folder"), resolve_source(root / "shards")]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_get_disjoint_equal_shares(odd_sources: list[DataSource], shuffle: bool, drop_last: bool) -> None:
    for source in odd_sources:
        loaders = [
            build_loader(source, to_tensor, batch_size=5, shuffle=shuffle, drop_last=drop_last, rank=r, world_size=2)
            for r in range(2)
        ]
        shares = [indices(loader) for loader in loaders]
        assert len(loaders[0]) == len(loaders[1]) == (2 if drop_last else 3)
        assert len(shares[0]) == len(shares[1]) == (10 if drop_last else 12)
        assert not set(shares[0]) & set(shares[1])
        if not drop_last:
            assert len(set(shares[0]) | set(shares[1])) == 24  # 25 minus at most world_size - 1


@pytest.mark.parametrize("shuffle", [False, True])
def test_workers_yield_the_same_samples(synth_data: Path, odd_sources: list[DataSource], shuffle: bool) -> None:
    for source in [resolve_source(synth_data, "test"), *odd_sources]:
        kwargs = dict(batch_size=7, shuffle=shuffle, drop_last=False, rank=1, world_size=2)
        serial = build_loader(source, to_tensor, **kwargs)
        parallel = build_loader(source, to_tensor, num_workers=2, **kwargs)
        assert len(serial) == len(parallel)
        assert indices(serial) == indices(parallel)


def test_undecodable_image_is_replaced_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "shards"
    out.mkdir()
    good = io.BytesIO()
    Image.new("L", (8, 8), 99).save(good, format="PNG")  # greyscale on purpose: must come out RGB
    with ShardWriter(out, "train", 10) as writer:
        for i in range(20):
            image = b"not a png" if i in (0, 13) else good.getvalue()
            writer.write(sample_key("train", i), sample_fields(image, "png", index=i, label=i % 2))
        entry = writer.close()
    write_index(out, classes=["even", "odd"], splits={"train": entry})
    source = resolve_source(out)
    for workers in (0, 2):
        loader = build_loader(source, to_tensor, batch_size=5, shuffle=False, drop_last=False, num_workers=workers)
        with caplog.at_level(logging.WARNING, logger="sslcli.data"):
            batches = list(loader)
        assert len(batches) == len(loader) == 4
        assert sum(len(batch["label"]) for batch in batches) == 20
        assert all(batch["image"].shape[1] == 3 for batch in batches)
        assert loader.skipped == 2
        assert "skipped 2 undecodable" in caplog.text
        caplog.clear()


def test_batch_larger_than_dataset_is_a_user_error(odd_sources: list[DataSource]) -> None:
    with pytest.raises(UserError, match="batch size 64"):
        build_loader(odd_sources[0], to_tensor, batch_size=64, shuffle=True)


# --- converting folders -----------------------------------------------------------------


def test_folder_to_shards_round_trip(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src", {"b": 3, "a": 4}, ext="jpg")
    (tmp_path / "src" / "a" / "broken.png").write_bytes(b"\x89PNG but not really")
    Image.new("CMYK", (12, 12)).save(tmp_path / "src" / "b" / "cmyk.jpg")
    Image.new("P", (12, 12)).save(tmp_path / "src" / "b" / "palette.png")
    index = folder_to_shards(tmp_path / "src", tmp_path / "out", shard_size=3)
    assert (index["skipped"], index["classes"], index["source"]) == (1, ["a", "b"], "folder")
    assert index["splits"]["train"]["count"] == 9 and len(index["splits"]["train"]["shards"]) == 3
    folder = resolve_source(tmp_path / "src")
    shards = resolve_source(tmp_path / "out")
    assert shards.num_samples == folder.num_samples - 1 and shards.classes == folder.classes
    loader = build_loader(shards, to_tensor, batch_size=4, shuffle=False, drop_last=False)
    labels = [label for batch in loader for label in batch["label"].tolist()]
    assert labels == [0] * 4 + [1] * 5
    assert loader.skipped == 0
    first_shard = dict(iter_tar_samples(Path(shards.urls[0])))
    assert first_shard["train_00000000"].keys() == {"jpg", "cls", "idx"}
    assert first_shard["train_00000000"]["jpg"] == (tmp_path / "src" / "a" / "img000.jpg").read_bytes()


def test_folder_to_shards_splits_flat_and_errors(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "split" / "train", {"x": 2, "y": 2})
    make_image_folder(tmp_path / "split" / "test", {"y": 2})
    index = folder_to_shards(tmp_path / "split", tmp_path / "split_out")
    assert set(index["splits"]) == {"train", "test"} and index["classes"] == ["x", "y"]
    test_loader = build_loader(resolve_source(tmp_path / "split_out", "test"), to_tensor, batch_size=2, shuffle=False)
    assert [batch["label"].tolist() for batch in test_loader] == [[1, 1]]
    make_image_folder(tmp_path / "flat", {"": 3})
    flat = folder_to_shards(tmp_path / "flat", tmp_path / "flat_out", split="unlabelled")
    assert flat["classes"] is None and flat["splits"]["unlabelled"]["count"] == 3
    flat_source = resolve_source(tmp_path / "flat_out", "unlabelled")
    batch = next(iter(build_loader(flat_source, to_tensor, batch_size=3, shuffle=False)))
    assert batch["label"].tolist() == [-1, -1, -1] and batch["text"] == ["", "", ""]
    with pytest.raises(UserError, match="overwrite"):
        folder_to_shards(tmp_path / "flat", tmp_path / "flat_out", split="unlabelled")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="no images found"):
        folder_to_shards(tmp_path / "nothing", tmp_path / "nothing_out")


# --- CLI --------------------------------------------------------------------------------


def test_cli_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "d"), "--train", "24", "--test", "12",
                                 "--size", "16", "--shard-size", "10"])
    assert result.exit_code == 0, result.output
    assert "train 24" in result.output and "circle" in result.output
    result = runner.invoke(app, ["data", "info", str(tmp_path / "d"), "--split", "test"])
    assert result.exit_code == 0, result.output
    assert "12" in result.output and "test-000001.tar" in result.output
    make_image_folder(tmp_path / "imgs", {"a": 2, "b": 1})
    result = runner.invoke(app, ["data", "shards", str(tmp_path / "imgs"), str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert resolve_source(tmp_path / "s").num_samples == 3


def test_cli_reports_missing_path_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", "info", str(tmp_path / "nope")])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "does not exist" in result.output
    assert "Traceback" not in result.output


def test_pinned_loading_asks_torch_to_pin_and_yields_the_same_batches(synth_data: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinning needs CUDA, which this machine lacks (torch then ignores it); the loader must still hand the
    request to torch's DataLoader, with and without workers, and change nothing else."""
    import sslcli.data.loader as loader_module

    requested: list[bool] = []
    real = loader_module.DataLoader

    def spy(*args: Any, **kwargs: Any) -> Any:
        requested.append(kwargs["pin_memory"])
        return real(*args, **kwargs)

    monkeypatch.setattr(loader_module, "DataLoader", spy)
    source = resolve_source(synth_data, "test")
    plain = indices(build_loader(source, to_tensor, batch_size=100, shuffle=True, seed=3))
    assert requested == []  # no workers, no pinning: batches come straight from the stream
    with pytest.warns(UserWarning, match="pin_memory"):
        for workers in (0, 1):
            pinned = build_loader(source, to_tensor, batch_size=100, shuffle=True, seed=3, num_workers=workers,
                                  pin_memory=True)
            assert indices(pinned) == plain
    assert requested == [True, True]
