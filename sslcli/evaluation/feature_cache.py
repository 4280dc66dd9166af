"""Frozen features computed once per (encoder, preprocessing, data split) and reused from disk.

An entry is valid exactly while its key is unchanged:

    key = sha256(encoder state, preprocessing, split identity)

- *encoder state*: every parameter and buffer (name, dtype, shape, bytes) plus the architecture
  (class and, for timm backbones, ``EncoderSpec``), so retraining, ``--random-init --seed`` or
  a single changed weight gives a new key;
- *preprocessing*: what :class:`EncoderInfo` records (image size, crop, mean/std, input space,
  ``--layer``);
- *split identity*: split name, sample count, class names, folder labels, the kept subset of
  samples (``DataSource.keep``) and every resolved shard or image path with its size and
  modification time, so regenerated data is a miss.

Device and batch size are not in the key: they change features only at float rounding level, and
features extracted on a GPU should serve a later CPU evaluation.  Entries are safetensors files
(``features [N, D]`` float32, ``labels [N]`` int64) written atomically; a damaged or mismatching
entry is recomputed, never trusted.  Each directory keeps one entry per *slot* (encoder file, kind,
architecture, preprocessing, split and its file paths): a newer encoder or regenerated data replaces
the older entry, so evaluating a run after every epoch does not pile up one feature matrix per epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from sslcli import distributed as dist
from sslcli.data.reader import DataSource
from sslcli.errors import UserError
from sslcli.evaluation.features import EncoderInfo
from sslcli.weights_file import read_header, write_weights

FORMAT = "sslcli-features-v1"  # bump when extraction changes what the same key would yield
CACHE_ENV = "SSLCLI_CACHE"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def default_cache_dir(info: EncoderInfo) -> Path:
    """``RUN/cache/features`` for a run directory, else ``$SSLCLI_CACHE/features``, else
    ``$XDG_CACHE_HOME/sslcli/features`` (``~/.cache/sslcli/features``)."""
    if info.run_dir is not None:
        return Path(info.run_dir) / "cache" / "features"
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "features"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sslcli" / "features"


def encoder_digest(encoder: nn.Module) -> str:
    """blake2b of the architecture and every parameter and buffer's name, dtype, shape and bytes."""
    digest = hashlib.blake2b(digest_size=32)
    spec = getattr(encoder, "spec", None)
    arch = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) and not isinstance(spec, type) else None
    digest.update(json.dumps([type(encoder).__qualname__, arch], sort_keys=True, default=str).encode())
    for name, tensor in encoder.state_dict().items():
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:{data.size};".encode())
        digest.update(memoryview(data))
    return digest.hexdigest()


def split_identity(source: DataSource) -> dict[str, Any]:
    """What makes a split's samples what they are: resolved files with sizes and mtimes, labels, counts."""
    files = []
    for url in source.urls:
        path = Path(url).resolve()
        try:
            stat = path.stat()
        except OSError as err:
            raise UserError(f"cannot read '{path}' ({err.strerror}); check --data") from None
        files.append([str(path), stat.st_size, stat.st_mtime_ns])
    labels = None if source.labels is None else _sha(source.labels)
    keep = None if source.keep is None else _sha(sorted(source.keep))  # a label subset or validation part
    return {"kind": source.kind, "split": source.split, "num_samples": source.num_samples,
            "classes": source.classes, "labels": labels, "keep": keep, "files": files}


def _sha(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class FeatureCache:
    """Where entries live and what, besides the weights and the data, the features depend on.

    Build one with :func:`feature_cache_for`; ``log`` receives one line per hit or miss.
    """

    directory: Path
    preprocessing: dict[str, Any]
    slot: dict[str, Any]
    log: Callable[[str], None] | None = None

    def _say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)

    def entry(self, encoder: nn.Module, source: DataSource) -> tuple[Path, str]:
        """``(file, full key)`` of ``encoder``'s features of ``source``."""
        data = split_identity(source)
        # Same files but new sizes or mtimes (regenerated data) stay in the slot and replace the old entry.
        slot = _sha({"format": FORMAT, "slot": self.slot, "preprocessing": self.preprocessing,
                     "split": source.split, "files": [name for name, _, _ in data["files"]]})
        content = _sha([data, encoder_digest(encoder)])
        name = f"{_UNSAFE.sub('_', source.split)}-{slot[:16]}-{content[:16]}.safetensors"
        return self.directory / name, _sha([slot, content])

    def fetch(self, encoder: nn.Module, source: DataSource,
              compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached ``(features [N, D], labels [N])`` if the entry is valid, else ``compute()``'s, stored."""
        path, key = self.entry(encoder, source)
        cached = self._load(path, key, source.num_samples)
        # Under torchrun extraction is collective, so every rank takes the hit only if every rank can.
        if dist.all_true(cached is not None):
            self._say(f"feature cache hit: split '{source.split}' from {path}")
            return cached  # type: ignore[return-value]
        self._say(f"feature cache miss: extracting split '{source.split}' into {path}")
        feats, labels = compute()
        dist.on_main(lambda: self._store(path, key, feats, labels))  # one writer; the others wait
        return feats, labels

    def _load(self, path: Path, key: str, num_samples: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not path.is_file():
            return None
        try:
            meta = read_header(path, FORMAT, "is not a feature cache entry")
            tensors = load_file(str(path))
            feats, labels = tensors["features"], tensors["labels"]
            if meta.get("key") == key and feats.ndim == 2 and feats.shape[0] == labels.shape[0] == num_samples:
                return feats, labels
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed, never trusted
            pass
        self._say(f"feature cache entry {path} is damaged or stale; recomputing it")
        return None

    def _store(self, path: Path, key: str, feats: torch.Tensor, labels: torch.Tensor) -> None:
        stem = path.name.rsplit("-", 1)[0]  # split-slot: entries of older encoders in the same slot
        write_weights({"features": feats.float(), "labels": labels.long()}, path, {"format": FORMAT, "key": key})
        for older in self.directory.glob(f"{stem}-*.safetensors"):
            if older != path:
                older.unlink(missing_ok=True)


def feature_cache_for(info: EncoderInfo, *, directory: Path | None = None,
                      log: Callable[[str], None] | None = None) -> FeatureCache | None:
    """The cache for ``info``'s encoder in ``directory`` (default :func:`default_cache_dir`); None for raw
    pixels, whose "features" are the images and cost nothing to recompute."""
    if info.kind == "raw_pixels":
        return None
    preprocessing = {"image_size": info.image_size, "crop_pct": info.crop_pct, "mean": list(info.mean),
                     "std": list(info.std), "input_space": info.input_space, "layer": info.layer}
    slot = {"kind": info.kind, "arch": info.arch, "path": None if info.path is None else str(Path(info.path).resolve())}
    return FeatureCache(Path(directory) if directory is not None else default_cache_dir(info), preprocessing,
                        slot, log)
