"""The one way sslcli writes and reads its safetensors files (encoders, projectors, classifiers, tokenizers):
tensors written atomically with a string header, and a header checked for its ``format`` entry on reading."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sslcli.atomic import atomic_path
from sslcli.errors import UserError


def write_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Writes ``state`` (as contiguous CPU tensors) and ``metadata`` to ``path`` through a temporary file and a
    rename, so a reader never sees half a file; returns ``path``."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_header(path: Path, fmt: str, wrong_kind: str) -> dict[str, str]:
    """``path``'s safetensors header, which must say ``format: fmt``; else a UserError (``wrong_kind`` says
    what the file is not and how to make one)."""
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"'{path}' is not a readable safetensors file ({err})") from None
    if meta.get("format") != fmt:
        raise UserError(f"'{path}' {wrong_kind}")
    return meta
