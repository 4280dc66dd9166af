"""Batches for training and evaluation, with exact and identical epoch lengths on every rank.

Each rank gets ``num_samples // world_size`` samples per epoch (``epoch_samples // world_size`` when
resampled), so ``len(loader)`` is exact and equal across ranks. How the samples are split between ranks
and workers (by position in one global stream, by shard, or resampled) is :mod:`sslcli.data.streams`.

A bad sample (an image that does not decode, is too large, or was lost to a truncated shard) is replaced
by a good sample of the same batch, so batch sizes and positions still hold; ``batch["bad_samples"]``
counts the replaced ones and the loader logs the first few names each epoch.

Random augmentation is seeded per sample from ``(seed, epoch, rank, batch, slot)``, whatever process runs
it, so a batch is the same with any worker count and when a resumed epoch starts at ``start_batch``.
A transform that augments whole batches after the loader (:class:`DecodeOnly`) gets one seed per batch
from ``(seed, epoch, rank, batch)`` instead, for the same reason.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sslcli.data.formats import decode_field, decode_rgb
from sslcli.data.streams import Mode, Plan, Record, SplitBy, choose_mode
from sslcli.errors import UserError

if TYPE_CHECKING:
    from sslcli.data.reader import DataSource

logger = logging.getLogger(__name__)

SHUFFLE_BUFFER = 2000
Transform = Callable[[Image.Image], "torch.Tensor | list[torch.Tensor]"]
_REPORTED_NAMES = 5


def stand_ins(missing: list[bool]) -> dict[int, int]:
    """Each missing slot of a batch -> the slot that stands in for it: the nearest present one before it, else the
    first after, so a batch depends on its own samples only.  At least one slot must be present."""
    present = [slot for slot, gone in enumerate(missing) if not gone]
    return {slot: max((p for p in present if p < slot), default=present[0])
            for slot, gone in enumerate(missing) if gone}


class DecodeOnly(Protocol):
    """A transform whose augmentation runs per batch after the loader, on the training device (``--augment-on
    device``, :mod:`sslcli.training_views`).  The workers call ``decode(data)`` on each sample's image bytes
    instead of :func:`decode_rgb` (None marks a bad sample, replaced as any other) and keep what it returns
    as the list ``batch["images"]`` (its sizes may differ: no stacking); ``batch["seed"]`` is the batch's
    seed of ``(seed, epoch, rank, batch)`` for the augmentation that follows."""

    def decode(self, data: bytes) -> torch.Tensor | None: ...


@dataclass
class StreamOptions:
    """How a training loader splits and shuffles its data (``loader`` in a pretraining config).

    ``split_by``: ``auto`` (by shard when there are at least 4 shards per consumer, else by sample),
    ``shard`` or ``sample``. ``resampled``: draw shards with replacement, ``epoch_samples`` samples per
    epoch (default: the split's size). ``prefetch``: batches each DataLoader worker prepares ahead.
    """

    split_by: SplitBy = "auto"
    resampled: bool = False
    epoch_samples: int | None = None
    shuffle_buffer: int = SHUFFLE_BUFFER
    prefetch: int = 2

    def check(self) -> None:
        """Refuses values no loader can run with, naming the option and its config key."""
        if self.split_by not in ("auto", "shard", "sample"):
            raise UserError(f"--split-by (loader.split_by) must be one of auto, shard, sample, got '{self.split_by}'")
        if self.shuffle_buffer < 1:
            raise UserError(f"--shuffle-buffer (loader.shuffle_buffer) must be at least 1, got {self.shuffle_buffer}")
        if self.prefetch < 1:
            raise UserError(f"--prefetch (loader.prefetch) must be at least 1 batch per worker, got {self.prefetch}")
        if self.epoch_samples is not None and not self.resampled:
            raise UserError("--epoch-samples (loader.epoch_samples) sets the length of a resampled epoch; "
                            "add --resampled or drop it")
        if self.epoch_samples is not None and self.epoch_samples < 1:
            raise UserError(f"--epoch-samples (loader.epoch_samples) must be at least 1, got {self.epoch_samples}")


@dataclass
class _Failure:
    """A UserError raised inside a worker, carried to the main process as a value so it
    arrives as one line instead of DataLoader's re-raised traceback text."""

    message: str


def _collate(outputs: list[Any], records: list[Record], seed: int | None = None) -> dict[str, Any]:
    """Stacks transform outputs (one tensor, or one tensor per view) and the metadata; with ``seed``, a
    :class:`DecodeOnly` transform's outputs, keeps the images as a list."""
    first = outputs[0]
    if seed is not None:
        batch: dict[str, Any] = {"images": outputs, "seed": seed}
    elif isinstance(first, torch.Tensor):
        batch = {"image": torch.stack(outputs)}
    elif isinstance(first, (list, tuple)):
        batch = {"views": [torch.stack([views[v] for views in outputs]) for v in range(len(first))]}
    else:
        raise TypeError(f"the transform must return a tensor or a list of tensors, got {type(first).__name__}")
    batch["label"] = torch.tensor([record.label for record in records], dtype=torch.long)
    batch["index"] = torch.tensor([record.index for record in records], dtype=torch.long)
    batch["text"] = [record.text for record in records]
    return batch


class _BatchStream(IterableDataset):
    """Yields ``(batch, bad_origins)`` for this rank and worker, or a :class:`_Failure`."""

    def __init__(self, plan: Plan, transform: Transform | DecodeOnly, *, rank: int, world_size: int,
                 roles: int) -> None:
        self.plan = plan
        self.transform = transform
        self.decode_only: Callable[[bytes], torch.Tensor | None] | None = getattr(transform, "decode", None)
        self.rank = rank
        self.world_size = world_size
        self.roles = roles  # the rank's consumers: its worker count, or 1 (see sslcli.data.streams)
        self.start_batch = 0

    def _load(self, record: Record) -> tuple[Any, ...] | None:
        """The transform's inputs: ``(RGB image,)`` or ``(RGB image, extras)``; None for a bad sample."""
        if record.image is None:
            return None
        decode = self.decode_only or decode_rgb
        if isinstance(record.image, bytes):
            image = decode(record.image)
        else:
            try:
                image = decode(Path(record.image).read_bytes())
            except OSError:  # a file deleted or unreadable since listing counts as undecodable
                image = None
        if image is None or not self.plan.extra_fields:
            return None if image is None else (image,)
        extras = {}
        for name, channels in self.plan.extra_fields.items():
            array = decode_field((record.extras or {})[name], channels)
            if array is None:
                return None
            extras[name] = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        return image, extras

    def _transformed(self, batch: int, inputs: list[tuple[Any, ...]], records: list[Record]) -> dict[str, Any]:
        """Applies the transform with each slot's own seed; the caller's random state is left as it was.
        A :class:`DecodeOnly` transform's images (decoded in :meth:`_load`) are collated with one batch seed."""
        seeds = np.random.SeedSequence([self.plan.seed, self.plan.epoch, self.rank, batch])
        if self.decode_only is not None:  # a child sequence: a stream apart from the per-sample seeds'
            seed = int(seeds.spawn(1)[0].generate_state(1, np.uint64)[0])
            return _collate([args[0] for args in inputs], records, seed)
        torch_state, python_state = torch.random.get_rng_state(), random.getstate()
        try:
            outputs = []
            for seed, args in zip(seeds.generate_state(len(inputs), np.uint64).tolist(), inputs):
                torch.random.default_generator.manual_seed(seed)
                random.seed(seed)
                outputs.append(self.transform(*args))
        finally:
            torch.random.set_rng_state(torch_state)
            random.setstate(python_state)
        return _collate(outputs, records)

    def _batches(self) -> Iterator[tuple[dict[str, Any], list[str]]]:
        """This consumer's batches with their bad samples replaced: by the nearest good sample before them
        in the same batch (else the first after), so a batch depends on its own records only. A batch with
        no good sample takes the consumer's last good one, or waits for the next."""
        info = get_worker_info()
        role = ((info.id if info is not None else 0) + self.start_batch) % self.roles
        last_good: tuple[tuple[Any, ...], Record] | None = None
        waiting: list[tuple[int, list[Record]]] = []  # all-bad batches seen before any good sample
        groups = self.plan.groups(self.rank, self.world_size, role, self.roles, self.start_batch)
        for batch, records in groups:
            loaded = [self._load(record) for record in records]
            good = [slot for slot, inputs in enumerate(loaded) if inputs is not None]
            if not good and last_good is None:
                waiting.append((batch, records))
                continue
            bad = [record.origin for record, inputs in zip(records, loaded) if inputs is None]
            if good:
                for slot, donor in stand_ins([inputs is None for inputs in loaded]).items():
                    loaded[slot], records[slot] = loaded[donor], records[donor]
                last_good = (loaded[good[-1]], records[good[-1]])  # type: ignore[assignment]
            for held_batch, held in waiting:
                assert last_good is not None
                yield self._filled(held_batch, held, last_good)
            waiting = []
            if not good:
                yield self._filled(batch, records, last_good)  # type: ignore[arg-type]
                continue
            output = self._transformed(batch, loaded, records)  # type: ignore[arg-type]
            output["bad_samples"] = len(bad)
            yield output, bad
        if waiting:
            raise UserError(f"none of the images read from '{self.plan.source.spec}' decode; check the data")

    def _filled(self, batch: int, records: list[Record],
                good: tuple[tuple[Any, ...], Record]) -> tuple[dict[str, Any], list[str]]:
        """A batch none of whose samples decoded, made of copies of ``good``."""
        output = self._transformed(batch, [good[0]] * len(records), [good[1]] * len(records))
        output["bad_samples"] = len(records)
        return output, [record.origin for record in records]

    def __iter__(self) -> Iterator[tuple[dict[str, Any], list[str]] | _Failure]:
        """Runs in each DataLoader worker (or in-process without workers)."""
        try:
            yield from self._batches()
        except UserError as err:
            yield _Failure(str(err))


class Loader:
    """Iterable over batch dicts (``image``, ``views`` or ``images`` and ``seed``; ``label``, ``index``, ``text``,
    ``bad_samples``).

    ``len(loader)`` is the exact number of batches this iteration yields, the same on every rank. Call
    :meth:`set_epoch` before each epoch to change the shuffle; ``skipped`` counts the bad samples replaced
    in the epoch being iterated and ``bad_names`` names the first few.
    """

    def __init__(self, stream: _BatchStream, num_workers: int, prefetch: int, pin_memory: bool = False) -> None:
        self._stream = stream
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self.skipped = 0
        self.bad_names: list[str] = []

    @property
    def source(self) -> DataSource:
        return self._stream.plan.source

    @property
    def mode(self) -> Mode:
        """How samples are split between ranks and workers: ``sample``, ``shard`` or ``resampled``."""
        return self._stream.plan.mode

    @property
    def epoch(self) -> int:
        return self._stream.plan.epoch

    @property
    def start_batch(self) -> int:
        return self._stream.start_batch

    @property
    def batches_per_epoch(self) -> int:
        """Batches in a whole epoch (``len`` counts those from ``start_batch`` on)."""
        return self._stream.plan.batches

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per whole epoch."""
        plan = self._stream.plan
        return min(plan.quota, plan.batches * plan.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the shard order and shuffle of ``epoch`` for the next iteration, from batch ``start_batch``."""
        if not 0 <= start_batch <= self._stream.plan.batches:
            raise UserError(f"cannot resume at batch {start_batch} of an epoch of {self._stream.plan.batches}; "
                            "resume with the batch size, data and world size the run started with")
        self._stream.plan.epoch = epoch
        self._stream.start_batch = start_batch

    def __len__(self) -> int:
        return self._stream.plan.batches - self._stream.start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.skipped = 0
        self.bad_names = []
        # Worker roles are fixed by the whole epoch; fewer processes are started when fewer batches are left.
        workers = min(self.num_workers, len(self))
        if workers > 0 or self.pin_memory:
            # Pinned (page-locked) batches let the loop's non_blocking copies overlap the GPU's work;
            # torch pins them in a thread of its own, off the training step.
            items: Any = DataLoader(self._stream, batch_size=None, num_workers=workers,
                                    prefetch_factor=self.prefetch if workers else None, pin_memory=self.pin_memory)
        else:
            items = iter(self._stream)
        for item in items:
            if isinstance(item, _Failure):
                raise UserError(item.message)
            batch, bad = item
            self.skipped += len(bad)
            for name in bad:
                if len(self.bad_names) < _REPORTED_NAMES and name not in self.bad_names:
                    self.bad_names.append(name)
            yield batch
        if self.skipped:
            logger.warning(
                "skipped %d undecodable or missing sample(s) in epoch %d of '%s' (each replaced by a good one of "
                "its batch), e.g. %s", self.skipped, self.epoch, self.source.spec, ", ".join(self.bad_names))


def epoch_batches(source: DataSource, *, batch_size: int, world_size: int = 1, drop_last: bool = True,
                  options: StreamOptions | None = None) -> tuple[int, int]:
    """``(samples, batches)`` per rank and epoch, the same on every rank: ``num_samples // world_size``
    samples (``epoch_samples // world_size`` when resampled) in batches of ``batch_size``. Checks ``options``
    too, so a caller can refuse bad settings before it writes anything."""
    options = options or StreamOptions()
    options.check()
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    samples = source.num_samples if options.epoch_samples is None else options.epoch_samples
    if samples < world_size:
        raise UserError(f"'{source.spec}' has {samples} samples, fewer than the {world_size} processes")
    quota = samples // world_size
    batches = quota // batch_size if drop_last else -(-quota // batch_size)
    if batches == 0:
        raise UserError(
            f"batch size {batch_size} exceeds the {quota} samples per process of '{source.spec}'; "
            "lower --batch-size or use more data"
        )
    return quota, batches


def build_loader(
    source: DataSource,
    transform: Transform | DecodeOnly,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    options: StreamOptions | None = None,
    pin_memory: bool = False,
) -> Loader:
    """A :class:`Loader` over ``source`` for one rank of ``world_size``.

    Each rank gets exactly ``num_samples // world_size`` samples per epoch (see :func:`epoch_batches`).
    ``shuffle=False`` keeps stream order (shards as listed, members in tar order), which evaluation uses
    with ``drop_last=False`` to see every sample once. ``start_batch`` resumes an epoch: the loader
    yields the epoch's batches from that index on, the same ones (samples and augmentation) the whole
    epoch yields there, without decoding the skipped samples. ``options`` chooses the split mode,
    resampling, shuffle buffer and prefetch (:class:`StreamOptions`). ``pin_memory`` yields batches in
    page-locked memory, for asynchronous copies to a GPU (needs CUDA: torch ignores it, with a warning, without).
    A :class:`DecodeOnly` ``transform`` only decodes: its batches hold ``images`` and ``seed``, not ``views``.
    """
    options = options or StreamOptions()
    if num_workers < 0:
        raise UserError(f"number of workers must be 0 or more, got {num_workers}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within world size {world_size}")
    quota, batches = epoch_batches(source, batch_size=batch_size, world_size=world_size, drop_last=drop_last,
                                   options=options)
    roles = max(1, min(num_workers, batches))
    mode = choose_mode(options.split_by, options.resampled, source, shuffle=shuffle, consumers=world_size * roles)
    # A transform with ``extra_fields`` (field -> channels, e.g. MultiView's) is called as
    # transform(image, {field: [C, H, W] tensor in [0, 1]}); shards must carry those fields.
    extra_fields: dict[str, int] = dict(getattr(transform, "extra_fields", None) or {})
    if extra_fields and source.kind != "shards":
        raise UserError(f"extra views ({', '.join(extra_fields)}) are read from shard fields, but "
                        f"'{source.spec}' is an image folder; write shards whose samples carry them, or "
                        f"train without them: --set 'method_args.extra_views={{}}'")
    plan = Plan(source, mode, seed % 2**63, shuffle, options.shuffle_buffer, batch_size, quota, batches,
                extra_fields)
    stream = _BatchStream(plan, transform, rank=rank, world_size=world_size, roles=roles)
    loader = Loader(stream, num_workers, options.prefetch, pin_memory)
    loader.set_epoch(epoch, start_batch)
    return loader
