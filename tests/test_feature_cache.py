"""The feature cache: a second evaluation runs no forward pass, and weights, data or preprocessing that
change (even one weight) give fresh features, identical to an uncached extraction."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from sslcli.augment import IMAGENET_MEAN, IMAGENET_STD
from sslcli.cli.app import app
from sslcli.data.reader import resolve_source
from sslcli.data.synth import generate_synthetic
from sslcli.evaluation import EncoderInfo, extract_features, extract_labelled, resolve_encoder
from sslcli.evaluation.feature_cache import default_cache_dir, encoder_digest, feature_cache_for
from sslcli.export import encoder_metadata, save_encoder
from sslcli.models.encoders import create_encoder

INFO = EncoderInfo(name="tiny", kind="weights", arch="tiny", image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   crop_pct=1.0, path="/weights/tiny.safetensors")


class CountingEncoder(nn.Module):
    """A conv + pool encoder that counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=4)
        self.bn = nn.BatchNorm2d(8)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.bn(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache-data") / "shapes"
    generate_synthetic(out, train=120, test=60, size=32, seed=0, shard_size=60)
    return out


def extract(encoder: nn.Module, data: Path, cache_dir: Path | None, info: EncoderInfo = INFO,
            log: list[str] | None = None):  # noqa: ANN201 - LabelledFeatures
    say = None if log is None else log.append
    cache = None if cache_dir is None else feature_cache_for(info, directory=cache_dir, log=say)
    return extract_labelled(encoder, resolve_source(data, "train"), resolve_source(data, "test"), info.transform(),
                            batch_size=32, device="cpu", cache=cache)


def assert_same(a, b) -> None:  # noqa: ANN001 - two LabelledFeatures
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_second_extraction_reads_the_cache(small_data: Path, tmp_path: Path) -> None:
    encoder, log = CountingEncoder(), []
    uncached = extract(encoder, small_data, None)
    encoder.calls = 0
    first = extract(encoder, small_data, tmp_path, log=log)
    assert encoder.calls == 6  # 120 train + 60 test images in batches of 32
    encoder.calls = 0
    second = extract(encoder, small_data, tmp_path, log=log)
    assert encoder.calls == 0
    assert_same(first, uncached)
    assert_same(second, uncached)
    assert [line.split(":")[0] for line in log] == ["feature cache miss"] * 2 + ["feature cache hit"] * 2
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # one entry per split


def test_one_changed_weight_invalidates(small_data: Path, tmp_path: Path) -> None:
    encoder = CountingEncoder()
    extract(encoder, small_data, tmp_path)
    with torch.no_grad():
        encoder.conv.weight[0, 0, 0, 0] += 1e-3
    encoder.calls = 0
    changed = extract(encoder, small_data, tmp_path)
    assert encoder.calls > 0
    assert_same(changed, extract(encoder, small_data, None))
    # The older encoder's entries were replaced, not kept beside the new ones.
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    with torch.no_grad():
        encoder.bn.running_mean[3] += 1.0  # a buffer counts like a parameter
    encoder.calls = 0
    extract(encoder, small_data, tmp_path)
    assert encoder.calls > 0


def test_changed_data_invalidates(small_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    encoder, cache_dir = CountingEncoder(), tmp_path / "cache"
    before = extract(encoder, data, cache_dir)
    shard = next(data.glob("test-*.tar"))
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: re-extracted to be safe
    encoder.calls = 0
    extract(encoder, data, cache_dir)
    assert encoder.calls == 2  # the test split only (60 images), the train split hit
    generate_synthetic(data, train=120, test=60, size=32, seed=1, shard_size=60, overwrite=True)
    after = extract(encoder, data, cache_dir)
    assert_same(after, extract(encoder, data, None))
    assert not torch.equal(after.train_x, before.train_x)


def test_preprocessing_and_source_are_in_the_key(small_data: Path, tmp_path: Path) -> None:
    encoder, source = CountingEncoder(), resolve_source(small_data, "test")
    base, _ = feature_cache_for(INFO, directory=tmp_path).entry(encoder, source)
    for change in ({"image_size": 48}, {"crop_pct": 0.875}, {"mean": (0.5, 0.5, 0.5)}, {"layer": 3},
                   {"input_space": "lab_l"}):
        info = dataclasses.replace(INFO, **change)
        assert feature_cache_for(info, directory=tmp_path).entry(encoder, source)[0] != base, change
    assert feature_cache_for(INFO, directory=tmp_path).entry(encoder, resolve_source(small_data, "train"))[0] != base
    pixels = dataclasses.replace(INFO, kind="raw_pixels")
    assert feature_cache_for(pixels) is None  # nothing worth storing


def test_random_init_seeds_are_told_apart() -> None:
    def digest(seed: int) -> str:
        return encoder_digest(resolve_encoder(None, arch="resnet18", random_init=True, image_size=32, seed=seed)[0])

    assert digest(0) == digest(0) != digest(1)


def test_damaged_entry_is_recomputed(small_data: Path, tmp_path: Path) -> None:
    encoder, log = CountingEncoder(), []
    source = resolve_source(small_data, "test")
    cache = feature_cache_for(INFO, directory=tmp_path, log=log.append)
    reference = extract_features(encoder, source, INFO.transform(), batch_size=32, device="cpu", cache=cache)
    cache.entry(encoder, source)[0].write_bytes(b"not a safetensors file")
    again = extract_features(encoder, source, INFO.transform(), batch_size=32, device="cpu", cache=cache)
    assert torch.equal(again[0], reference[0]) and torch.equal(again[1], reference[1])
    assert "damaged or stale" in log[1] and log[2].startswith("feature cache miss")


def test_default_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_cache_dir(dataclasses.replace(INFO, run_dir=str(tmp_path))) == tmp_path / "cache/features"
    monkeypatch.setenv("SSLCLI_CACHE", str(tmp_path / "c"))
    assert default_cache_dir(INFO) == tmp_path / "c" / "features"
    monkeypatch.delenv("SSLCLI_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir(INFO) == tmp_path / "xdg" / "sslcli" / "features"


def test_cli_commands_share_the_run_cache_with_identical_results(small_data: Path, tmp_path: Path) -> None:
    encoder = create_encoder("resnet18")
    meta = encoder_metadata(encoder, method="none", image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, epochs=0,
                            eval_crop_pct=1.0)
    run = tmp_path / "run"
    save_encoder(encoder, run / "encoder.safetensors", meta)

    def knn(*extra: str) -> tuple[str, dict]:
        result = CliRunner().invoke(app, ["knn", str(run), "--data", str(small_data), "--k", "5", *extra])
        assert result.exit_code == 0, result.output
        return result.output, json.loads((run / "results" / "knn.json").read_text())["metrics"]

    first, first_metrics = knn()
    second, second_metrics = knn()
    uncached, uncached_metrics = knn("--no-cache")
    assert first.count("feature cache miss") == 2 and second.count("feature cache hit") == 2
    assert "feature cache" not in uncached
    assert len(list((run / "cache" / "features").glob("*.safetensors"))) == 2
    assert first_metrics == second_metrics == uncached_metrics
    # The other commands read the same entries: no forward pass at all.
    for command in (["linear-probe", "--epochs", "2"], ["embed", "--out", str(tmp_path / "e.npy")]):
        result = CliRunner().invoke(app, [*command, str(run), "--data", str(small_data)])
        assert result.exit_code == 0, result.output
        assert "feature cache hit" in result.output and "feature cache miss" not in result.output
