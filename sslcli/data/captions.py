"""The captions of a shard dataset (each sample's ``txt`` field), read without decoding any image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sslcli.data.formats import iter_tar_samples
from sslcli.data.reader import DataSource
from sslcli.errors import UserError


def iter_captions(source: DataSource, limit: int | None = None) -> Iterator[str]:
    """The first ``limit`` (default: all) captions of ``source`` in stream order; every sample must have one."""
    if source.kind != "shards":
        raise UserError(f"'{source.spec}' is an image folder, which has no captions; image-text methods read "
                        "each sample's txt field from WebDataset shards (see `sslcli data shards`)")
    count = 0
    for url in source.urls:
        for key, fields in iter_tar_samples(Path(url)):
            if limit is not None and count == limit:
                return
            text = fields.get("txt", b"").decode("utf-8", errors="replace").strip()
            if not text:
                raise UserError(f"sample '{Path(url).name}:{key}' has no caption (txt field); image-text methods "
                                "need one per sample: write shards with captions or drop the uncaptioned samples")
            count += 1
            yield text
