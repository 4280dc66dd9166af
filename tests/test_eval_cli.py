"""`sslcli knn` and `sslcli linear-probe` end to end on the generated dataset, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sslcli.augment import IMAGENET_MEAN, IMAGENET_STD
from sslcli.cli.app import app
from sslcli.evaluation import resolve_encoder
from sslcli.evaluation.results import RESULT_KEYS
from sslcli.export import encoder_metadata, save_encoder
from sslcli.models.encoders import create_encoder

RANDOM_RESNET = ["--arch", "resnet18", "--random-init", "--image-size", "32"]


def invoke(*args: str | Path):  # noqa: ANN201 - click's Result
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args: str | Path) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


def read(path: Path) -> dict:
    payload = json.loads(path.read_text())
    assert set(payload) == set(RESULT_KEYS)
    return payload


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported resnet18 (random weights) recorded for 32 px inputs and full-image crops."""
    encoder = create_encoder("resnet18")
    meta = encoder_metadata(encoder, method="none", image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                            epochs=0, eval_crop_pct=1.0)
    return save_encoder(encoder, tmp_path_factory.mktemp("weights") / "resnet18.safetensors", meta)


@pytest.fixture
def run_dir(tmp_path: Path, weights: Path) -> Path:
    """A run directory as `sslcli pretrain` leaves it after its first epoch (for what evaluation reads)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: none\n")
    (run / "encoder.safetensors").write_bytes(weights.read_bytes())
    return run


def test_knn_random_init(synth_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "res" / "knn.json"
    output = ok("knn", *RANDOM_RESNET, "--data", synth_data, "--k", "5", "--k", "20", "--out", out)
    payload = read(out)
    metrics = payload["metrics"]
    assert payload["command"] == "knn" and payload["params"]["k"] == [5, 20]
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
    assert metrics["top1"] == metrics["per_k"]["5"]["top1"]  # the first --k is the headline
    assert set(metrics["per_k"]) == {"5", "20"}
    assert payload["encoder"]["kind"] == "random_init" and payload["encoder"]["arch"] == "resnet18"
    assert payload["data"]["train"]["num_samples"] == 600 and payload["data"]["test"]["num_samples"] == 300
    assert "top1" in output


def test_random_init_is_seeded_and_copies_a_source(weights: Path) -> None:
    def state(seed: int, source: Path | None = None) -> dict:
        encoder, info = resolve_encoder(source, arch=None if source else "resnet18", random_init=True,
                                        image_size=None, seed=seed)
        assert info.kind == "random_init"
        return encoder.state_dict()

    a, b, c = state(3), state(3), state(4)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.equal(a["model.conv1.weight"], c["model.conv1.weight"])
    copied = state(3, weights)  # the source's architecture, fresh weights from the same seed
    assert all(torch.equal(a[name], copied[name]) for name in a)


def test_raw_pixels_writes_to_the_working_directory(synth_data: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ok("knn", "--raw-pixels", "--image-size", "32", "--crop-pct", "1.0", "--data", synth_data)
    payload = read(tmp_path / "knn-results.json")
    assert payload["encoder"]["kind"] == "raw_pixels" and payload["encoder"]["crop_pct"] == 1.0
    assert 0.0 <= payload["metrics"]["top1"] <= 1.0


def test_run_directory_results_go_into_the_run(synth_data: Path, run_dir: Path) -> None:
    ok("knn", run_dir, "--data", synth_data, "--device", "cpu")
    payload = read(run_dir / "results" / "knn.json")
    # The preprocessing comes from the weights' metadata, not the 224 px / 0.875 defaults.
    assert payload["encoder"]["kind"] == "weights"
    assert (payload["encoder"]["image_size"], payload["encoder"]["crop_pct"]) == (32, 1.0)

    ok("linear-probe", run_dir, "--data", synth_data, "--epochs", "3", "--bn-head")
    probe = read(run_dir / "results" / "linear-probe.json")
    assert probe["command"] == "linear-probe" and probe["params"]["bn_head"] is True
    assert probe["params"]["lr"] == 0.1
    assert 0.0 <= probe["metrics"]["top1"] <= probe["metrics"]["top5"] <= 1.0


def test_raw_pixels_copy_the_preprocessing_of_a_source(synth_data: Path, weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    ok("linear-probe", weights, "--raw-pixels", "--data", synth_data, "--epochs", "2", "--out", out)
    encoder = read(out)["encoder"]
    assert (encoder["kind"], encoder["image_size"], encoder["crop_pct"]) == ("raw_pixels", 32, 1.0)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing data", "does not exist"),
        ("unknown arch", "did you mean: resnet18"),
        ("random init without arch", "--random-init needs --arch"),
        ("weights arch mismatch", "holds a resnet18 encoder, not resnet34"),
        ("not weights", "neither a run directory nor a .safetensors file"),
        ("run without encoder", "has no encoder.safetensors yet"),
        ("nothing to evaluate", "no encoder to evaluate"),
        ("two baselines", "--random-init and --raw-pixels"),
        ("k too large", "k=5000"),
        ("bad optimizer", "unknown optimizer 'adam'"),
        ("bad device", "unknown device 'gpu'"),
        ("layer of a resnet out of range", "--layer 7: resnet18 has feature levels 1..5"),
        ("layer out of range", "--layer 9: layer 9 is not a block"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(case: str, expected: str, synth_data: Path, weights: Path,
                                             tmp_path: Path) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not weights")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("method: simclr\n")
    data = ["--data", synth_data]
    args = {
        "missing data": ["knn", *RANDOM_RESNET, "--data", tmp_path / "nope"],
        "unknown arch": ["knn", "--arch", "resnet18x", "--random-init", *data],
        "random init without arch": ["knn", "--random-init", *data],
        "weights arch mismatch": ["knn", weights, "--arch", "resnet34", *data],
        "not weights": ["knn", text_file, *data],
        "run without encoder": ["linear-probe", unfinished, *data],
        "nothing to evaluate": ["knn", *data],
        "two baselines": ["knn", *RANDOM_RESNET, "--raw-pixels", *data],
        "k too large": ["knn", "--raw-pixels", "--image-size", "8", "--k", "5000", *data],
        "bad optimizer": ["linear-probe", *RANDOM_RESNET, "--optimizer", "adam", *data],
        "bad device": ["knn", *RANDOM_RESNET, "--device", "gpu", *data],
        "layer of a resnet out of range": ["knn", *RANDOM_RESNET, "--layer", "7", *data],
        "layer out of range": ["linear-probe", "--arch", "igpt_tiny", "--random-init", "--layer", "9", *data],
    }[case]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "knn-results.json").exists()
