"""Image-text options of the embedded dataset: held-out colour-shape pairs, varied captions, ``classes.txt``.

With ``sslcli data synth --hold-out-pairs`` every shape class gets one foreground colour that the
train and test splits never show it in; a third split, ``unseen``, shows only those pairs. A
CLIP model trained on the captions has then seen every colour word and every shape word, but never
these combinations, which is what compositional zero-shot evaluation needs.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sslcli.atomic import atomic_path
from sslcli.errors import UserError

UNSEEN_SPLIT = "unseen"
CLASSES_NAME = "classes.txt"
DEFAULT_UNSEEN = 1000
# (fixed shape colour, forbidden shape colour) for one class in one split; (None, None) is unconstrained.
ColourRule = tuple[str | None, str | None]


def check_hold_out_args(hold_out_pairs: bool, unseen: int | None) -> int:
    """The unseen split's size, after checking the options; ``unseen`` None means not given.

    Given without the flag it would silently do nothing, which hides a forgotten flag.
    """
    if unseen is not None and not hold_out_pairs:
        raise UserError(f"--unseen {unseen} needs --hold-out-pairs; add the flag or drop --unseen")
    count = DEFAULT_UNSEEN if unseen is None else unseen
    if count < 1:
        raise UserError(f"--unseen must be at least 1, got {count}")
    return count


def held_out_colours(seed: int, classes: Sequence[str], colours: Sequence[str]) -> dict[str, str]:
    """Class name -> its held-out foreground colour: distinct colours, a pure function of the seed.

    Distinct colours keep every colour word in the training captions for all but one class, so
    no colour is unseen as a word, only as a combination.
    """
    if len(colours) < len(classes):
        raise UserError(f"cannot hold out a distinct colour for each of {len(classes)} classes "
                        f"with {len(colours)} colours")
    # A stream of its own, so it cannot collide with any split's (seed, crc32(split), index) streams.
    rng = np.random.default_rng([seed, zlib.crc32(b"held-out pairs")])
    order = rng.permutation(len(colours))
    return {name: colours[int(order[i])] for i, name in enumerate(classes)}


def hold_out_plan(
    hold_out_pairs: bool, unseen: int, seed: int, classes: Sequence[str], colours: Sequence[str]
) -> tuple[dict[str, str], dict[str, int]]:
    """(class -> held-out colour, extra split counts): ``({}, {})`` without ``hold_out_pairs``."""
    if not hold_out_pairs:
        return {}, {}
    return held_out_colours(seed, classes, colours), {UNSEEN_SPLIT: check_hold_out_args(True, unseen)}


def colour_rules(pairs: dict[str, str], classes: Sequence[str], split: str) -> tuple[ColourRule, ...] | None:
    """Each label's colour rule in ``split``: the unseen split shows only the held-out colour, the
    others never do; None when nothing is held out."""
    if not pairs:
        return None
    if split == UNSEEN_SPLIT:
        return tuple((pairs[name], None) for name in classes)
    return tuple((None, pairs[name]) for name in classes)


def caption_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """A sample's caption choices: a stream of their own, so varying captions leaves every image unchanged."""
    return np.random.default_rng([seed, zlib.crc32(f"{split}/caption".encode()), index])


def varied_caption(rng: np.random.Generator, count: str, size: str, colour: str, noun: str, background: str) -> str:
    """The shape (with its count) always; its size, its colour and the background each with probability 1/2.

    Full captions almost never match two images of one batch except by shape, so a contrastive image-text
    model can tell them apart from colour and background alone and learns little shape; short captions
    ("two stars") can only be matched by shape, as web captions of varying detail force CLIP to.
    """
    size_word, colour_word, on_background = (rng.random(3) < 0.5).tolist()
    words = [count, size if size_word else "", colour if colour_word else "", noun]
    text = " ".join(word for word in words if word)
    return f"{text} on {background}" if on_background else text


def write_classes(out_dir: Path, classes: Sequence[str]) -> Path:
    """Writes ``classes.txt`` (one name per line, in label order) and returns its path.

    Written whole under a temporary name, so an interrupted run cannot leave a short label
    list that a zero-shot run would silently misalign with the labels.
    """
    path = Path(out_dir) / CLASSES_NAME
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{name}\n" for name in classes))
    return path
