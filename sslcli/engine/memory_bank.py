"""A memory bank: one stored embedding per training image (InstDisc, CMC).

Unlike MoCo's FIFO :class:`~sslcli.engine.feature_queue.FeatureQueue`, rows are addressed by
the sample's stable index (``batch["index"]``), so the bank is ``[N, dim]`` with ``N`` the
training-set size, and each row is refreshed only when its image is seen again (once an epoch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MemoryBank(nn.Module):
    """``[size, dim]`` unit-norm rows, one per training sample, kept in buffers.

    The rows live in the module's state dict, so checkpoints carry them and DDP broadcasts
    rank 0's bank at wrap time.  With several ranks, gather the *global* batch of indices and
    features (``sslcli.distributed.gather_no_grad``) and call :meth:`update_` with it on every
    rank: the same update everywhere keeps the replicas identical without sending the bank.
    """

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"a memory bank needs size >= 1 and dim >= 1, got {size} x {dim}")
        # Random unit vectors: lemniscate draws uniform [-a, a] with a = sqrt(3 / dim), rows of
        # norm ~1; normalising makes the "rows are unit vectors" invariant hold from step 0.
        self.register_buffer("memory", F.normalize(torch.randn(size, dim, generator=generator), dim=1))

    @property
    def size(self) -> int:
        return self.memory.shape[0]

    @property
    def dim(self) -> int:
        return self.memory.shape[1]

    def sample(self, m: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``m`` row indices drawn uniformly with replacement (noise distribution ``P_n = 1/N``).

        Returns a LongTensor ``[m]`` on the bank's device.  Pass ``generator`` (on that device) for
        a reproducible draw; without one, the global RNG of that device is used.
        """
        return torch.randint(0, self.size, (m,), generator=generator, device=self.memory.device)

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """The rows at ``indices`` (``[...]`` long) as a detached copy ``[..., dim]``.

        A copy, so a later :meth:`update_` in the same step does not change what the loss saw.
        """
        flat = indices.reshape(-1).to(self.memory.device)
        return self.memory.index_select(0, flat).reshape(*indices.shape, self.dim).detach()

    @torch.no_grad()
    def update_(self, indices: torch.Tensor, features: torch.Tensor, momentum: float) -> None:
        """``v_i <- normalize(momentum * v_i + (1 - momentum) * f_i)`` for each ``i`` in ``indices``.

        InstDisc's proximal update (Wu et al., 2018, Sec. 3.3, momentum 0.5); ``momentum = 0``
        replaces the rows.  Shapes: ``indices`` ``[n]`` long, ``features`` ``[n, dim]`` (any float
        dtype; mixed precision features are upcast).  Indices should be distinct within a call:
        for a repeated index, which of its updates lands is unspecified (as in ``index_copy_``).
        """
        indices = indices.reshape(-1).to(self.memory.device)
        if features.shape != (indices.shape[0], self.dim):
            raise ValueError(f"features {tuple(features.shape)} do not match {indices.shape[0]} indices x {self.dim}")
        old = self.memory.index_select(0, indices)
        new = torch.lerp(features.detach().to(self.memory.dtype), old, momentum)
        self.memory.index_copy_(0, indices, F.normalize(new, dim=1))
