"""A split's frozen features on disk, and their 2-D maps (PCA, and t-SNE when scikit-learn is there).

Features file, by suffix:

- ``.safetensors``: ``features [N, D]`` float32 and ``labels [N]`` int64, with the class names
  (JSON) and the split in the header (``format: sslcli-embedding``);
- ``.npy``: one structured array of ``N`` records ``(features: float32[D], label: int64)``, so
  ``a = np.load(path)`` gives ``a["features"]`` and ``a["label"]`` (no pickle needed).

PCA: with ``X_c = X - mean(X) = U S V^T``, the projection is ``X_c V[:, :2] = U[:, :2] S[:2]``
and the explained-variance ratio of component ``j`` is ``S_j^2 / sum_i S_i^2``.  Each component's
sign is fixed so that its largest-magnitude coordinate is positive (scikit-learn's ``svd_flip``
convention), so the figure does not flip between runs.  Labels ``-1`` (unlabelled) are drawn grey.
"""

from __future__ import annotations

import colorsys
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from torch import nn

from sslcli import distributed as dist
from sslcli.atomic import atomic_path
from sslcli.data.reader import DataSource
from sslcli.errors import UserError
from sslcli.evaluation.features import extract_features

# The PIL text and file helpers every sslcli figure shares.
from sslcli.evaluation.plots import BLACK, PAD, PALETTE, Colour, _size, _text, nice_ticks, save_png
from sslcli.weights_file import read_header, write_weights

if TYPE_CHECKING:
    from sslcli.evaluation.feature_cache import FeatureCache

FORMAT = "sslcli-embedding"
FEATURE_SUFFIXES = (".safetensors", ".npy")
UNLABELLED: Colour = (190, 190, 190)
PLOT_SIDE = 480  # pixels of the square plot area
MAX_LEGEND = 40  # class rows in the legend; the rest are summarised in one line
MAX_NAME = 18


def check_features_path(path: Path) -> Path:
    """``path`` if its suffix names a features format (:data:`FEATURE_SUFFIXES`), else a UserError."""
    path = Path(path)
    if path.suffix not in FEATURE_SUFFIXES:
        raise UserError(f"--out '{path}' must end in .safetensors or .npy (the features file's format); "
                        f"e.g. --out {path.with_suffix('.safetensors').name}")
    return path


def write_features(path: Path, feats: torch.Tensor, labels: torch.Tensor, *, classes: Sequence[str] | None = None,
                   split: str = "") -> Path:
    """Writes ``feats [N, D]`` and ``labels [N]`` in the format ``path``'s suffix names; returns ``path``."""
    path = check_features_path(path)
    feats, labels = feats.detach().float().cpu(), labels.detach().long().cpu()
    if path.suffix == ".safetensors":
        meta = {"format": FORMAT, "classes": json.dumps(list(classes) if classes else None), "split": split}
        return write_weights({"features": feats, "labels": labels}, path, meta)
    records = np.empty(feats.shape[0], dtype=[("features", np.float32, (feats.shape[1],)), ("label", np.int64)])
    records["features"], records["label"] = feats.numpy(), labels.numpy()
    with atomic_path(path) as tmp, tmp.open("wb") as fh:  # a handle: np.save would append .npy to the name
        np.save(fh, records)
    return path


