"""The data pipeline as ``sslcli pretrain`` builds it, and its rate alone (shards -> decoded, augmented views).

:func:`pretrain_loader` makes the loader with the arguments ``sslcli.pretrain`` passes (the same transform,
batch size, seed, split options, ``drop_last``); only the worker count varies. Decoding and augmentation
both run in the workers (``sslcli.data.loader``), so the main process only receives collated batches (with
``--augment-on device``'s transform, :class:`sslcli.training_views.WorkerDecode`, only the decoding does).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from sslcli.config import PretrainConfig
from sslcli.data.loader import DecodeOnly, Transform
from sslcli.data.reader import DataSource, Loader, build_loader


def pretrain_loader(cfg: PretrainConfig, source: DataSource, views: Transform | DecodeOnly, epoch: int,
                    num_workers: int) -> Loader:
    """One epoch's loader, as ``sslcli.pretrain`` builds it for a single process."""
    return build_loader(source, views, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                        num_workers=num_workers, drop_last=True, options=cfg.loader)


def endless_batches(cfg: PretrainConfig, source: DataSource, views: Transform | DecodeOnly,
                    num_workers: int) -> Iterator[dict[str, Any]]:
    """Batches of epoch 0, 1, ... in turn (a benchmark may want more steps than one epoch holds); each
    epoch starts its workers afresh, as in a training run."""
    epoch = 0
    while True:
        yield from pretrain_loader(cfg, source, views, epoch, num_workers)
        epoch += 1


def time_pipeline(cfg: PretrainConfig, source: DataSource, views: Transform | DecodeOnly, num_workers: int, steps: int,
                  warmup: int) -> dict[str, Any]:
    """Images per second the loader delivers to a consumer that takes no time, after ``warmup`` batches
    (the first ones include starting the workers, reported as ``first_batch_s``)."""
    batches = endless_batches(cfg, source, views, num_workers)
    start = time.perf_counter()
    next(batches)
    first = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    seconds = time.perf_counter() - start
    batches.close()  # stops the workers
    return {"workers": num_workers, "img_per_s": round(steps * cfg.batch_size / seconds, 1),
            "first_batch_s": round(first, 2), "batches": steps}
