"""Batches for training and evaluation, with exact and identical epoch lengths on every rank.

All ranks and all DataLoader workers walk the same global sample stream (the same shard
order and the same shuffle buffer, both seeded by ``(seed, epoch)``) and each keeps only its
own positions: stream position ``i`` belongs to rank ``i % world_size``, and within a rank
batch ``b`` belongs to worker ``b % num_workers``. Only the kept samples are decoded, so
the duplicated work is reading bytes, not decoding images. Because every consumer knows
its quota in advance, ``len(loader)`` is exact and equal across ranks; an undecodable
image is replaced by the previous good one of the same consumer so the quota still holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sslcli.data.formats import count_tar_samples, decode_field, decode_rgb, image_field, iter_tar_samples
from sslcli.errors import UserError

if TYPE_CHECKING:
    from sslcli.data.reader import DataSource

logger = logging.getLogger(__name__)

SHUFFLE_BUFFER = 2000
Transform = Callable[[Image.Image], "torch.Tensor | list[torch.Tensor]"]
_REPORTED_NAMES = 5


class _Record(NamedTuple):
    """One undecoded sample as it comes off the stream."""

    index: int  # stable index within the split (memory banks key on it)
    label: int  # -1 when unlabelled
    text: str
    image: bytes | str  # image bytes from a shard, or a file path for folders
    origin: str  # "shard.tar:key" or the file path, for skip reports
    extras: dict[str, bytes] | None = None  # the transform's extra fields (e.g. depth.png), shards only


@dataclass
class _Failure:
    """A UserError raised inside a worker, carried to the main process as a value so it
    arrives as one line instead of DataLoader's re-raised traceback text."""

    message: str


def _parse_int(fields: dict[str, bytes], name: str, origin: str) -> int | None:
    """An ASCII integer field (``cls``, ``idx``), None when absent."""
    raw = fields.get(name)
    if raw is None:
        return None
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        message = f"sample '{origin}' has a non-integer '{name}' field {raw[:20]!r}; regenerate the shard"
        raise UserError(message) from None


def _shuffled(records: Iterator[_Record], rng: np.random.Generator, capacity: int) -> Iterator[_Record]:
    """Streaming shuffle: keep ``capacity`` records, emit a random one as each new one arrives."""
    buffer: list[_Record] = []
    for record in records:
        if len(buffer) < capacity:
            buffer.append(record)
            continue
        slot = int(rng.integers(capacity))
        yield buffer[slot]
        buffer[slot] = record
    rng.shuffle(buffer)  # type: ignore[arg-type]  # numpy shuffles lists in place
    yield from buffer


