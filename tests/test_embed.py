"""`sslcli embed`: the features file against extract_features, PCA against a numpy SVD, the PNG's colours,
t-SNE with and without scikit-learn, and one-line errors."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.data.reader import resolve_source
from sslcli.data.synth import generate_synthetic
from sslcli.evaluation import EncoderInfo, PixelEncoder, extract_features, resolve_encoder
from sslcli.evaluation.embed import class_colours, embed, pca_2d, read_features, scatter_png, write_features
from sslcli.evaluation.plots import PALETTE

RANDOM_RESNET = ["--arch", "resnet18", "--random-init", "--image-size", "32", "--crop-pct", "1.0"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("embed-data") / "shapes"
    generate_synthetic(out, train=20, test=80, size=32, seed=0, shard_size=40)
    return out


def invoke(*args: str | Path):  # noqa: ANN201 - click's Result
    return CliRunner().invoke(app, ["embed", *(str(a) for a in args)])


def reference_pca(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy's SVD of the centred data: ``U[:, :2] S[:2]`` and ``S^2 / sum S^2``."""
    centred = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    return u[:, :2] * s[:2], (s[:2] ** 2) / (s**2).sum()


@pytest.mark.parametrize(("n", "d"), [(50, 8), (6, 40)])  # the [D, D] and the [N, N] Gram matrix
def test_pca_matches_numpy_svd_up_to_sign(n: int, d: int) -> None:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n)) * torch.linspace(3, 0.5, d)
    projection, ratios = pca_2d(x)
    expected, expected_ratios = reference_pca(x.double().numpy())
    for j in range(2):
        sign = np.sign(expected[np.abs(expected[:, j]).argmax(), j])
        np.testing.assert_allclose(projection[:, j].numpy(), sign * expected[:, j], rtol=1e-7, atol=1e-9)
        # The deterministic sign: each component's largest-magnitude coordinate is positive.
        assert projection[projection[:, j].abs().argmax(), j] > 0
    np.testing.assert_allclose(ratios.numpy(), expected_ratios, rtol=1e-9)


def test_features_file_round_trips(tmp_path: Path) -> None:
    feats, labels = torch.randn(7, 5), torch.tensor([0, 1, 2, 0, 1, 2, -1])
    path = write_features(tmp_path / "f.safetensors", feats, labels, classes=["a", "b", "c"], split="test")
    got_x, got_y, classes = read_features(path)
    assert torch.equal(got_x, feats) and torch.equal(got_y, labels) and classes == ["a", "b", "c"]
    records = np.load(write_features(tmp_path / "f.npy", feats, labels))  # plain numpy, no pickle
    assert records.shape == (7,) and np.array_equal(records["features"], feats.numpy())
    assert np.array_equal(records["label"], labels.numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy", "f.safetensors"]  # no temporary left behind


def test_embed_cli_writes_features_png_and_results(small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb" / "test.safetensors"
    result = invoke(*RANDOM_RESNET, "--data", small_data, "--out", out, "--results", tmp_path / "embed.json")
    assert result.exit_code == 0, result.output
    feats, labels, classes = read_features(out)
    encoder, info = resolve_encoder(None, arch="resnet18", random_init=True, image_size=32, crop_pct=1.0)
    source = resolve_source(small_data, "test")
    ref_x, ref_y = extract_features(encoder, source, info.transform(), batch_size=32, device="cpu")
    torch.testing.assert_close(feats, ref_x, rtol=1e-5, atol=1e-6)
    assert torch.equal(labels, ref_y) and classes == source.classes

    payload = json.loads((tmp_path / "embed.json").read_text())
    ratios = payload["metrics"]["pca_explained_variance_ratio"]
    np.testing.assert_allclose(ratios, reference_pca(ref_x.double().numpy())[1], rtol=1e-4)
    assert payload["command"] == "embed" and payload["metrics"]["num_samples"] == 80
    assert payload["metrics"]["tsne"].startswith("skipped: scikit-learn is not installed")
    assert "t-SNE skipped" in result.output and not (out.parent / "test-tsne.png").exists()

    image = np.asarray(Image.open(out.parent / "test-pca.png").convert("RGB")).reshape(-1, 3)
    present = {tuple(int(c) for c in pixel) for pixel in np.unique(image, axis=0)}
    assert set(class_colours(len(classes))) <= present  # every class's dots (and its legend swatch)


def test_tsne_path_with_scikit_learn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class FakeTSNE:  # stands in for sklearn.manifold.TSNE, which is not installed here
        def __init__(self, **kwargs: object) -> None:
            calls.append(kwargs)

        def fit_transform(self, x: np.ndarray) -> np.ndarray:
            return x[:, :2]

    manifold = types.ModuleType("sklearn.manifold")
    manifold.TSNE = FakeTSNE  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.manifold", manifold)

    synth = tmp_path / "d"
    generate_synthetic(synth, train=1, test=30, size=16, seed=0, shard_size=30)
    info = EncoderInfo("pixels", "raw_pixels", "raw_pixels", 16, (0.5,) * 3, (0.5,) * 3, 1.0)
    result = embed(PixelEncoder(16), resolve_source(synth, "test"), info.transform(), tmp_path / "e.npy", seed=3)
    assert result.tsne_png == tmp_path / "e-tsne.png" and result.tsne_png.is_file()
    assert result.metrics["tsne"] == "written" and calls[0]["random_state"] == 3 and calls[0]["perplexity"] < 30


def test_scatter_png_many_classes_and_unlabelled(tmp_path: Path) -> None:
    points = torch.randn(60, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(60) % 13 - 1  # twelve classes and some unlabelled (-1) points
    names = [f"c{i}" for i in range(12)]
    image = Image.open(scatter_png(points, labels, names, tmp_path / "s.png", title="t", axis="PC")).convert("RGB")
    present = {tuple(int(c) for c in pixel) for pixel in np.unique(np.asarray(image).reshape(-1, 3), axis=0)}
    assert set(class_colours(12)) <= present and (190, 190, 190) in present
    assert len(set(class_colours(12))) == 12 and class_colours(3) == PALETTE[:3]


@pytest.mark.parametrize("suffix", [".txt", ".pt", ""])
def test_bad_suffix_is_one_line_exit_2(suffix: str, small_data: Path, tmp_path: Path) -> None:
    result = invoke(*RANDOM_RESNET, "--data", small_data, "--out", tmp_path / f"features{suffix}")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and ".safetensors or .npy" in lines[0]
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())
