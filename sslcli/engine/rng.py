"""Every random stream a training step draws from, captured per rank so a resumed run draws the same numbers.

The augmentations (torchvision v2: torch's and Python's generators), the methods (masks, shuffles) and
numpy users all advance process-global generators.  A checkpoint stores each rank's states as tensors
only, so it still loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch

from sslcli import distributed as dist

RngState = dict[str, torch.Tensor]
T = TypeVar("T")


def capture() -> RngState:
    """This process's generator states as tensors (the same shapes on every rank of a run)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([version, *mt], dtype=torch.int64),
        "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_extra": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: RngState | torch.Tensor) -> None:
    """Sets the generators to ``state``; a bare tensor is an older checkpoint's torch-only state."""
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    python = state["python"].tolist()
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((python[0], tuple(python[1:]), gauss if has_gauss else None))
    pos, has_np_gauss, cached = state["numpy_extra"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(has_np_gauss), cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather(state: RngState, device: torch.device) -> list[RngState]:
    """Every rank's ``state``, rank order, on the CPU.  One all-gather of the states packed as bytes,
    sent from ``device`` because NCCL moves only CUDA tensors."""
    if dist.world_size() == 1:
        return [state]
    names = sorted(state)
    parts = [state[name].contiguous().view(-1).view(torch.uint8) for name in names]
    packed = dist.gather_no_grad(torch.cat(parts).to(device)[None]).cpu()
    out: list[RngState] = []
    for row in packed:
        offset, rank_state = 0, {}
        for name, part in zip(names, parts):
            rank_state[name] = row[offset : offset + part.numel()].clone().view(state[name].dtype)
            offset += part.numel()
        out.append(rank_state)
    return out


def isolated(batches: Iterable[T]) -> Iterator[T]:
    """``batches`` with torch's global generator left as each ``next`` found it: a DataLoader with workers
    draws their base seed from it when it starts, at a different point of a resumed epoch than of an
    uninterrupted one, which would shift every random draw of the training step (MAE's masks) after it."""
    it = iter(batches)
    while True:
        state = torch.get_rng_state()
        try:
            batch = next(it)
        except StopIteration:
            return
        finally:
            torch.set_rng_state(state)
        yield batch
