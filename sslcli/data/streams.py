"""Which undecoded samples each consumer turns into which batches, in the three split modes.

A *consumer* is one rank, or one DataLoader worker of a rank. A rank's batch ``b`` is made by its
consumer with ``role == b % roles`` (``roles`` is the rank's worker count, 1 without workers), so the
round-robin order in which DataLoader collects from its workers is batch order.

- ``sample``: every consumer walks the same global stream (seeded shard order and shuffle buffer) and
  keeps its positions: position ``i`` goes to rank ``i % world_size``. Exact, independent of the worker
  count, but every consumer reads every byte.
- ``shard``: a seeded shuffle of the shard list is dealt out to the ``world_size * roles`` consumers;
  each reads only its shards, shuffled through its own buffer. A consumer whose shards run short goes on
  into further shards (a seeded order of all of them, again and again), so every rank still makes its
  quota and no rank waits on another.
- ``resampled``: each consumer draws shards with replacement, an endless stream; an epoch is a fixed
  number of samples.

Skipped batches (``start_batch``) are read but never decoded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

from sslcli.data.formats import count_tar_samples, image_field, iter_tar_samples
from sslcli.errors import UserError

if TYPE_CHECKING:
    from sslcli.data.reader import DataSource

logger = logging.getLogger(__name__)

Mode = Literal["sample", "shard", "resampled"]
SplitBy = Literal["auto", "shard", "sample"]
# ``auto`` splits by shard from this many shards per consumer: fewer (the embedded dataset's 5) would give
# each consumer a narrow, unbalanced slice of the data for little saving in reading.
SHARDS_PER_CONSUMER = 4
# Seed-sequence purposes, so that no two random draws of an epoch share a stream.
_ORDER, _BUFFER, _CONSUMER_BUFFER, _WRAP_ORDER, _WRAP_BUFFER, _RESAMPLE = range(6)


class Record(NamedTuple):
    """One undecoded sample as it comes off the stream; ``image`` None marks a sample lost to a damaged shard."""

    index: int  # stable index within the split (memory banks key on it)
    label: int  # -1 when unlabelled
    text: str
    image: bytes | str | None  # image bytes from a shard, or a file path for folders
    origin: str  # "shard.tar:key" or the file path, for skip reports
    extras: dict[str, bytes] | None = None  # the transform's extra fields (e.g. depth.png), shards only


def choose_mode(split_by: SplitBy, resampled: bool, source: DataSource, *, shuffle: bool, consumers: int) -> Mode:
    """The split mode for this loader (see the module docstring); forcing one that cannot apply is a UserError."""
    if resampled or split_by == "shard":
        wanted = "--resampled" if resampled else "--split-by shard"
        if source.kind != "shards":
            raise UserError(f"{wanted} needs a shard dataset, but '{source.spec}' is an image folder; convert it "
                            "with `sslcli data shards`, or drop the option")
        if resampled and split_by == "sample":
            raise UserError("--resampled draws whole shards, which --split-by sample contradicts; drop one of them")
        return "resampled" if resampled else "shard"
    if split_by == "sample" or source.kind != "shards" or not shuffle or consumers == 1:
        return "sample"
    return "shard" if len(source.urls) >= SHARDS_PER_CONSUMER * consumers else "sample"


@dataclass
class Plan:
    """One rank's epoch: ``batches`` batches holding ``quota`` samples, cut from the records of ``source``."""

    source: DataSource
    mode: Mode
    seed: int
    shuffle: bool
    shuffle_buffer: int
    batch_size: int
    quota: int
    batches: int
    extra_fields: dict[str, int]
    epoch: int = 0
    _offsets: list[int] | None = field(default=None, repr=False)

    def rng(self, *purpose: int) -> np.random.Generator:
        """A generator every rank and worker derives identically for this epoch and purpose."""
        return np.random.default_rng([self.seed, self.epoch, *purpose])

    def batch_size_of(self, batch: int) -> int:
        return min(self.batch_size, self.quota - batch * self.batch_size)

    def groups(self, rank: int, world_size: int, role: int, roles: int,
               start: int) -> Iterator[tuple[int, list[Record]]]:
        """``(batch, records)`` for this consumer's batches from ``start`` on, in order."""
        mine = [b for b in range(self.batches) if b % roles == role]
        if self.mode == "sample":
            yield from self._sample_groups(rank, world_size, roles, [b for b in mine if b >= start])
            return
        consumer = rank * roles + role
        stream = self._shard_records(consumer, world_size * roles) if self.mode == "shard" \
            else self._resampled_records(consumer)
        for b in mine:
            records = [next(stream) for _ in range(self.batch_size_of(b))]
            if b >= start:
                yield b, records

    # --- the global stream (sample mode) -----------------------------------------------------------------

    def _sample_groups(self, rank: int, world_size: int, roles: int,
                       wanted: list[int]) -> Iterator[tuple[int, list[Record]]]:
        if not wanted:
            return
        pending: dict[int, list[Record]] = {b: [] for b in wanted}
        last = wanted[-1]
        for position, record in enumerate(self._global_records()):
            if position % world_size != rank:
                continue
            batch = (position // world_size) // self.batch_size
            if batch > last:
                break
            if batch not in pending:
                continue
            pending[batch].append(record)
            if len(pending[batch]) == self.batch_size_of(batch):
                yield batch, pending.pop(batch)
                if not pending:
                    return
        short = sum(self.batch_size_of(b) - len(records) for b, records in pending.items())
        raise UserError(f"'{self.source.spec}' ran out of samples ({short} short for this process; "
                        f"{self.source.num_samples} expected); the shards changed after indexing, "
                        "regenerate the dataset")

    def _global_records(self) -> Iterator[Record]:
        """Every kept record of the split, in this epoch's order."""
        urls = self.source.urls
        order = self.rng(_ORDER).permutation(len(urls)).tolist() if self.shuffle else list(range(len(urls)))
        if self.source.kind == "folder":
            labels, keep = self.source.labels, self.source.keep
            for i in order:
                if keep is None or i in keep:
                    yield Record(i, -1 if labels is None else labels[i], "", urls[i], urls[i])
            return
        records = (record for shard in order for record in self._read_shard(shard))
        yield from self._shuffled(records, self.rng(_BUFFER)) if self.shuffle else records

    # --- whole shards per consumer (shard and resampled modes) --------------------------------------------

    def _shard_records(self, consumer: int, consumers: int) -> Iterator[Record]:
        """This consumer's dealt shards, then (only if they run short) further shards in seeded orders."""
        shards = len(self.source.urls)
        order = self.rng(_ORDER).permutation(shards).tolist() if self.shuffle else list(range(shards))
        own = (record for shard in order[consumer::consumers] for record in self._read_shard(shard))
        # Shuffled on their own, so that no wrap-around sample displaces one of the consumer's own.
        yield from self._shuffled(own, self.rng(_CONSUMER_BUFFER, consumer)) if self.shuffle else own
        for cycle in count():
            wrap_rng = self.rng(_WRAP_ORDER, consumer, cycle)
            wrap_order = wrap_rng.permutation(shards).tolist() if self.shuffle else list(range(shards))
            more = (record for shard in wrap_order for record in self._read_shard(shard))
            found = 0
            for record in self._shuffled(more, self.rng(_WRAP_BUFFER, consumer, cycle)) if self.shuffle else more:
                found += 1
                yield record
            if not found:
                raise UserError(f"'{self.source.spec}' yields no samples; check the data")

    def _resampled_records(self, consumer: int) -> Iterator[Record]:
        """Shards drawn with replacement, endlessly, through one shuffle buffer."""
        draw = self.rng(_RESAMPLE, consumer)
        shards = len(self.source.urls)

        def endless() -> Iterator[Record]:
            empty_run = 0
            while True:
                found = 0
                for record in self._read_shard(int(draw.integers(shards))):
                    found += 1
                    yield record
                empty_run = 0 if found else empty_run + 1
                if empty_run > 10 * shards:  # every shard drawn many times over and none had a sample
                    raise UserError(f"'{self.source.spec}' yields no samples; check the data")

        yield from self._shuffled(endless(), self.rng(_BUFFER, consumer)) if self.shuffle else endless()

    # --- reading ------------------------------------------------------------------------------------------

    def _shuffled(self, records: Iterator[Record], rng: np.random.Generator) -> Iterator[Record]:
        """Streaming shuffle: keep ``shuffle_buffer`` records, emit a random one as each new one arrives."""
        capacity = self.shuffle_buffer
        buffer: list[Record] = []
        for record in records:
            if len(buffer) < capacity:
                buffer.append(record)
                continue
            slot = int(rng.integers(capacity))
            yield buffer[slot]
            buffer[slot] = record
        rng.shuffle(buffer)  # type: ignore[arg-type]  # numpy shuffles lists in place
        yield from buffer

    def _shard_sizes(self) -> list[int]:
        if self.source.shard_sizes is None:
            self.source.shard_sizes = [count_tar_samples(Path(url)) for url in self.source.urls]
        return self.source.shard_sizes

    def _shard_offset(self, shard: int) -> int:
        """Index of the shard's first sample, for samples that carry no ``idx`` field."""
        if self._offsets is None:
            self._offsets = [int(total) for total in np.cumsum([0, *self._shard_sizes()[:-1]])]
        return self._offsets[shard]

    def _read_shard(self, shard: int) -> Iterator[Record]:
        """The kept records of one shard in tar order. The samples a truncated shard lost come out as
        placeholders (``image`` None) when the shard's size is known, so that positions, and with them every
        consumer's batches, stay as planned; a bad sample each."""
        url = self.source.urls[shard]
        keep = self.source.keep
        read = 0
        try:
            for ordinal, (key, fields) in enumerate(iter_tar_samples(Path(url))):
                read += 1
                record = self._record(url, key, fields, lambda: self._shard_offset(shard) + ordinal)
                if keep is None or record.index in keep:
                    yield record
        except UserError as err:
            sizes = self.source.shard_sizes
            if sizes is None or "truncated" not in str(err):
                raise
            if read < sizes[shard]:
                logger.warning("%s; %d of its %d samples lost", err, sizes[shard] - read, sizes[shard])
            for lost in range(read, sizes[shard]):
                index = self._shard_offset(shard) + lost  # what the writer's idx would have been
                if keep is None or index in keep:
                    yield Record(index, -1, "", None, f"{url} (truncated)")

    def _record(self, url: str, key: str, fields: dict[str, bytes], default_index: object) -> Record:
        origin = f"{url}:{key}"
        index = _parse_int(fields, "idx", origin)
        if index is None:
            index = default_index()  # type: ignore[operator]
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
        return Record(index, -1 if label is None else label, text, image, origin, extras)


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
