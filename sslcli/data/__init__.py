"""Datasets: the generated shapes dataset, the shard format, and loaders for training and evaluation."""

from sslcli.data.reader import (
    DataSource,
    Loader,
    StreamOptions,
    build_loader,
    epoch_batches,
    read_index,
    resolve_source,
)
from sslcli.data.shards import folder_to_shards, write_index
from sslcli.data.synth import CLASSES, generate_synthetic, render_sample

__all__ = [
    "CLASSES",
    "DataSource",
    "Loader",
    "StreamOptions",
    "build_loader",
    "epoch_batches",
    "folder_to_shards",
    "generate_synthetic",
    "read_index",
    "render_sample",
    "resolve_source",
    "write_index",
]
