"""``sslcli plot RUN``: a run's training curves as one PNG of panels, drawn with PIL like the other figures.

Panels, each drawn only when its numbers are present: the loss, the learning rate, the collapse monitor's
``embed_std`` and ``embed_rank``, DINO / SwAV's teacher and student entropies (from ``RUN/metrics.jsonl``),
and the top-1 accuracy of every evaluation in ``RUN/results/*.json``, placed at the epochs of the encoder
it evaluated.  Every panel's horizontal axis spans the run from 0, in training epochs: step ``s`` sits at
``s / steps_per_epoch``, where an epoch's last record falls at ``(epoch + 1) * steps_per_epoch`` (the loop
logs every epoch's last step).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from sslcli.errors import UserError
from sslcli.evaluation.plots import PAD, _size, _text, curve_image, save_png
from sslcli.evaluation.results import read_results

# (title, y label, metrics.jsonl keys drawn as its series)
CURVE_PANELS: list[tuple[str, str, tuple[str, ...]]] = [
    ("training loss", "loss", ("loss",)),
    ("learning rate", "lr", ("lr",)),
    ("collapse monitor: embedding std", "embed_std", ("embed_std",)),
    ("collapse monitor: effective rank", "embed_rank", ("embed_rank",)),
    ("teacher / student entropy (log K: uniform)", "entropy", ("teacher_entropy", "student_entropy")),
]
ACCURACY_TITLE = "evaluation top-1 (RUN/results)"
COLUMNS = 2


@dataclass(frozen=True)
class RunPlot:
    """The written PNG, its size, and each panel's title and box ``(x0, y0, x1, y1)`` in it."""

    path: Path
    size: tuple[int, int]
    panels: dict[str, tuple[int, int, int, int]]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file.  An unparsable line is skipped: a run killed mid-write leaves
    half a last line, and the curves up to it are still worth drawing."""
    if not path.is_file():
        raise UserError(f"'{path}' does not exist; pass a run directory written by `sslcli pretrain` "
                        "(it logs RUN/metrics.jsonl from its first step)")
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    if not records:
        raise UserError(f"'{path}' holds no training steps yet; plot the run after its first logged step")
    return records


def epoch_positions(records: list[dict[str, Any]]) -> list[float]:
    """Each record's position in epochs (see the module docstring); steps alone when epochs are missing."""
    first_epoch = min((r["epoch"] for r in records if isinstance(r.get("epoch"), int)), default=None)
    if first_epoch is None:
        return [float(r["step"]) for r in records]
    per_epoch = max(r["step"] for r in records if r.get("epoch") == first_epoch) / (first_epoch + 1)
    return [r["step"] / per_epoch for r in records]


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def accuracy_points(run: Path, last_epoch: float) -> dict[str, list[tuple[float, float]]]:
    """``{protocol: [(epochs, top1 %)]}`` from the run's results files; an encoder without an epoch
    count is placed at the end of training."""
    points: dict[str, list[tuple[float, float]]] = {}
    for path in sorted((run / "results").glob("*.json")):
        try:
            payload = read_results(path)
        except UserError:
            continue  # not a results file (a predictions JSON, a few-shot curve): nothing to draw
        top1 = _number(payload["metrics"].get("top1"))
        if top1 is None:
            continue
        metadata = (payload.get("encoder") or {}).get("metadata") or {}
        try:
            epochs = float(metadata.get("epochs", last_epoch))
        except (TypeError, ValueError):
            epochs = last_epoch
        points.setdefault(str(payload.get("protocol") or payload["command"]), []).append((epochs, 100 * top1))
    return points


def plot_run(run: Path | str, out: Path | str | None = None) -> RunPlot:
    """Draws ``run``'s curves (see the module docstring) to ``out`` (default ``RUN/plots/training.png``)."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"'{run}' is not a directory; pass a run directory written by `sslcli pretrain`")
    records = read_metrics(run / "metrics.jsonl")
    xs = epoch_positions(records)
    x_label = "epoch" if any("epoch" in r for r in records) else "step"
    span = (0.0, max(xs))  # every panel spans the whole run, so their horizontal axes line up
    images: dict[str, Image.Image] = {}
    for title, y_label, keys in CURVE_PANELS:
        series = {key: [(x, y) for x, r in zip(xs, records) if (y := _number(r.get(key))) is not None] for key in keys}
        series = {key: points for key, points in series.items() if points}
        if series:
            images[title] = curve_image(series, x_label=x_label, y_label=y_label, title=title, log2_x=False,
                                        x_span=span)
    accuracy = accuracy_points(run, max(xs))
    if accuracy:
        images[ACCURACY_TITLE] = curve_image(accuracy, x_label=x_label, y_label="top-1 %", title=ACCURACY_TITLE,
                                             log2_x=False, x_span=span)
    return _compose(images, f"{run}: {len(records)} logged steps", Path(out) if out else run / "plots" / "training.png")


def _compose(images: dict[str, Image.Image], heading: str, path: Path) -> RunPlot:
    """The panels in a grid of ``COLUMNS`` equal cells under a one-line heading."""
    cell_w = max(image.width for image in images.values())
    cell_h = max(image.height for image in images.values())
    top = 2 * PAD + _size(heading)[1]
    rows = math.ceil(len(images) / COLUMNS)
    sheet = Image.new("RGB", (COLUMNS * cell_w, top + rows * cell_h), "white")
    _text(sheet, (PAD, PAD), heading)
    boxes = {}
    for i, (title, image) in enumerate(images.items()):
        x0, y0 = (i % COLUMNS) * cell_w, top + (i // COLUMNS) * cell_h
        sheet.paste(image, (x0, y0))
        boxes[title] = (x0, y0, x0 + image.width, y0 + image.height)
    return RunPlot(save_png(sheet, path), sheet.size, boxes)
