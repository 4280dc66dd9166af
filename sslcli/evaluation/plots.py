"""PNG figures drawn with PIL alone: a confusion-matrix heat map and a small line plot.

Confusion matrix ``M [C, C]``: ``M[t, p]`` counts samples of true class ``t`` predicted as ``p``
(rows = true, columns = predicted).  Cells are shaded by the row-normalised value
``M[t, p] / sum_p' M[t, p']`` (per-class recall on the diagonal), white at 0 to dark blue at 1,
so small and large classes read alike; counts are written in the cells when ``C <= 30``.

Text uses PIL's default font; files are written atomically (``sslcli.atomic``).  The
geometry (:func:`confusion_layout`, :func:`curve_axes`) is public so callers can find a cell or a point.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from sslcli.atomic import atomic_path
from sslcli.errors import UserError

Colour = tuple[int, int, int]
PALETTE: list[Colour] = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                         (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
DARK: Colour = (8, 48, 107)
BLACK: Colour = (0, 0, 0)
MAX_COUNTED = 30  # above this many classes a cell is too small for its count
MAX_NAME = 18  # characters of a class name shown on an axis
PAD = 6


def confusion_matrix(pred: torch.Tensor, true: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``M [C, C]`` (LongTensor) with ``M[t, p] = #{i : true_i = t, pred_i = p}`` from ``[N]`` labels."""
    if pred.shape != true.shape or pred.ndim != 1:
        raise UserError(f"predictions {tuple(pred.shape)} and labels {tuple(true.shape)} differ; pass two [N] tensors")
    both = torch.cat([pred, true]).long().cpu()
    if both.numel() and (int(both.min()) < 0 or int(both.max()) >= num_classes):
        raise UserError(f"class indices span {int(both.min())}..{int(both.max())}, outside 0..{num_classes - 1}; "
                        "pass the dataset's class count")
    flat = both[pred.numel():] * num_classes + both[: pred.numel()]
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()  # parsed once: loading it is most of the cost of drawing a label


def _size(text: str) -> tuple[int, int]:
    """Width and height in pixels of ``text`` in the default font, drawn at the origin."""
    _, _, right, bottom = _font().getbbox(text)
    return math.ceil(right), math.ceil(bottom)


def _text(image: Image.Image, xy: tuple[int, int], text: str, fill: Colour = BLACK, *, vertical: bool = False) -> None:
    """``text`` with its box's top-left corner at ``xy``; ``vertical`` reads bottom-to-top."""
    if not vertical:
        ImageDraw.Draw(image).text(xy, text, font=_font(), fill=fill)
        return
    mask = Image.new("L", tuple(max(s, 1) for s in _size(text)), 0)
    ImageDraw.Draw(mask).text((0, 0), text, font=_font(), fill=255)
    image.paste(Image.new("RGB", (mask.height, mask.width), fill), xy, mask.rotate(90, expand=True))


