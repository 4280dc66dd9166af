"""`sslcli plot RUN`: one PNG with a panel per curve the run logged, each curve drawn where its numbers put it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.errors import UserError
from sslcli.evaluation.plots import PALETTE, curve_axes
from sslcli.evaluation.results import RESULT_KEYS
from sslcli.evaluation.run_plots import ACCURACY_TITLE, CURVE_PANELS, plot_run

STEPS_PER_EPOCH = 10


def records(epochs: int = 4, *, entropies: bool = True) -> list[dict]:
    """Known curves logged every 5 steps: a decaying loss, a linear-decay lr, a rising rank."""
    out = []
    for step in range(5, epochs * STEPS_PER_EPOCH + 1, 5):
        record = {"epoch": (step - 1) // STEPS_PER_EPOCH, "step": step, "loss": 4 * math.exp(-step / 15) + 0.5,
                  "lr": 0.1 * (1 - step / 50), "embed_std": 0.02 + 0.001 * step, "embed_rank": 5 + step / 4}
        if entropies:
            record |= {"teacher_entropy": 4 - step / 20, "student_entropy": 4.5 - step / 30}
        out.append(record)
    return out


def make_run(root: Path, rows: list[dict], top1: float | None = 0.25) -> Path:
    root.mkdir(parents=True)
    # A run killed mid-write leaves half a line at the end: it must be skipped, not fatal.
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4')
    if top1 is not None:
        payload = {key: None for key in RESULT_KEYS} | {
            "schema": 2, "command": "knn", "protocol": "knn", "sslcli_version": "0", "params": {},
            "metrics": {"top1": top1}, "encoder": {"metadata": {"epochs": "2"}}, "time": {"created": None}}
        (root / "results").mkdir()
        (root / "results" / "knn.json").write_text(json.dumps(payload))
    return root


def colour_pixels(image: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((image == np.array(colour)).all(axis=-1).sum())


def test_cli_writes_every_panel_with_its_curves(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", records())
    result = CliRunner().invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    png = run / "plots" / "training.png"
    assert png.stat().st_size > 10_000
    plot = plot_run(run, tmp_path / "again.png")
    image = np.asarray(Image.open(png).convert("RGB"))
    assert (image.shape[1], image.shape[0]) == plot.size
    assert list(plot.panels) == [title for title, _, _ in CURVE_PANELS] + [ACCURACY_TITLE]
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # not a blank or single-colour image
    for title, box in plot.panels.items():
        x0, y0, x1, y1 = box
        panel = image[y0:y1, x0:x1]
        assert colour_pixels(panel, PALETTE[0]) > 50, title  # the first series' line and markers
    entropy = plot.panels["teacher / student entropy (log K: uniform)"]
    assert colour_pixels(image[entropy[1]:entropy[3], entropy[0]:entropy[2]], PALETTE[1]) > 50


def test_each_point_sits_where_its_step_and_value_put_it(tmp_path: Path) -> None:
    rows = records(entropies=False)
    plot = plot_run(make_run(tmp_path / "run", rows, top1=None), tmp_path / "p.png")
    image = np.asarray(Image.open(plot.path).convert("RGB"))
    assert list(plot.panels) == [title for title, _, _ in CURVE_PANELS[:4]]  # no entropy, no accuracy panel
    for title, _, (key,) in CURVE_PANELS[:4]:
        # Independent of run_plots' own conversion: step s of a 10-step epoch sits at epoch s / 10.
        points = [(r["step"] / STEPS_PER_EPOCH, r[key]) for r in rows]
        axes = curve_axes({key: points}, log2_x=False, x_span=(0, 4))
        x0, y0, _, _ = plot.panels[title]
        for x, y in points:
            assert tuple(image[y0 + axes.y_pixel(y), x0 + axes.x_pixel(x)]) == PALETTE[0], (title, x, y)


def test_accuracy_sits_at_the_epochs_of_the_evaluated_encoder(tmp_path: Path) -> None:
    plot = plot_run(make_run(tmp_path / "run", records()), tmp_path / "p.png")
    image = np.asarray(Image.open(plot.path).convert("RGB"))
    axes = curve_axes({"knn": [(2.0, 25.0)]}, log2_x=False, x_span=(0, 4))  # the run's 4 epochs
    x0, y0, _, _ = plot.panels[ACCURACY_TITLE]
    assert tuple(image[y0 + axes.y_pixel(25.0), x0 + axes.x_pixel(2.0)]) == PALETTE[0]


def test_a_run_without_steps_is_a_user_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"event": "start"}\n')
    with pytest.raises(UserError, match="no training steps yet"):
        plot_run(run)
    assert not (run / "plots").exists()
