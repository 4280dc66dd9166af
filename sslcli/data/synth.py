"""The embedded dataset: generated images of coloured shapes, labelled by shape class.

Every image shows one to three shapes of the same class with a random colour, size,
position, rotation and surface texture on a random background, plus a caption describing
class, count, size, colour and background. Colour, position, size and background are
nuisance factors: they vary independently of the label, so raw-pixel similarity is a poor
classifier while an encoder that has learnt shape does well.

Each sample also carries ``seg.png``, the foreground mask (where the shapes are, not which
class): a second modality of the scene for multi-view methods such as CMC.
"""

from __future__ import annotations

import functools
import io
import math
import os
import zlib
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sslcli.data.shapes import SHAPES
from sslcli.data.shards import ShardWriter, prepare_output, sample_fields, sample_key, write_index
from sslcli.data.synth_pairs import (UNSEEN_SPLIT, ColourRule, caption_rng, colour_rules, hold_out_plan, varied_caption,
                                     write_classes)
from sslcli.engine.metrics import track
from sslcli.errors import UserError

CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "heart",
    "crescent",
    "ring",
    "arrow",
    "hourglass",
)
# The per-sample foreground mask's shard field: an extra view for multi-view methods (CMC).
SEGMENTATION_FIELD = "seg.png"
_PLURALS = {"cross": "crosses", "hourglass": "hourglasses"}

_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (240, 215, 35),
    "green": (40, 165, 60),
    "cyan": (40, 200, 215),
    "blue": (35, 70, 210),
    "purple": (125, 55, 185),
    "pink": (245, 125, 185),
    "brown": (125, 75, 35),
    "white": (240, 240, 240),
    "grey": (125, 125, 125),
    "black": (25, 25, 25),
}

_BACKGROUND_PHRASES = {
    "plain": "a plain {} background",
    "gradient": "a {} gradient background",
    "noisy": "a noisy {} background",
}
# No stripes or checks: high-contrast patterns are instance cues that colour jitter and crops do not
# remove, so a contrastive encoder learns them before shape; measured, they kept a 2-minute CPU
# SimCLR run near chance.  Colour, position, size, rotation, noise and gradients remain.
_BACKGROUND_PROBABILITIES = (0.35, 0.35, 0.3)  # plain, gradient, noisy
_TEXTURES = ("solid", "shaded", "speckled")
_TEXTURE_PROBABILITIES = (0.5, 0.3, 0.2)
# Shape radius (centre to farthest point) as a fraction of the image side.
_RADIUS = {"small": (0.17, 0.21), "medium": (0.23, 0.29), "large": (0.31, 0.40)}
# Bigger groups only come in sizes that fit side by side without heavy overlap.
_SIZES_FOR_COUNT = {1: ("small", "medium", "large"), 2: ("small", "medium"), 3: ("small",)}
_COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
_COUNT_PROBABILITIES = (0.6, 0.3, 0.1)
MAX_ROTATION = 180.0  # degrees either way: by default shapes have no upright orientation
_SUPERSAMPLE = 4  # masks are drawn at 4x and box-filtered down for anti-aliased edges
_POOL_THRESHOLD = 1000  # below this many samples, process start-up costs more than it saves
_CHUNK = 250
# (seed, split, start, stop, count, size, max_rotation, per-label colour rules, varied captions, shape size)
_Task = tuple[int, str, int, int, int, int, float, tuple[ColourRule, ...] | None, bool, str | None]