def _collate(outputs: list[Any], records: list[_Record]) -> dict[str, Any]:
    """Stacks transform outputs (one tensor, or one tensor per view) and the metadata."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        batch: dict[str, Any] = {"image": torch.stack(outputs)}
    elif isinstance(first, (list, tuple)):
        batch = {"views": [torch.stack([views[v] for views in outputs]) for v in range(len(first))]}
    else:
        raise TypeError(f"the transform must return a tensor or a list of tensors, got {type(first).__name__}")
    batch["label"] = torch.tensor([record.label for record in records], dtype=torch.long)
    batch["index"] = torch.tensor([record.index for record in records], dtype=torch.long)
    batch["text"] = [record.text for record in records]
    return batch


class _BatchStream(IterableDataset):
    """Yields ``(batch, skipped_origins)`` for this rank and worker, or a :class:`_Failure`."""

    def __init__(
        self,
        source: DataSource,
        transform: Transform,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        rank: int,
        world_size: int,
    ) -> None:
        self.source = source
        self.transform = transform
        # A transform with ``extra_fields`` (field -> channels, e.g. MultiView's) is called as
        # transform(image, {field: [C, H, W] tensor in [0, 1]}); shards must carry those fields.
        self.extra_fields: dict[str, int] = dict(getattr(transform, "extra_fields", None) or {})
        if self.extra_fields and source.kind != "shards":
            raise UserError(f"extra views ({', '.join(self.extra_fields)}) are read from shard fields, but "
                            f"'{source.spec}' is an image folder; write shards whose samples carry them, or "
                            f"train without them: --set 'method_args.extra_views={{}}'")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed % 2**63  # numpy seed sequences take non-negative integers only
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.quota = source.num_samples // world_size
        self.batches = self.quota // batch_size if drop_last else -(-self.quota // batch_size)
        self._offsets: list[int] | None = None

    def _rng(self, purpose: int) -> np.random.Generator:
        """A generator every rank and worker derives identically for this epoch."""
        return np.random.default_rng([self.seed, self.epoch, purpose])

    def _shard_offsets(self) -> list[int]:
        """Index of each shard's first sample, for samples that carry no ``idx`` field."""
        if self._offsets is None:
            sizes = self.source.shard_sizes or [count_tar_samples(Path(url)) for url in self.source.urls]
            self._offsets = [int(total) for total in np.cumsum([0, *sizes[:-1]])]
        return self._offsets

    def _shard_records(self, order: list[int]) -> Iterator[_Record]:
        """Records of the shards in ``order``, members in tar order."""
        for shard in order:
            url = self.source.urls[shard]
            for ordinal, (key, fields) in enumerate(iter_tar_samples(Path(url))):
                origin = f"{url}:{key}"
                index = _parse_int(fields, "idx", origin)
                if index is None:
                    index = self._shard_offsets()[shard] + ordinal
                label = _parse_int(fields, "cls", origin)
                text = fields.get("txt", b"").decode("utf-8", errors="replace")
                image = fields[image_field(fields) or ""]
                extras = None
                if self.extra_fields:
                    missing = [name for name in self.extra_fields if name not in fields]
                    if missing:
                        raise UserError(f"sample '{origin}' has no '{missing[0]}' field, which the method takes as "
                                        f"an extra view; every sample needs {', '.join(self.extra_fields)} "
                                        f"(or train without them: --set 'method_args.extra_views={{}}')")
                    extras = {name: fields[name] for name in self.extra_fields}
                yield _Record(index, -1 if label is None else label, text, image, origin, extras)

    def _records(self) -> Iterator[_Record]:
        """The global stream every rank and worker agrees on for this epoch, ``source.keep``'s samples only
        for a subset (filtered before positions are dealt out, so quotas stay exact)."""
        keep = self.source.keep
        records = self._split_records()
        yield from records if keep is None else (record for record in records if record.index in keep)

    def _split_records(self) -> Iterator[_Record]:
        """Every record of the split, in this epoch's order."""
        count = len(self.source.urls)
        order = self._rng(0).permutation(count).tolist() if self.shuffle else list(range(count))
        if self.source.kind == "folder":
            labels = self.source.labels
            for i in order:
                url = self.source.urls[i]
                yield _Record(i, -1 if labels is None else labels[i], "", url, url)
            return
        records = self._shard_records(order)
        yield from _shuffled(records, self._rng(1), SHUFFLE_BUFFER) if self.shuffle else records

    def _load(self, record: _Record) -> tuple[Any, ...] | None:
        """The transform's inputs: ``(RGB image,)`` or ``(RGB image, extras)``; None when any does not decode."""
        if isinstance(record.image, bytes):
            image = decode_rgb(record.image)
        else:
            try:
                image = decode_rgb(Path(record.image).read_bytes())
            except OSError:  # a file deleted or unreadable since listing counts as undecodable
                image = None
        if image is None or not self.extra_fields:
            return None if image is None else (image,)
        extras = {}
        for name, channels in self.extra_fields.items():
            array = decode_field((record.extras or {})[name], channels)
            if array is None:
                return None
            extras[name] = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        return image, extras

    def _batches(self) -> Iterator[tuple[dict[str, Any], list[str]]]:
        """This consumer's batches, each with the origins of the images replaced in it."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        pending_sizes = [
            min(self.batch_size, self.quota - b * self.batch_size) for b in range(worker, self.batches, workers)
        ]
        needed = sum(pending_sizes)
        outputs: list[Any] = []
        records: list[_Record] = []
        skipped: list[str] = []
        last_good: tuple[tuple[Any, ...], _Record] | None = None
        waiting = 0  # failures seen before any good image: they take the next good one
        if not pending_sizes:
            return
        for position, record in enumerate(self._records()):
            if position % self.world_size != self.rank:
                continue
            batch = (position // self.world_size) // self.batch_size
            if batch % workers != worker:
                continue
            inputs = self._load(record)
            if inputs is None:
                skipped.append(record.origin)
                if last_good is None:
                    waiting += 1
                    continue
                inputs, record = last_good
            else:
                last_good = (inputs, record)
            for _ in range(waiting + 1):
                outputs.append(self.transform(*inputs))
                records.append(record)
            waiting = 0
            while pending_sizes and len(outputs) >= pending_sizes[0]:
                size = pending_sizes.pop(0)
                yield _collate(outputs[:size], records[:size]), skipped
                outputs, records, skipped = outputs[size:], records[size:], []
            if not pending_sizes:
                return  # the rest of the stream belongs to other workers or ranks
        if pending_sizes:
            if last_good is None and waiting:
                raise UserError(f"none of the images read from '{self.source.spec}' decode; check the data")
            delivered = needed - sum(pending_sizes) + len(outputs)
            raise UserError(
                f"'{self.source.spec}' ran out of samples ({delivered} of {needed} for this process; "
                f"{self.source.num_samples} expected); the shards changed after indexing, regenerate the dataset"
            )

    def __iter__(self) -> Iterator[tuple[dict[str, Any], list[str]] | _Failure]:
        """Runs in each DataLoader worker (or in-process without workers)."""
        try:
            yield from self._batches()
        except UserError as err:
            yield _Failure(str(err))


class Loader:
    """Iterable over batch dicts (``image`` or ``views``, ``label``, ``index``, ``text``).

    ``len(loader)`` is the exact number of batches per epoch, the same on every rank. Call
    :meth:`set_epoch` before each epoch to change the shuffle; ``skipped`` counts images
    replaced because they did not decode, for the epoch being iterated.
    """

    def __init__(self, stream: _BatchStream, num_workers: int) -> None:
        self._stream = stream
        self.num_workers = min(num_workers, stream.batches)
        self.skipped = 0

    @property
    def source(self) -> DataSource:
        return self._stream.source

    @property
    def epoch(self) -> int:
        return self._stream.epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        return min(self._stream.quota, self._stream.batches * self._stream.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Selects the shard order and shuffle of ``epoch`` for the next iteration."""
        self._stream.epoch = epoch

    def __len__(self) -> int:
        return self._stream.batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.skipped = 0
        skipped_names: list[str] = []
        if self.num_workers > 0:
            items: Any = DataLoader(self._stream, batch_size=None, num_workers=self.num_workers)
        else:
            items = iter(self._stream)
        for item in items:
            if isinstance(item, _Failure):
                raise UserError(item.message)
            batch, skipped = item
            self.skipped += len(skipped)
            skipped_names.extend(skipped[: _REPORTED_NAMES - len(skipped_names)])
            yield batch
        if self.skipped:
            logger.warning(
                "skipped %d undecodable image(s) in epoch %d of '%s' (each replaced by a good neighbour), e.g. %s",
                self.skipped,
                self.epoch,
                self.source.spec,
                ", ".join(skipped_names),
            )


def build_loader(
    source: DataSource,
    transform: Transform,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Loader:
    """A :class:`Loader` over ``source`` for one rank of ``world_size``.

    Each rank gets exactly ``num_samples // world_size`` samples per epoch. ``shuffle=False``
    keeps stream order (shards as listed, members in tar order), which evaluation uses
    with ``drop_last=False`` to see every sample once.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise UserError(f"number of workers must be 0 or more, got {num_workers}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within world size {world_size}")
    if source.num_samples < world_size:
        raise UserError(f"'{source.spec}' has {source.num_samples} samples, fewer than the {world_size} processes")
    stream = _BatchStream(
        source,
        transform,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
    )
    if stream.batches == 0:
        raise UserError(
            f"batch size {batch_size} exceeds the {stream.quota} samples per process of '{source.spec}'; "
            "lower --batch-size or use more data"
        )
    stream.epoch = epoch
    return Loader(stream, num_workers)
