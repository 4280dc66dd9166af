"""Atomic, pickle-free training checkpoints.

A checkpoint is written to a temporary file in the same directory, fsynced and renamed over
the target, so a crash mid-save leaves the previous checkpoint intact.  Loading uses
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only, never
arbitrary pickled code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from sslcli.atomic import atomic_path
from sslcli.errors import UserError

_NAME = re.compile(r"^epoch-(\d+)\.pt$")


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file + fsync + rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def load(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file or pickled objects that weights_only refuses
        raise UserError(f"cannot load checkpoint '{path}' ({type(err).__name__}); "
                        "it is corrupt or holds pickled objects sslcli does not load") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"'{path}' is not an sslcli checkpoint (no 'model' entry)")
    return state


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return directory / f"epoch-{epoch:04d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(directory: Path) -> Path | None:
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def save_and_prune(state: dict[str, Any], directory: Path, epoch: int, keep: int) -> Path:
    """Saves epoch ``epoch`` and deletes all but the newest ``keep`` checkpoints."""
    path = checkpoint_path(directory, epoch)
    save_atomic(state, path)
    for old in list_checkpoints(directory)[: -max(keep, 1)]:
        old.unlink(missing_ok=True)
    return path