def read_features(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """``(features [N, D], labels [N], class names or None)`` of a file :func:`write_features` wrote."""
    path = check_features_path(path)
    if path.suffix == ".safetensors":
        meta = read_header(path, FORMAT, "is not an sslcli embedding file; write one with `sslcli embed`")
        tensors = load_file(str(path))
        return tensors["features"], tensors["labels"], json.loads(meta.get("classes") or "null")
    records = np.load(path)
    return torch.from_numpy(records["features"].copy()), torch.from_numpy(records["label"].copy()), None


def pca_2d(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(projection [N, 2], explained-variance ratios [2])`` in float64 (see the module docstring).

    Eigen-decomposes the smaller Gram matrix, ``X_c^T X_c [D, D]`` or ``X_c X_c^T [N, N]`` (its
    eigenvalues are ``S^2``), so raw-pixel features with ``D >> N`` stay cheap.
    """
    if feats.ndim != 2 or feats.shape[0] < 3 or feats.shape[1] < 2:
        raise UserError(f"a 2-D projection needs at least 3 samples of at least 2 features, got {tuple(feats.shape)}")
    x = feats.double()
    x = x - x.mean(dim=0)
    if x.shape[1] <= x.shape[0]:
        eigvals, eigvecs = torch.linalg.eigh(x.T @ x)  # ascending
        projection = x @ eigvecs[:, -2:].flip(1)
    else:
        eigvals, eigvecs = torch.linalg.eigh(x @ x.T)
        projection = eigvecs[:, -2:].flip(1) * eigvals[-2:].flip(0).clamp_min(0).sqrt()
    total = x.square().sum()  # trace of either Gram matrix: the sum of all S_i^2
    ratios = eigvals[-2:].flip(0).clamp_min(0) / total if total > 0 else torch.zeros(2, dtype=torch.float64)
    peak = projection.abs().argmax(dim=0)
    signs = torch.sign(projection[peak, torch.arange(2)])
    return projection * torch.where(signs == 0, 1.0, signs), ratios


def tsne_2d(feats: torch.Tensor, *, seed: int) -> torch.Tensor | None:
    """scikit-learn's t-SNE (PCA init, perplexity ``min(30, (N - 1) / 3)``) ``[N, 2]``; None without scikit-learn."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        return None
    perplexity = min(30.0, (feats.shape[0] - 1) / 3)
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        feats.double().numpy())
    return torch.as_tensor(np.asarray(points), dtype=torch.float64)


def class_colours(num_classes: int) -> list[Colour]:
    """The figures' palette for up to 10 classes; evenly spaced hues (two lightnesses) beyond."""
    if num_classes <= len(PALETTE):
        return PALETTE[:num_classes]
    colours: list[Colour] = []
    for i in range(num_classes):  # golden-ratio hue steps keep neighbouring class indices far apart
        r, g, b = colorsys.hls_to_rgb((i * 0.618034) % 1.0, 0.45 if i % 2 else 0.6, 0.75)
        colours.append((round(255 * r), round(255 * g), round(255 * b)))
    return colours


def scatter_png(points: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], path: Path, *,
                title: str, axis: str) -> Path:
    """Writes ``points [N, 2]`` as dots coloured by ``labels [N]`` (``-1``: grey) with ticks and a legend of
    ``class_names`` (``axis`` prefixes the axis labels: ``PC`` gives ``PC1`` / ``PC2``); returns ``path``."""
    xy, ys = points.double().cpu().numpy(), labels.long().cpu().numpy()
    colours = class_colours(len(class_names))
    x_ticks, y_ticks = nice_ticks(xy[:, 0].min(), xy[:, 0].max()), nice_ticks(xy[:, 1].min(), xy[:, 1].max())
    line = _size("Ag")[1]
    x0, y0 = 3 * PAD + line + max(_size(f"{t:g}")[0] for t in y_ticks), 3 * PAD + line
    x1, y1 = x0 + PLOT_SIDE, y0 + PLOT_SIDE
    shown = [(colours[i], name[:MAX_NAME]) for i, name in enumerate(class_names[:MAX_LEGEND])]
    if len(class_names) > MAX_LEGEND:
        shown.append((UNLABELLED, f"+{len(class_names) - MAX_LEGEND} more classes"))
    if (ys < 0).any():
        shown.append((UNLABELLED, "unlabelled"))
    width = x1 + 4 * PAD + 10 + max([_size(name)[0] for _, name in shown] + [0])
    image = Image.new("RGB", (width, max(y1, y0 + len(shown) * (line + 4)) + 3 * PAD + 2 * line), "white")
    draw = ImageDraw.Draw(image)

    def pixel(value: float, ticks: list[float], lo: int, hi: int) -> int:
        return round(lo + (value - ticks[0]) / max(ticks[-1] - ticks[0], 1e-12) * (hi - lo))

    for t in x_ticks:
        px = pixel(t, x_ticks, x0, x1)
        draw.line([(px, y0), (px, y1)], fill=(235, 235, 235))
        _text(image, (px - _size(f"{t:g}")[0] // 2, y1 + PAD), f"{t:g}")
    for t in y_ticks:
        py = pixel(t, y_ticks, y1, y0)
        draw.line([(x0, py), (x1, py)], fill=(235, 235, 235))
        _text(image, (x0 - PAD - _size(f"{t:g}")[0], py - line // 2), f"{t:g}")
    draw.rectangle([x0, y0, x1, y1], outline=BLACK)
    # A fixed shuffle: no class is always painted last, over all the others.
    for i in np.random.default_rng(0).permutation(len(ys)):
        px, py = pixel(xy[i, 0], x_ticks, x0, x1), pixel(xy[i, 1], y_ticks, y1, y0)
        colour = colours[ys[i]] if 0 <= ys[i] < len(colours) else UNLABELLED
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
    for row, (colour, name) in enumerate(shown):
        top = y0 + row * (line + 4)
        draw.rectangle([x1 + 2 * PAD, top + 1, x1 + 2 * PAD + 8, top + 9], fill=colour)
        _text(image, (x1 + 3 * PAD + 10, top), name)
    _text(image, (x0 + (PLOT_SIDE - _size(title)[0]) // 2, PAD), title)
    _text(image, (x0 + (PLOT_SIDE - _size(f"{axis}1")[0]) // 2, y1 + 2 * PAD + line), f"{axis}1")
    _text(image, (PAD, y0 + (PLOT_SIDE - _size(f"{axis}2")[0]) // 2), f"{axis}2", vertical=True)
    return save_png(image, path)


@dataclass(frozen=True)
class Embedding:
    """What :func:`embed` wrote and measured."""

    features_path: Path
    pca_png: Path
    tsne_png: Path | None  # None: scikit-learn is not installed
    metrics: dict[str, Any]


def figure_paths(features_path: Path) -> tuple[Path, Path]:
    """``(STEM-pca.png, STEM-tsne.png)`` next to the features file ``STEM.safetensors`` / ``STEM.npy``."""
    stem = Path(features_path).with_suffix("")
    return stem.with_name(f"{stem.name}-pca.png"), stem.with_name(f"{stem.name}-tsne.png")


def embed(
    encoder: nn.Module,
    source: DataSource,
    transform: Callable[[Any], torch.Tensor],
    out: Path,
    *,
    title: str = "",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    seed: int = 0,
    cache: FeatureCache | None = None,
    log: Callable[[str], None] | None = None,
) -> Embedding:
    """Extracts ``source``'s features, writes them to ``out`` and their PCA (and t-SNE) maps next to it.

    ``metrics``: ``num_samples``, ``dim``, ``pca_explained_variance_ratio`` (two fractions) and
    ``tsne`` (``"written"`` or why it was skipped).  ``seed`` seeds t-SNE.
    """
    out = check_features_path(out)
    say = log or (lambda _: None)
    start = time.perf_counter()
    feats, labels = extract_features(encoder, source, transform, batch_size=batch_size, device=device,
                                     num_workers=num_workers, cache=cache)
    say(f"split '{source.split}': {feats.shape[0]} images -> {feats.shape[1]}-d features "
        f"in {time.perf_counter() - start:.1f} s")
    # Under torchrun the ranks share the extraction; rank 0 alone writes the files and returns to all.
    return dist.on_main(lambda: _write_embedding(feats, labels, source, out, title=title, seed=seed, say=say))


def _write_embedding(feats: torch.Tensor, labels: torch.Tensor, source: DataSource, out: Path, *, title: str,
                     seed: int, say: Callable[[str], None]) -> Embedding:
    """Writes the features file and its PCA (and t-SNE) maps; see :func:`embed`."""
    write_features(out, feats, labels, classes=source.classes, split=source.split)
    num_classes = max(len(source.classes or []), int(labels.max()) + 1)
    names = list(source.classes or []) + [f"class {i}" for i in range(len(source.classes or []), num_classes)]
    pca_png, tsne_png = figure_paths(out)
    projection, ratios = pca_2d(feats)
    heading = f"{title} ({source.split}, {feats.shape[0]} images)" if title else f"{source.split} split"
    scatter_png(projection, labels, names, pca_png, axis="PC", title=f"PCA of {heading}: "
                f"{100 * ratios[0]:.1f}% + {100 * ratios[1]:.1f}% of the variance")
    points = tsne_2d(feats, seed=seed)
    if points is None:
        tsne_status, tsne_path = "skipped: scikit-learn is not installed (pip install scikit-learn)", None
        say(f"t-SNE {tsne_status}")
    else:
        tsne_status, tsne_path = "written", scatter_png(points, labels, names, tsne_png, axis="t-SNE ",
                                                        title=f"t-SNE of {heading}")
    metrics = {"num_samples": feats.shape[0], "dim": feats.shape[1],
               "pca_explained_variance_ratio": [float(r) for r in ratios], "tsne": tsne_status}
    return Embedding(out, pca_png, tsne_path, metrics)
