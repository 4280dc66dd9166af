"""Writing the shard format: WebDataset tars plus an ``index.json`` that lists them.

Each sample is a group of tar members sharing a key (``train_00000042``): the image bytes
under their extension, ``cls`` (class index, ASCII), ``txt`` (caption) and ``idx`` (the
sample's stable index within its split, used by memory-bank methods).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from sslcli.data.formats import (
    FORMAT,
    INDEX_NAME,
    class_dirs,
    decode_rgb,
    scan_image_folder,
    split_dirs,
)
from sslcli.atomic import atomic_path
from sslcli.engine.metrics import track
from sslcli.errors import UserError

# Fixed metadata so the same samples always produce byte-identical tars.
_MTIME = 946684800  # 2000-01-01, any constant works; 0 upsets some tar tools
_MODE = 0o644


def sample_key(split: str, index: int) -> str:
    """The tar key of sample ``index`` of ``split``, e.g. ``train_00000042``."""
    return f"{split}_{index:08d}"


def shard_name(split: str, number: int) -> str:
    """The file name of shard ``number`` of ``split``, e.g. ``train-000003.tar``."""
    return f"{split}-{number:06d}.tar"


def sample_fields(
    image: bytes, ext: str, *, index: int, label: int | None = None, caption: str | None = None,
    extras: Mapping[str, bytes] | None = None,
) -> dict[str, bytes]:
    """The tar members of one sample, keyed by extension, in a fixed order.

    ``extras`` are further per-sample fields (e.g. ``{"seg.png": ...}``), written after the image.
    """
    fields = {ext: image, **(extras or {})}
    if label is not None:
        fields["cls"] = str(label).encode()
    if caption is not None:
        fields["txt"] = caption.encode()
    fields["idx"] = str(index).encode()
    return fields


class ShardWriter:
    """Streams samples into ``{split}-000000.tar``, ``{split}-000001.tar``, ... of ``shard_size`` samples.

    Each shard is written under a temporary name and renamed when complete, so an
    interrupted run never leaves a plausible-looking partial shard behind.
    """

    def __init__(self, out_dir: Path, split: str, shard_size: int) -> None:
        if shard_size < 1:
            raise UserError(f"shard size must be at least 1, got {shard_size}; pass --shard-size 1000")
        self.out_dir = out_dir
        self.split = split
        self.shard_size = shard_size
        self.shards: list[str] = []
        self.shard_counts: list[int] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """Appends one sample; ``fields`` maps extension to bytes."""
        if self._tar is None or self._in_shard == self.shard_size:
            self._open_next()
        assert self._tar is not None
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = _MTIME
            info.mode = _MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        self.count += 1

    def _open_next(self) -> None:
        """Closes the current shard (if any) and starts the next one."""
        self._finish_current()
        name = shard_name(self.split, len(self.shards))
        self.shards.append(name)
        self._tar = tarfile.open(self.out_dir / f"{name}.partial", mode="w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def _finish_current(self) -> None:
        """Closes the open shard and moves it to its final name."""
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        name = self.shards[-1]
        os.replace(self.out_dir / f"{name}.partial", self.out_dir / name)
        self.shard_counts.append(self._in_shard)

    def close(self) -> dict[str, Any]:
        """Finishes the last shard and returns the split's index entry."""
        self._finish_current()
        return {"count": self.count, "shards": list(self.shards), "shard_counts": list(self.shard_counts)}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()
            (self.out_dir / f"{self.shards[-1]}.partial").unlink(missing_ok=True)


def write_index(out_dir: Path, *, classes: list[str] | None, splits: dict[str, dict], **extra: Any) -> dict:
    """Writes ``out_dir/index.json`` and returns its content.

    ``splits`` maps split name to ``{"count": N, "shards": [names relative to out_dir], ...}``;
    ``extra`` adds top-level fields such as ``image_size``, ``source`` and ``seed``.
    """
    index = {"format": FORMAT, "classes": None if classes is None else list(classes), "splits": splits, **extra}
    with atomic_path(Path(out_dir) / INDEX_NAME) as tmp:
        tmp.write_text(json.dumps(index, indent=2) + "\n")
    return index


