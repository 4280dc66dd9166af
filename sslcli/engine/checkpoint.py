"""Atomic, pickle-free training checkpoints, their names, retention and validation.

A checkpoint is written to a temporary file in the same directory, fsynced and renamed over
the target, so a crash mid-save leaves the previous checkpoint intact (the temporary file's
name starts with a dot and never matches a checkpoint name).  Loading uses
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only, never
arbitrary pickled code.

Names: ``epoch-0003.pt`` is written when epoch 3 ends; ``epoch-0003-step-000120.pt`` after
120 batches of epoch 3 (``checkpoint_every`` or a preemption).  ``best.json`` names the
epoch-end checkpoint with the lowest epoch-mean loss, which pruning keeps.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from sslcli.atomic import atomic_path
from sslcli.errors import UserError

_NAME = re.compile(r"^epoch-(\d+)(?:-step-(\d+))?\.pt$")
_STALE_TMP = re.compile(r"^\.epoch-\d+(?:-step-\d+)?\.pt\.tmp-\d+$")
BEST_FILE = "best.json"
_EPOCH_END = float("inf")  # sorts an epoch's end after all of its mid-epoch checkpoints


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file, fsynced and renamed by :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise UserError(f"cannot load checkpoint '{path}' (not a torch file); it is corrupt or not a checkpoint: "
                            "resume from an earlier one or start a new run") from None
        # weights_only refuses anything but tensors and plain data before running any of it.
        found = str(err).split("Unsupported global: ")[-1].split(" was not")[0].removeprefix("GLOBAL ").strip()[:80]
        raise UserError(f"refusing checkpoint '{path}': it holds pickled Python objects ({found}) and sslcli loads "
                        "only tensors and plain data, never code; load it with code you trust") from None
    except Exception as err:  # noqa: BLE001 - truncated or not a torch file at all
        raise UserError(f"cannot load checkpoint '{path}' ({type(err).__name__}); it is corrupt or not a "
                        "checkpoint: resume from an earlier one or start a new run") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"'{path}' is not an sslcli checkpoint (no 'model' entry)")
    return state


def checkpoint_path(directory: Path, epoch: int, batch: int | None = None) -> Path:
    """The epoch-end checkpoint of ``epoch``, or the one after ``batch`` batches of it."""
    suffix = "" if batch is None else f"-step-{batch:06d}"
    return directory / f"epoch-{epoch:04d}{suffix}.pt"


def _position(path: Path) -> tuple[int, float] | None:
    m = _NAME.match(path.name)
    if m is None:
        return None
    return int(m.group(1)), _EPOCH_END if m.group(2) is None else int(m.group(2))


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in ``directory``, least trained first."""
    if not directory.is_dir():
        return []
    found = [(pos, p) for p in directory.iterdir() if (pos := _position(p)) is not None]
    return [p for _, p in sorted(found)]


def latest(directory: Path) -> Path | None:
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def latest_loadable(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The most trained checkpoint that loads, and its state; ``None`` when none does.  A newer one that
    does not load (written by a crashed process outside sslcli's atomic save) is passed over."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load(path)
        except UserError:
            continue
    return None


def best(directory: Path) -> Path | None:
    record = directory / BEST_FILE
    if not record.exists():
        return None
    path = directory / json.loads(record.read_text())["file"]
    return path if path.exists() else None


def _record_best(directory: Path, path: Path, epoch: int, loss: float) -> None:
    record = directory / BEST_FILE
    if record.exists() and json.loads(record.read_text())["loss"] <= loss and best(directory) is not None:
        return
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps({"file": path.name, "epoch": epoch, "loss": loss}) + "\n")


def remove_stale_temporaries(directory: Path) -> None:
    """Deletes temporary files of saves killed before their rename (kill -9, node failure)."""
    if directory.is_dir():
        for path in directory.iterdir():
            if _STALE_TMP.match(path.name):
                path.unlink(missing_ok=True)


def save_and_prune(state: dict[str, Any], directory: Path, epoch: int, keep: int, *, batch: int | None = None,
                   epoch_loss: float | None = None) -> Path:
    """Saves ``state`` as the epoch-end checkpoint of ``epoch`` (or the one after ``batch`` batches),
    then deletes all but the newest ``keep`` checkpoints and the best one.  ``epoch_loss`` (epoch ends
    only) makes this checkpoint the best when it is the lowest so far."""
    path = checkpoint_path(directory, epoch, batch)
    save_atomic(state, path)
    if epoch_loss is not None and epoch_loss == epoch_loss:  # NaN is never best
        _record_best(directory, path, epoch, epoch_loss)
    kept_best = best(directory)
    for old in list_checkpoints(directory)[: -max(keep, 1)]:
        if old != kept_best:
            old.unlink(missing_ok=True)
    return path


def check_compatible(state: dict[str, Any], path: Path, method: str, arch: str,
                     model_state: dict[str, torch.Tensor]) -> None:
    """Refuses a checkpoint whose method, backbone or parameter shapes differ from the run's."""
    saved = state.get("config") or {}
    ours, theirs = f"{method}/{arch}", f"{saved.get('method', '?')}/{saved.get('arch', '?')}"
    if saved and (saved.get("method"), saved.get("arch")) != (method, arch):
        raise UserError(f"checkpoint '{path}' is {theirs} but this run is {ours}; pass the checkpoint's method and "
                        "--arch, or choose another --out")
    for key, tensor in model_state.items():
        if key not in state["model"]:
            raise UserError(f"checkpoint '{path}' ({theirs}) lacks '{key}' of this run's {ours} model; it is from "
                            "another configuration: choose another --out")
        if tuple(state["model"][key].shape) != tuple(tensor.shape):
            raise UserError(f"checkpoint '{path}' holds '{key}' of shape {tuple(state['model'][key].shape)}, this "
                            f"run's {ours} needs {tuple(tensor.shape)}; pass the checkpoint's method_args, or another --out")
    extra = sorted(set(state["model"]) - set(model_state))
    if extra:
        raise UserError(f"checkpoint '{path}' ({theirs}) holds '{extra[0]}', which this run's {ours} model lacks; "
                        "pass the checkpoint's method_args, or choose another --out")