assert set(SHAPES) == set(CLASSES)


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for one sample: a pure function of (seed, split, index), so any worker
    count produces the same images."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def split_labels(seed: int, split: str, count: int) -> np.ndarray:
    """Exactly balanced labels for a split, in a random order fixed by (seed, split)."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), 2**32 - 1, count])
    return rng.permutation(np.arange(count) % len(CLASSES))


def _pick_colours(rng: np.random.Generator, fg: str | None = None, avoid: str | None = None) -> tuple[str, str]:
    """(shape colour, background colour) names that contrast clearly; ``fg`` fixes the first, ``avoid`` excludes one."""
    while fg is None or fg == avoid:  # draws exactly once unless ``avoid`` is hit: default data stays unchanged
        fg = _COLOUR_NAMES[int(rng.integers(len(_COLOUR_NAMES)))]
    backgrounds = _BACKGROUNDS_FOR[fg]
    return fg, backgrounds[int(rng.integers(len(backgrounds)))]


def _jittered(rng: np.random.Generator, name: str) -> np.ndarray:
    """The named colour, nudged per channel so equal names are not equal pixels."""
    return np.clip(np.array(_COLOURS[name], np.float32) + rng.uniform(-18, 18, 3).astype(np.float32), 0, 255)


def _shade(colour: np.ndarray, amount: float) -> np.ndarray:
    """A lighter version of a dark colour or a darker version of a light one."""
    target = 0.0 if colour.mean() > 128 else 255.0
    return colour + (target - colour) * amount


def _contrasting_backgrounds() -> dict[str, tuple[str, ...]]:
    """For each shape colour, the background colours it stays clearly visible on.

    Patterned backgrounds mix the base colour with a shade of it, so the shape must stand
    out from both (RGB distance of at least 130 from the base and 90 from its shades).
    """
    table = {}
    for fg, fg_rgb in _COLOURS.items():
        fg_colour = np.array(fg_rgb, np.float32)
        table[fg] = tuple(
            bg
            for bg, bg_rgb in _COLOURS.items()
            if bg != fg
            and math.dist(fg_colour, np.array(bg_rgb, np.float32)) >= 130
            and all(math.dist(fg_colour, _shade(np.array(bg_rgb, np.float32), a)) >= 90 for a in (0.15, 0.3))
        )
    return table


_COLOUR_NAMES = tuple(_COLOURS)
_BACKGROUNDS_FOR = _contrasting_backgrounds()


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> np.ndarray:
    """Pixel (y, x) coordinates, shared read-only between calls since every image needs them."""
    grid = np.mgrid[0:size, 0:size].astype(np.float32)
    grid.flags.writeable = False
    return grid


def _noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Per-pixel Gaussian noise (float32: half the cost of numpy's default float64)."""
    return rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(sigma)


def _ramp(rng: np.random.Generator, size: int) -> np.ndarray:
    """Position along a random direction, in pixels, for every pixel (for gradients and shading)."""
    angle = rng.uniform(0, math.pi)
    ys, xs = _grid(size)
    return xs * math.cos(angle) + ys * math.sin(angle)


def _background(rng: np.random.Generator, size: int, colour: np.ndarray) -> tuple[np.ndarray, str]:
    """A float (size, size, 3) background in one of the patterns, and the pattern's name."""
    pattern = str(rng.choice(list(_BACKGROUND_PHRASES), p=_BACKGROUND_PROBABILITIES))
    other = _shade(colour, rng.uniform(0.15, 0.3))
    if pattern == "gradient":
        ramp = _ramp(rng, size)
        t = ((ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6))[..., None]
        image = colour * (1 - t) + other * t
    else:
        image = np.broadcast_to(colour, (size, size, 3))
    sigma = rng.uniform(12, 22) if pattern == "noisy" else rng.uniform(2, 6)
    return image + _noise(rng, size, sigma), pattern


def _texture(rng: np.random.Generator, size: int, colour: np.ndarray) -> np.ndarray:
    """A full-image surface (solid, shaded or speckled) that the mask cuts the shapes from."""
    kind = str(rng.choice(_TEXTURES, p=_TEXTURE_PROBABILITIES))
    brightness = np.ones((size, size, 1), np.float32)
    if kind == "shaded":
        ramp = _ramp(rng, size)
        brightness = (0.7 + 0.5 * (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6))[..., None]
    sigma = rng.uniform(8, 14) if kind == "speckled" else rng.uniform(2, 6)
    return colour * brightness + _noise(rng, size, sigma)


def _place(rng: np.random.Generator, size: int, radii: list[float]) -> list[tuple[float, float]]:
    """Centres that keep every shape inside the image and, when possible, apart."""
    centres: list[tuple[float, float]] = []
    for radius in radii:
        for _ in range(30):
            centre = tuple(rng.uniform(radius, size - radius, 2))
            if all(math.dist(centre, other) > 0.9 * (radius + r) for other, r in zip(centres, radii)):
                break
        centres.append(centre)  # after 30 misses a little overlap beats an infinite loop
    return centres