def prepare_output(out_dir: Path, *, overwrite: bool, splits: Iterable[str]) -> None:
    """Creates ``out_dir``, refusing to clobber an existing dataset unless ``overwrite``.

    With ``overwrite`` the old index and the shards of the splits about to be written are
    removed first, so a smaller rerun cannot leave stale shards that a directory scan would
    pick up.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output '{out_dir}' is a file; pass a directory path")
    index_path = out_dir / INDEX_NAME
    # Shards without an index (an interrupted run, or someone else's data) are protected too.
    existing = sorted(path for split in splits for path in out_dir.glob(f"{split}-*.tar"))
    if index_path.exists() or existing:
        if not overwrite:
            found = INDEX_NAME if index_path.exists() else existing[0].name
            raise UserError(f"'{out_dir}' already holds a dataset ({found}); pass --overwrite or another directory")
        index_path.unlink(missing_ok=True)
        for stale in existing:
            stale.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _uniform_size(sizes: set[tuple[int, int]]) -> int | None:
    """The side length when every image is the same square size, else None."""
    if len(sizes) == 1:
        width, height = next(iter(sizes))
        if width == height:
            return width
    return None


def folder_to_shards(
    src: Path, out: Path, *, shard_size: int = 1000, split: str = "train", overwrite: bool = False
) -> dict:
    """Converts an ImageFolder tree or a flat image folder into shards plus ``index.json``.

    When ``src`` has ``train/``, ``test/`` or ``val/`` subfolders each becomes its own split
    (and ``split`` is ignored); otherwise all of ``src`` becomes ``split``. Original image
    bytes are kept; files that do not decode are skipped and counted. Returns the index
    with ``skipped`` (total) added.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UserError(f"source '{src}' is not a directory; pass an ImageFolder tree or a folder of images")
    if shard_size < 1:
        raise UserError(f"shard size must be at least 1, got {shard_size}; pass --shard-size 1000")
    sources = split_dirs(src) or {split: src}
    # One class list for all splits, so a class missing from test/ cannot shift test labels.
    class_names = sorted({name for directory in sources.values() for name in class_dirs(directory)})
    listings = {name: scan_image_folder(directory, class_names or None) for name, directory in sources.items()}
    if sum(len(files) for files, _, _ in listings.values()) == 0:
        raise UserError(f"no images found in '{src}'; expected class subfolders of images or image files")
    if class_names and any(labels is None and files for files, labels, _ in listings.values()):
        raise UserError(f"'{src}' mixes labelled (class subfolders) and unlabelled splits; convert them separately")
    listings = {name: listing for name, listing in listings.items() if listing[0]}

    prepare_output(out, overwrite=overwrite, splits=listings)
    split_entries: dict[str, dict] = {}
    sizes: set[tuple[int, int]] = set()
    skipped_total = 0
    for split_name, (files, labels, _) in listings.items():
        skipped = 0
        with ShardWriter(out, split_name, shard_size) as writer:
            for position, path in enumerate(track(files, len(files), f"writing {split_name} shards")):
                data = path.read_bytes()
                image = decode_rgb(data)
                if image is None:
                    skipped += 1
                    continue
                sizes.add(image.size)
                label = None if labels is None else labels[position]
                fields = sample_fields(data, path.suffix[1:].lower(), index=writer.count, label=label)
                writer.write(sample_key(split_name, writer.count), fields)
            entry = writer.close()
        if entry["count"] == 0:
            raise UserError(f"none of the {len(files)} images for split '{split_name}' in '{src}' could be decoded")
        split_entries[split_name] = {**entry, "skipped": skipped}
        skipped_total += skipped
    return write_index(
        out,
        classes=class_names or None,
        splits=split_entries,
        image_size=_uniform_size(sizes),
        source="folder",
        skipped=skipped_total,
    )
