"""Turning what the user typed (a directory, a pattern, a tar, an image folder) into a
:class:`DataSource`, the one description the loader and the evaluators work from.

:func:`build_loader`, :class:`Loader` and :class:`StreamOptions` live in :mod:`sslcli.data.loader` and are
re-exported here, so ``from sslcli.data.reader import build_loader`` works.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import braceexpand

from sslcli.data.formats import (
    FORMAT,
    INDEX_NAME,
    class_dirs,
    count_tar_samples,
    scan_image_folder,
    split_dirs,
)
from sslcli.errors import UserError, suggest

_SHARD_NAME = re.compile(r"^(?P<split>.+)-\d+\.tar$")


@dataclass
class DataSource:
    """A resolved split of a dataset.

    ``urls`` are shard paths (``kind="shards"``) or image paths (``kind="folder"``), in
    stream order. ``labels`` is set only for labelled folders (shards carry ``cls`` fields);
    ``classes`` names the labels when known. ``shard_sizes`` gives per-shard sample counts
    when they are known without reading the data (from the index or from counting). ``keep``, when
    set, restricts the split to those sample indices (a label subset or a validation part, see
    :func:`sslcli.data.subset.select_samples`); ``num_samples`` then counts the kept ones.
    """

    spec: str
    split: str
    kind: Literal["shards", "folder"]
    urls: list[str]
    labels: list[int] | None
    classes: list[str] | None
    num_samples: int
    shard_sizes: list[int] | None = field(default=None, repr=False)
    keep: frozenset[int] | None = field(default=None, repr=False)


def read_index(path: Path) -> dict:
    """Reads and checks ``index.json`` (``path`` may be the file or its directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"no {INDEX_NAME} at '{path.parent}'; make one with `sslcli data synth DIR` or `sslcli data shards`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"'{path}' is not a readable JSON index ({err}); regenerate the dataset") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("splits"), dict):
        raise UserError(f"'{path}' is not an {FORMAT} index; regenerate the dataset with this version of sslcli")
    return index


def _unknown_split(split: str, where: str, available: list[str]) -> UserError:
    """The error for a missing split, listing the ones that exist."""
    names = ", ".join(sorted(available)) or "none"
    return UserError(f"no split '{split}' in '{where}'{suggest(split, available)}; available splits: {names}")


def _empty(spec: str, split: str) -> UserError:
    """The error for a source that resolves but holds no samples."""
    return UserError(f"dataset '{spec}' (split '{split}') has 0 samples; point at a dataset that holds images")


def _from_index(directory: Path, spec: str, split: str) -> DataSource:
    """A shard source described by the directory's index.json."""
    index = read_index(directory)
    entry = index["splits"].get(split)
    if entry is None:
        raise _unknown_split(split, spec, list(index["splits"]))
    if not (isinstance(entry, dict) and isinstance(entry.get("shards"), list) and isinstance(entry.get("count"), int)):
        raise UserError(f"split '{split}' in {directory / INDEX_NAME} lacks a shard list or count; regenerate it")
    urls = [str(directory / name) for name in entry["shards"]]
    # Only cheap checks here: the index exists so that big datasets need not be scanned.
    for url in urls:
        path = Path(url)
        if not path.is_file():
            raise UserError(f"shard '{path}' listed in {INDEX_NAME} is missing; regenerate the dataset")
        if path.stat().st_size == 0:
            raise UserError(f"shard '{path}' is empty (0 bytes); regenerate the dataset")
    count = entry["count"]
    if count == 0 or not urls:
        raise _empty(spec, split)
    sizes = entry.get("shard_counts")
    return DataSource(
        spec=spec,
        split=split,
        kind="shards",
        urls=urls,
        labels=None,
        classes=index.get("classes"),
        num_samples=count,
        shard_sizes=list(sizes) if isinstance(sizes, list) and len(sizes) == len(urls) else None,
    )


def _from_tars(paths: list[Path], spec: str, split: str) -> DataSource:
    """A shard source without an index: the shards are counted (and so checked) here."""
    # Counting reads headers only, and it doubles as the integrity check for index-less shards.
    sizes = [count_tar_samples(path) for path in paths]
    if sum(sizes) == 0:
        raise _empty(spec, split)
    return DataSource(
        spec=spec,
        split=split,
        kind="shards",
        urls=[str(path) for path in paths],
        labels=None,
        classes=_sibling_classes(paths),
        num_samples=sum(sizes),
        shard_sizes=sizes,
    )


def _sibling_classes(paths: list[Path]) -> list[str] | None:
    """Class names from an index next to the shards, so a pattern or a single shard of an
    indexed dataset still reports its class names."""
    parents = {path.resolve().parent for path in paths}
    if len(parents) != 1 or not (index_path := parents.pop() / INDEX_NAME).is_file():
        return None
    try:
        return read_index(index_path).get("classes")
    except UserError:  # a broken neighbour index is not this source's problem
        return None


def _tars_for_split(directory: Path, split: str) -> list[Path]:
    """Picks ``{split}-*.tar`` from a directory of shards, or all of them when the names
    carry no split prefixes to choose from."""
    tars = sorted(path for path in directory.glob("*.tar") if path.is_file())
    groups: dict[str, list[Path]] = {}
    for path in tars:
        match = _SHARD_NAME.match(path.name)
        groups.setdefault(match["split"] if match else "", []).append(path)
    if split in groups:
        return groups[split]
    if len(groups) > 1:
        raise _unknown_split(split, str(directory), [name for name in groups if name])
    return tars


def _from_pattern(spec: str, split: str) -> DataSource:
    """Shards named by a brace pattern (``train-{000000..000009}.tar``) or a glob."""
    paths: list[Path] = []
    for piece in braceexpand.braceexpand(spec):
        if glob.has_magic(piece):
            paths.extend(Path(match) for match in sorted(glob.glob(piece)))
        else:
            paths.append(Path(piece).expanduser())
    existing = [path for path in paths if path.is_file()]
    if not existing:
        raise UserError(f"pattern '{spec}' matches no files; check the directory and the {{000000..000009}} range")
    if len(existing) < len(paths):
        missing = next(path for path in paths if not path.is_file())
        raise UserError(f"shard '{missing}' from pattern '{spec}' does not exist; fix the range or regenerate the data")
    return _from_tars(existing, spec, split)


def _from_image_folder(
    directory: Path, spec: str, split: str, classes: list[str] | None = None
) -> DataSource:
    """A folder source; ``classes`` fixes the label order when several splits share it."""
    files, labels, names = scan_image_folder(directory, classes)
    if not files:
        raise UserError(
            f"no images or shards found in '{directory}'; pass a shard directory, a brace pattern, "
            "or a folder of images (make one with `sslcli data synth DIR`)"
        )
    return DataSource(
        spec=spec,
        split=split,
        kind="folder",
        urls=[str(path) for path in files],
        labels=labels,
        classes=names,
        num_samples=len(files),
    )


def resolve_source(spec: str | Path, split: str = "train") -> DataSource:
    """Resolves a data argument into a :class:`DataSource` for ``split``.

    Accepted forms: a directory with ``index.json``; a directory of ``.tar`` shards (the
    ``{split}-*.tar`` ones when present); a brace or glob pattern of shards; a single
    ``.tar``; an ImageFolder tree (class subfolders, optionally under ``train/``, ``test/``,
    ``val/``); a flat folder of images (unlabelled). Problems raise :class:`UserError`.
    """
    text = str(spec)
    if "{" in text or glob.has_magic(text):
        return _from_pattern(text, split)
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(
            f"data path '{text}' does not exist; pass a shard directory, a brace pattern, "
            "or an image folder (make one with `sslcli data synth DIR`)"
        )
    if path.is_file():
        if path.name == INDEX_NAME:
            return _from_index(path.parent, text, split)
        if path.suffix == ".tar":
            return _from_tars([path], text, split)
        raise UserError(f"'{text}' is a file but neither a .tar shard nor {INDEX_NAME}; pass the dataset directory")
    if (path / INDEX_NAME).is_file():
        return _from_index(path, text, split)
    tars = _tars_for_split(path, split)
    if tars:
        return _from_tars(tars, text, split)
    splits = split_dirs(path)
    if splits:
        if split not in splits:
            raise _unknown_split(split, text, list(splits))
        # One class list across splits keeps labels aligned when a split lacks a class.
        classes = sorted({name for directory in splits.values() for name in class_dirs(directory)})
        if (splits[split] / INDEX_NAME).is_file() or _tars_for_split(splits[split], split):
            return replace(resolve_source(splits[split], split), spec=text)
        return _from_image_folder(splits[split], text, split, classes or None)
    return _from_image_folder(path, text, split)


from sslcli.data.loader import Loader, StreamOptions, build_loader, epoch_batches  # noqa: E402  (re-export)

__all__ = ["DataSource", "Loader", "StreamOptions", "build_loader", "epoch_batches", "read_index", "resolve_source"]
