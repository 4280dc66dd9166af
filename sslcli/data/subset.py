"""Class-balanced label subsets (the 1% / 10% semi-supervised protocol of SimCLR v2 and others).

``write_label_subset`` copies a seeded, class-balanced fraction of one split into a new shard
dataset and links the other splits unchanged, so fine-tuning on "1% of the labels" is an ordinary
``--data`` directory that can be kept, shared and reused.  ``select_samples`` gives the same subset
without writing anything: a :class:`DataSource` restricted to the chosen samples (``finetune
--label-fraction``, and its held-out validation part).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from sslcli.data.formats import image_field, iter_tar_samples
from sslcli.data.reader import DataSource, read_index, resolve_source
from sslcli.data.shards import ShardWriter, prepare_output, sample_fields, sample_key, write_index
from sslcli.engine.metrics import track
from sslcli.errors import UserError

# Fields a subset rewrites itself; every other field of a sample is copied as it is.
_OWN_FIELDS = frozenset({"cls", "txt", "idx", "src_idx"})


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of ``round(fraction * n_c)`` (at least 1) samples of each class ``c``.

    Each class draws from its own seeded permutation, so the subset is reproducible and a smaller
    fraction with the same seed is a subset of a larger one.
    """
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction must be in (0, 1], got {fraction}; e.g. 0.01 for 1% of the labels")
    labels = np.asarray(labels)
    if labels.size == 0 or (labels < 0).any():
        raise UserError("a class-balanced subset needs labels on every sample; this split is (partly) unlabelled")
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = np.random.default_rng([seed, int(c)]).permutation(members.size)
        take = max(1, round(fraction * members.size))
        chosen.append(members[order[:take]])
    return np.sort(np.concatenate(chosen))


def split_labels(source: DataSource) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, labels)`` of ``source``'s samples (only ``source.keep``'s) in stream order, read without
    decoding an image.  An index is the loader's: the sample's ``idx`` field, else its position in the split;
    an unlabelled sample has label -1.  ``balanced_subset(labels, ...)`` positions index into both arrays.
    """
    pairs: list[tuple[int, int]] = []
    if source.kind == "folder":
        if source.labels is None:
            raise UserError(f"'{source.spec}' has no class subfolders, so it has no labels to subset")
        pairs = list(enumerate(source.labels))
    else:
        offset = 0  # the loader numbers idx-less samples by position, counting shards in listed order
        for url in source.urls:
            count = 0
            for count, (_, fields) in enumerate(iter_tar_samples(Path(url)), start=1):
                label = fields.get("cls", b"-1").decode(errors="replace").strip()
                try:
                    index = int(fields["idx"]) if "idx" in fields else offset + count - 1
                except ValueError:
                    raise UserError(f"a sample of '{url}' has a non-integer 'idx' field; regenerate the shard") from None
                pairs.append((index, int(label) if label.lstrip("-").isdigit() else -1))
            offset += count
    if source.keep is not None:
        pairs = [pair for pair in pairs if pair[0] in source.keep]
    indices, labels = zip(*pairs, strict=True) if pairs else ((), ())
    return np.asarray(indices, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def select_samples(source: DataSource, indices: Iterable[int]) -> DataSource:
    """``source`` restricted to the samples with these loader indices (from :func:`split_labels`)."""
    keep = frozenset(int(i) for i in indices)
    if not keep:
        raise UserError(f"no samples selected from split '{source.split}' of '{source.spec}'")
    return replace(source, keep=keep, num_samples=len(keep))


def _samples(source: DataSource) -> Iterator[tuple[int, dict[str, bytes]]]:
    """(label, fields) of every sample of ``source`` in stream order."""
    if source.kind == "folder":
        assert source.labels is not None
        for url, label in zip(source.urls, source.labels, strict=True):
            path = Path(url)
            yield label, {path.suffix.lstrip(".").lower(): path.read_bytes(), "cls": str(label).encode()}
        return
    for url in source.urls:
        for _, fields in iter_tar_samples(Path(url)):
            label = fields.get("cls", b"-1").decode().strip()
            yield int(label) if label.lstrip("-").isdigit() else -1, fields


def _link(src: Path, dst: Path) -> None:
    """A hard link where the filesystem allows one (no extra disk), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_label_subset(data: str | Path, out: Path, *, fraction: float, seed: int = 0, split: str = "train",
                       shard_size: int = 2000, overwrite: bool = False) -> dict:
    """Writes ``out`` holding a class-balanced ``fraction`` of ``data``'s ``split``; returns its index.

    Samples keep every field (image, ``cls``, ``txt``, extras such as ``seg.png``) and get new consecutive ``idx`` values; the
    original index is kept as ``src_idx``.  The dataset's other splits are linked into ``out``.
    """
    source = resolve_source(data, split)
    labels = np.array([label for label, _ in _samples_labels_only(source)])
    keep = set(balanced_subset(labels, fraction, seed).tolist())
    index = read_index(Path(data)) if Path(data, "index.json").is_file() else {"classes": source.classes, "splits": {}}
    others = {name: entry for name, entry in index["splits"].items() if name != split}
    prepare_output(out, overwrite=overwrite, splits=[split, *others])
    splits: dict[str, dict] = {}
    with ShardWriter(out, split, shard_size) as writer:
        position = 0
        for i, (label, fields) in enumerate(track(_samples(source), source.num_samples, f"writing {split} subset")):
            if i not in keep:
                continue
            image_ext = image_field(fields) or next(ext for ext in fields if ext not in _OWN_FIELDS)
            caption = fields["txt"].decode() if "txt" in fields else None
            # Extra per-sample fields (seg.png, depth.png, ...) travel with the image.
            extras = {name: data for name, data in fields.items() if name != image_ext and name not in _OWN_FIELDS}
            new = sample_fields(fields[image_ext], image_ext, index=position, label=label, caption=caption,
                                extras=extras)
            writer.write(sample_key(split, position), {**new, "src_idx": fields.get("idx", str(i).encode())})
            position += 1
        splits[split] = writer.close()
    for name, entry in others.items():
        for shard in entry["shards"]:
            _link(Path(data) / shard, out / shard)
        splits[name] = entry
    return write_index(out, classes=index.get("classes"), splits=splits, source=str(data), subset_of=split,
                       fraction=fraction, seed=seed, image_size=index.get("image_size"))


def _samples_labels_only(source: DataSource) -> Iterator[tuple[int, None]]:
    """(label, None) per sample: the first pass only needs labels."""
    if source.kind == "folder":
        if source.labels is None:
            raise UserError(f"'{source.spec}' has no class subfolders, so it has no labels to subset")
        yield from ((label, None) for label in source.labels)
        return
    for label, _ in _samples(source):
        yield label, None
