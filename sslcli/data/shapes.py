"""The embedded dataset's ten shape classes as polygon outlines: unit-size layers, drawn by ``synth``."""

from __future__ import annotations

import math

import numpy as np


def _regular(
    n: int, radius: float = 1.0, phase: float = -math.pi / 2, centre: tuple[float, float] = (0, 0)
) -> np.ndarray:
    """A regular n-gon (a circle for large n) as an (n, 2) array of points."""
    angles = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], axis=1)


def _star(points: int, inner: float) -> np.ndarray:
    """A star outline alternating between radius 1 and ``inner``."""
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    """The classic parametric heart curve, centred on its bounding box."""
    t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    points = np.stack([x, y], axis=1)
    return points - (points.max(axis=0) + points.min(axis=0)) / 2


def _layers() -> dict[str, list[tuple[np.ndarray, int]]]:
    """Each class as polygon layers (points, fill); fill 0 cuts a hole into earlier layers.

    Points are normalised so the farthest one of the first layer sits at distance 1, which
    makes the drawn radius mean the same visual size for every class.
    """
    arm = 0.32
    raw: dict[str, list[tuple[np.ndarray, int]]] = {
        "circle": [(_regular(64), 255)],
        "square": [(_regular(4, phase=math.pi / 4), 255)],
        "triangle": [(_regular(3), 255)],
        "star": [(_star(5, 0.42), 255)],
        "cross": [
            (np.array([[-arm, -1], [arm, -1], [arm, -arm], [1, -arm], [1, arm], [arm, arm],
                       [arm, 1], [-arm, 1], [-arm, arm], [-1, arm], [-1, -arm], [-arm, -arm]]), 255)
        ],
        "heart": [(_heart(), 255)],
        "crescent": [(_regular(64), 255), (_regular(64, 0.85, centre=(0.45, -0.1)), 0)],
        "ring": [(_regular(64), 255), (_regular(64, 0.55), 0)],
        "arrow": [(np.array([[-1, -0.22], [0.15, -0.22], [0.15, -0.62], [1, 0], [0.15, 0.62], [0.15, 0.22],
                             [-1, 0.22]]), 255)],
        "hourglass": [(np.array([[-0.7, -1], [0.7, -1], [0.12, 0], [0.7, 1], [-0.7, 1], [-0.12, 0]]), 255)],
    }
    shapes = {}
    for name, layers in raw.items():
        scale = np.linalg.norm(layers[0][0], axis=1).max()
        shapes[name] = [(points / scale, fill) for points, fill in layers]
    return shapes


# Class name -> [(points [n, 2], fill)]: fill 0 cuts a hole into the earlier layers.
SHAPES: dict[str, list[tuple[np.ndarray, int]]] = _layers()