def _mask(rng: np.random.Generator, shape: str, count: int, size_word: str, size: int,
          max_rotation: float = MAX_ROTATION) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``count`` instances of ``shape``, each rotated by up to ``max_rotation``
    degrees either way from upright."""
    base = rng.uniform(*_RADIUS[size_word]) * size
    radii = [base * rng.uniform(0.9, 1.1) for _ in range(count)]
    big = size * _SUPERSAMPLE
    alpha = np.zeros((size, size), np.float32)
    for radius, centre in zip(radii, _place(rng, size, radii)):
        limit = math.radians(max_rotation)  # exactly pi at 180: the default data is unchanged, byte for byte
        angle = rng.uniform(-limit, limit)
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        # Each instance gets its own canvas so a ring's hole cannot cut into a neighbour.
        canvas = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(canvas)
        for points, fill in SHAPES[shape]:
            placed = (points @ rotation.T * radius + centre) * _SUPERSAMPLE
            draw.polygon([tuple(p) for p in placed.tolist()], fill=fill)
        alpha = np.maximum(alpha, np.asarray(canvas.reduce(_SUPERSAMPLE), np.float32) / 255)
    return alpha


def render_sample(rng: np.random.Generator, size: int, label: int | None = None,
                  max_rotation: float = MAX_ROTATION, shape_size: str | None = None) -> tuple[Image.Image, int, str]:
    """Draws one image; returns (RGB image, class index into CLASSES, caption).

    ``label`` fixes the class (used for balanced splits); otherwise it is drawn from ``rng``.
    """
    image, label, caption, _ = render_sample_with_mask(rng, size, label, max_rotation, shape_size=shape_size)
    return image, label, caption


def render_sample_with_mask(
    rng: np.random.Generator, size: int, label: int | None = None, max_rotation: float = MAX_ROTATION,
    fg: str | None = None, avoid: str | None = None, captions: np.random.Generator | None = None,
    shape_size: str | None = None,
) -> tuple[Image.Image, int, str, Image.Image]:
    """``render_sample`` plus the foreground segmentation: an 8-bit grey image of shape coverage.
    ``fg`` fixes the shape colour and ``avoid`` forbids one (held-out pairs, see ``synth_pairs``); with a
    ``captions`` generator the caption leaves out random details (``synth_pairs.varied_caption``).
    ``shape_size`` (small, medium or large) fixes the size word, and draws the count among those that size
    comes in (large shapes come alone).

    The mask is a second modality of the same scene (as depth or segmentation are for CMC on NYU):
    it shows where the shapes are, not which class they belong to, and it has no colour.
    """
    if label is None:
        label = int(rng.integers(len(CLASSES)))
    shape = CLASSES[label]
    if shape_size is None:
        count = int(rng.choice(3, p=_COUNT_PROBABILITIES)) + 1
        sizes = _SIZES_FOR_COUNT[count]
        size_word = sizes[int(rng.integers(len(sizes)))]
    else:
        counts = [n for n, sizes in _SIZES_FOR_COUNT.items() if shape_size in sizes]
        weights = np.array([_COUNT_PROBABILITIES[n - 1] for n in counts])
        count, size_word = int(rng.choice(counts, p=weights / weights.sum())), shape_size
    fg_name, bg_name = _pick_colours(rng, fg, avoid)
    background, pattern = _background(rng, size, _jittered(rng, bg_name))
    alpha = _mask(rng, shape, count, size_word, size, max_rotation)[..., None]
    foreground = _texture(rng, size, _jittered(rng, fg_name))
    pixels = background * (1 - alpha) + foreground * alpha
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
    noun = shape if count == 1 else _PLURALS.get(shape, f"{shape}s")
    background_phrase = _BACKGROUND_PHRASES[pattern].format(bg_name)
    caption = (f"{_COUNT_WORDS[count]} {size_word} {fg_name} {noun} on {background_phrase}" if captions is None else
               varied_caption(captions, _COUNT_WORDS[count], size_word, fg_name, noun, background_phrase))
    mask = Image.fromarray(np.clip(alpha[..., 0] * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    return image, int(label), caption, mask


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _render_range(task: _Task) -> list[tuple[bytes, bytes, int, str]]:
    """Renders samples [start, stop) of a split as (image PNG, mask PNG, label, caption) (runs in pool workers)."""
    seed, split, start, stop, count, size, max_rotation, rules, varied, shape_size = task
    labels = split_labels(seed, split, count)
    rendered = []
    for index in range(start, stop):
        fg, avoid = rules[int(labels[index])] if rules else (None, None)
        image, label, caption, mask = render_sample_with_mask(sample_rng(seed, split, index), size,
                                                              label=int(labels[index]), max_rotation=max_rotation,
                                                              fg=fg, avoid=avoid,
                                                              captions=caption_rng(seed, split, index) if varied else None,
                                                              shape_size=shape_size)
        rendered.append((_png(image), _png(mask), label, caption))
    return rendered


def _worker_count() -> int:
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(available, 8))


def generate_synthetic(
    out_dir: Path,
    *,
    train: int = 10000,
    test: int = 2000,
    size: int = 64,
    seed: int = 0,
    shard_size: int = 2000,
    overwrite: bool = False,
    max_rotation: float = MAX_ROTATION,
    hold_out_pairs: bool = False,
    unseen: int = 1000,
    varied_captions: bool = False,
    shape_size: str | None = None,
) -> dict:
    """Writes the synthetic dataset as ``train-*.tar``, ``test-*.tar``, ``index.json`` and ``classes.txt``.

    The output is byte-identical for identical arguments, whatever the number of processes.
    ``max_rotation`` below 180 degrees gives the shapes an upright orientation (a rotation-prediction
    pretext has nothing to predict on the default data). ``hold_out_pairs`` keeps one colour per class out of
    train and test and writes ``unseen`` images of just those pairs (index key ``held_out_pairs``);
    ``varied_captions`` drops random details from the captions (the images stay the same). ``shape_size``
    draws every shape in one size (large: one shape that fills much of the image, for the patch pretexts,
    whose tiles are otherwise mostly background). Returns the index.
    """
    for name, value in (("train", train), ("test", test)):
        if value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if size < 16:
        raise UserError(f"--size must be at least 16 pixels, got {size}")
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    if seed < 0:
        raise UserError(f"--seed must be non-negative, got {seed}")
    if not 0 <= max_rotation <= 180:
        raise UserError(f"--max-rotation must be between 0 and 180 degrees, got {max_rotation}")
    if shape_size is not None and shape_size not in _RADIUS:
        raise UserError(f"--shape-size must be one of {', '.join(_RADIUS)}, got '{shape_size}'")
    pairs, extra_splits = hold_out_plan(hold_out_pairs, unseen, seed, CLASSES, _COLOUR_NAMES)
    out_dir = Path(out_dir)
    counts = {"train": train, "test": test, **extra_splits}
    # Unseen shards are cleared in both modes, so a rerun without the flag leaves none behind.
    prepare_output(out_dir, overwrite=overwrite, splits=("train", "test", UNSEEN_SPLIT))

    rules = {split: colour_rules(pairs, CLASSES, split) for split in counts}
    tasks = {
        split: [(seed, split, start, min(start + _CHUNK, n), n, size, max_rotation, rules[split], varied_captions,
                 shape_size)
                for start in range(0, n, _CHUNK)]
        for split, n in counts.items()
    }
    workers = _worker_count() if sum(counts.values()) >= _POOL_THRESHOLD else 1
    pool = Pool(workers) if workers > 1 else None
    splits: dict[str, dict] = {}
    try:
        for split, split_tasks in tasks.items():
            chunks = pool.imap(_render_range, split_tasks) if pool else map(_render_range, split_tasks)
            with ShardWriter(out_dir, split, shard_size) as writer:
                for chunk in track(chunks, len(split_tasks), f"rendering {split} ({counts[split]} images)"):
                    for png, mask, label, caption in chunk:
                        index = writer.count
                        fields = sample_fields(png, "png", index=index, label=label, caption=caption,
                                               extras={SEGMENTATION_FIELD: mask})
                        writer.write(sample_key(split, index), fields)
                splits[split] = writer.close()
    finally:
        if pool is not None:
            pool.terminate()
    write_classes(out_dir, CLASSES)
    return write_index(out_dir, classes=list(CLASSES), splits=splits, image_size=size, source="synth", seed=seed,
                       max_rotation=max_rotation, **({"held_out_pairs": pairs} if pairs else {}),
                       **({"varied_captions": True} if varied_captions else {}),
                       **({"shape_size": shape_size} if shape_size else {}))
