"""`sslcli reconstruct` on a briefly trained MAE: the PNG panels, the results JSON, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.config import build_config
from sslcli.pretrain import pretrain

VIEW_32 = ('augment.views=[{count: 1, size: 32, scale: [0.2, 1.0], flip: 0.5, jitter_p: 0.0, gray_p: 0.0, '
           'blur_p: 0.0}]')


@pytest.fixture(scope="module")
def mae_run(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = build_config("mae", "small", {"data": str(synth_data), "arch": "vit_tiny_p4", "epochs": 8, "batch_size": 64,
                                        "num_workers": 0}, [VIEW_32, "optim.lr=3e-3", "optim.warmup_epochs=0.5"])
    return pretrain(cfg, tmp_path_factory.mktemp("mae") / "run", device="cpu")


def _tiles(png: Path, count: int = 4, gap: int = 2) -> list[np.ndarray]:
    panel = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64) / 255
    width = (panel.shape[1] - (count - 1) * gap) // count
    return [panel[:, i * (width + gap):i * (width + gap) + width] for i in range(count)]


def test_reconstruction_is_closer_to_the_original_than_the_masked_input(mae_run: Path, synth_data: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "recon"
    result = CliRunner().invoke(app, ["reconstruct", str(mae_run), str(synth_data), "--out", str(out), "--limit", "6",
                                      "--seed", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "reconstruct.json").read_text())
    assert report["command"] == "reconstruct" and report["params"]["mask_ratio"] == 0.75
    rows = report["metrics"]["images"]
    assert len(rows) == 6 and all((out / row["png"]).exists() for row in rows)
    # The learning check: the masked-patch error is well below predicting each hidden patch by its own mean.
    metrics = report["metrics"]
    print({k: round(v, 4) for k, v in metrics.items() if k != "images"})
    assert metrics["loss"] < 0.8 * metrics["mean_patch_loss"]
    assert metrics["pixel_mse"] < 0.5 * metrics["masked_input_pixel_mse"]
    for row in rows:  # the PNG itself: original | masked | reconstruction | reconstruction + visible
        original, masked, _, pasted = _tiles(out / row["png"])
        assert ((pasted - original) ** 2).mean() < 0.7 * ((masked - original) ** 2).mean()


def test_the_seed_fixes_the_masks(mae_run: Path, synth_data: Path, tmp_path: Path) -> None:
    runs = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        args = ["reconstruct", str(mae_run), str(synth_data), "--out", str(tmp_path / name), "--limit", "2",
                "--seed", seed, "--mask-ratio", "0.5", "--device", "cpu"]
        assert CliRunner().invoke(app, args).exit_code == 0
        runs.append(np.asarray(Image.open(next((tmp_path / name).glob("*.png")))))
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])
    assert json.loads((tmp_path / "a" / "reconstruct.json").read_text())["params"]["mask_ratio"] == 0.5


@pytest.mark.parametrize(("extra", "message"), [
    (["--mask-ratio", "1.0"], "--mask-ratio must be in [0, 1)"),
    (["--limit", "0"], "--limit must be at least 1"),
])
def test_bad_options_exit_2(mae_run: Path, synth_data: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["reconstruct", str(mae_run), str(synth_data), "--out", str(tmp_path), *extra])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_a_run_that_does_not_predict_pixels_is_refused(synth_data: Path, tmp_path: Path) -> None:
    # InstDisc's memory bank has a row per training image: the run is refused before its method is rebuilt
    cfg = build_config("instdisc", "small", {"data": str(synth_data), "epochs": 1, "batch_size": 256, "num_workers": 0})
    run = pretrain(cfg, tmp_path / "instdisc", device="cpu")
    result = CliRunner().invoke(app, ["reconstruct", str(run), str(synth_data), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "does not predict pixels" in result.output
    missing = CliRunner().invoke(app, ["reconstruct", str(tmp_path / "nope"), str(synth_data)])
    assert missing.exit_code == 2 and "does not exist" in missing.output