def save_png(image: Image.Image, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


@dataclass(frozen=True)
class ConfusionLayout:
    """Pixel geometry of a confusion PNG: grid corner ``(left, top)``, cell side, image size."""

    left: int
    top: int
    cell: int
    width: int
    height: int
    name_width: int

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of cell ``(row, col)``, ``x1`` and ``y1`` exclusive."""
        x0, y0 = self.left + col * self.cell, self.top + row * self.cell
        return x0, y0, x0 + self.cell, y0 + self.cell


def confusion_layout(class_names: Sequence[str], max_count: int, title: str) -> ConfusionLayout:
    """Cells fit their count (``C <= 30``) or one text line (more classes, shrinking with ``C``)."""
    num, line = len(class_names), _size("Ag")[1]
    name_width = max(_size(n[:MAX_NAME])[0] for n in class_names)
    cell = max(28, _size(str(max_count))[0] + 6) if num <= MAX_COUNTED else max(line + 1, min(28, 900 // num))
    left, top = 3 * PAD + line + name_width, 2 * PAD + line
    width = max(left + num * cell + PAD, _size(title)[0] + 2 * PAD)
    return ConfusionLayout(left, top, cell, width, top + num * cell + 3 * PAD + name_width + line, name_width)


def confusion_png(matrix: torch.Tensor, class_names: Sequence[str], path: Path, *,
                  title: str = "confusion matrix (rows: true, columns: predicted, shade: row fraction)") -> Path:
    """Writes the heat map of ``matrix [C, C]`` (rows true, columns predicted) to ``path``; returns it."""
    if matrix.ndim != 2 or not matrix.shape[0] == matrix.shape[1] == len(class_names) > 0:
        raise UserError(f"confusion matrix {tuple(matrix.shape)} does not match {len(class_names)} class names; "
                        "pass a [C, C] matrix and C names")
    counts = matrix.detach().cpu().long().numpy()
    num, layout = len(class_names), confusion_layout(class_names, int(counts.max()), title)
    cell, grid = layout.cell, len(class_names) * layout.cell
    shade = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    colours = (255 * (1 - shade[..., None]) + np.array(DARK) * shade[..., None]).round().astype(np.uint8)
    image = Image.new("RGB", (layout.width, layout.height), "white")
    image.paste(Image.fromarray(colours).resize((grid, grid), Image.NEAREST), (layout.left, layout.top))
    _text(image, (PAD, PAD), title)
    for i, name in enumerate(class_names):
        w, h = _size(name[:MAX_NAME])
        _text(image, (layout.left - PAD - w, layout.top + i * cell + (cell - h) // 2), name[:MAX_NAME])
        # Column names read upwards and end against the grid, like the row names do on the left.
        xy = (layout.left + i * cell + (cell - h) // 2, layout.top + grid + PAD + layout.name_width - w)
        _text(image, xy, name[:MAX_NAME], vertical=True)
    for (t, p), value in np.ndenumerate(counts if num <= MAX_COUNTED else np.zeros((0, 0))):
        x0, y0, _, _ = layout.cell_box(t, p)
        (w, h), ink = _size(str(value)), (255, 255, 255) if shade[t, p] > 0.5 else BLACK
        _text(image, (x0 + (cell - w) // 2, y0 + (cell - h) // 2), str(value), ink)
    _text(image, (PAD, layout.top + (grid - _size("true")[0]) // 2), "true", vertical=True)
    _text(image, (layout.left + (grid - _size("predicted")[0]) // 2, layout.height - PAD - _size("Ag")[1]), "predicted")
    return save_png(image, path)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """About ``target`` round values (steps of 1, 2 or 5 x 10^e) covering ``[lo, hi]``."""
    raw = max(hi - lo, 1e-12) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    return [round(i * step, 12) for i in range(math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9) + 1)]


@dataclass(frozen=True)
class CurveAxes:
    """Plot area ``box = (x0, y0, x1, y1)`` in pixels, the ranges it spans and the tick values.

    With ``log2_x`` the horizontal position is linear in ``u = log2(x)``; ``u_range`` is in those units.
    """

    box: tuple[int, int, int, int]
    u_range: tuple[float, float]
    y_range: tuple[float, float]
    log2_x: bool
    x_ticks: list[float]
    y_ticks: list[float]

    def x_pixel(self, x: float) -> int:
        u, (ulo, uhi) = math.log2(x) if self.log2_x else x, self.u_range
        return round(self.box[0] + (u - ulo) / (uhi - ulo) * (self.box[2] - self.box[0]))

    def y_pixel(self, y: float) -> int:
        (ylo, yhi), (_, y0, _, y1) = self.y_range, self.box
        return round(y1 - (y - ylo) / (yhi - ylo) * (y1 - y0))


def curve_axes(points: dict[str, list[tuple[float, float]]], hlines: dict[str, float] | None = None, *,
               log2_x: bool = True, x_span: tuple[float, float] | None = None) -> CurveAxes:
    """The axes :func:`curve_png` draws for these arguments: a 480 x 300 px plot area.  ``x_span`` widens
    the horizontal range to cover it (panels that share an axis)."""
    xs = [x for series in points.values() for x, _ in series] + list(x_span or ())
    ys = [y for series in points.values() for _, y in series] + list((hlines or {}).values())
    if not xs or not all(math.isfinite(v) for v in xs + ys):
        raise UserError("curve points are empty or not finite; pass at least one (x, y) pair of numbers per series")
    if log2_x and min(xs) <= 0:
        raise UserError(f"x value {min(xs)} cannot go on a log2 axis; pass positive x or log2_x=False")
    us = [math.log2(x) for x in xs] if log2_x else xs
    lo, hi = min(us), max(max(us), min(us) + 1)
    if log2_x:  # ticks at the powers of two (1, 2, 4, ... shots), a quarter octave of margin
        u_range = (lo - 0.25, hi + 0.25)
        x_ticks = [2.0**e for e in range(math.ceil(u_range[0]), math.floor(u_range[1]) + 1)]
    else:
        x_ticks = nice_ticks(lo, hi)
        u_range = (x_ticks[0], x_ticks[-1])
    pad_y = 0.0 if max(ys) > min(ys) else 0.05 * max(abs(ys[0]), 1.0)  # a flat curve still gets a y scale
    y_ticks = nice_ticks(min(ys) - pad_y, max(ys) + pad_y)
    left, top = 3 * PAD + _size("Ag")[1] + max(_size(f"{y:g}")[0] for y in y_ticks), 3 * PAD + _size("Ag")[1]
    return CurveAxes((left, top, left + 480, top + 300), u_range, (y_ticks[0], y_ticks[-1]), log2_x, x_ticks, y_ticks)


def _dashed(draw: ImageDraw.ImageDraw, x0: int, x1: int, y: int, fill: Colour, dash: int = 6) -> None:
    for x in range(x0, x1, 2 * dash):
        draw.line([(x, y), (min(x + dash, x1), y)], fill=fill, width=2)


def curve_png(points: dict[str, list[tuple[float, float]]], path: Path, *, x_label: str, y_label: str, title: str,
              hlines: dict[str, float] | None = None, log2_x: bool = True) -> Path:
    """Writes :func:`curve_image` of these arguments to ``path``; returns it."""
    return save_png(curve_image(points, x_label=x_label, y_label=y_label, title=title, hlines=hlines, log2_x=log2_x),
                    path)


def curve_image(points: dict[str, list[tuple[float, float]]], *, x_label: str, y_label: str, title: str,
                hlines: dict[str, float] | None = None, log2_x: bool = True,
                x_span: tuple[float, float] | None = None) -> Image.Image:
    """A line plot of each named ``[(x, y), ...]`` series plus a dashed horizontal line per ``hlines``
    entry, with ticks and a legend.  Geometry: :func:`curve_axes`.

    Series take the ``PALETTE`` colours in order, then the horizontal lines do.
    """
    hlines = dict(hlines or {})
    axes, line = curve_axes(points, hlines, log2_x=log2_x, x_span=x_span), _size("Ag")[1]
    names = list(points) + list(hlines)
    (x0, y0, x1, y1), colours = axes.box, {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    image = Image.new("RGB", (x1 + 5 * PAD + 20 + max(_size(n)[0] for n in names), y1 + 3 * PAD + 2 * line), "white")
    draw = ImageDraw.Draw(image)
    for y in axes.y_ticks:
        draw.line([(x0, axes.y_pixel(y)), (x1, axes.y_pixel(y))], fill=(225, 225, 225))
        _text(image, (x0 - PAD - _size(f"{y:g}")[0], axes.y_pixel(y) - line // 2), f"{y:g}")
    for x in axes.x_ticks:
        draw.line([(axes.x_pixel(x), y1), (axes.x_pixel(x), y1 + 4)], fill=BLACK)
        _text(image, (axes.x_pixel(x) - _size(f"{x:g}")[0] // 2, y1 + PAD), f"{x:g}")
    draw.rectangle([x0, y0, x1, y1], outline=BLACK)
    for name, value in hlines.items():
        _dashed(draw, x0, x1, axes.y_pixel(value), colours[name])
    for name, series in points.items():
        pixels = [(axes.x_pixel(x), axes.y_pixel(y)) for x, y in sorted(series)]
        draw.line(pixels, fill=colours[name], width=2)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colours[name])
    for i, name in enumerate(names):
        lx, ly = x1 + 2 * PAD, y0 + PAD + i * (line + 4) + line // 2
        _dashed(draw, lx, lx + 20, ly, colours[name], dash=4 if name in hlines else 20)  # one dash: a solid line
        _text(image, (lx + 20 + PAD, ly - line // 2), name)
    _text(image, (x0 + (x1 - x0 - _size(title)[0]) // 2, PAD), title)
    _text(image, (x0 + (x1 - x0 - _size(x_label)[0]) // 2, y1 + 2 * PAD + line), x_label)
    _text(image, (PAD, y0 + (y1 - y0 - _size(y_label)[0]) // 2), y_label, vertical=True)
    return image
