"""MoCo's dictionary: a FIFO queue of the most recent keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeatureQueue(nn.Module):
    """A ``[size, dim]`` ring buffer; the oldest keys are overwritten first.

    Enqueue the *global* batch of keys (gathered from all ranks) on every rank, so all
    replicas hold the same queue without further communication.  The buffers live in the
    module's state dict, so checkpoints carry them.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        # Random unit vectors, as in MoCo: the first steps see noise rather than zeros.
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Writes ``keys`` ``[n, dim]`` at the pointer, wrapping around the end."""
        keys = keys.detach().to(self.keys.dtype)
        if keys.shape[0] > self.size:
            keys = keys[-self.size :]
        n = keys.shape[0]
        # The pointer stays on the device: reading it on the host would cost a sync per step (and, compiled,
        # a graph break and a recompile for each of its values).
        idx = (torch.arange(n, device=self.keys.device) + self.ptr) % self.size
        self.keys.index_copy_(0, idx, keys)
        self.ptr.copy_((self.ptr + n) % self.size)

    def negatives(self) -> torch.Tensor:
        """The current keys, detached; taken before this step's enqueue."""
        return self.keys.clone().detach()
