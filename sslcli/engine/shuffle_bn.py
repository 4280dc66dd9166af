"""MoCo's Shuffling BN for the key encoder.

BatchNorm lets a query and its positive key "communicate" through batch statistics, a
shortcut that lowers the loss without better features (He et al., 2020, Sec. 3.3).  The cure
computes the key encoder's BN over a different grouping of samples than the query encoder.

- Several ranks: gather the key batch, apply one random permutation (broadcast from rank 0),
  run the key encoder on this rank's slice, gather the outputs and undo the permutation.
- One process: emulate ``splits`` GPUs as the official single-GPU variants do: permute,
  run the encoder on each sub-batch separately (per-sub-batch BN), undo the permutation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sslcli import distributed as dist


def mode(splits: int) -> str:
    """A human-readable description of which Shuffle-BN variant runs."""
    if dist.world_size() > 1:
        return f"cross-rank shuffle over {dist.world_size()} ranks"
    if splits > 1:
        return f"single-process emulation: shuffled, BN per sub-batch ({splits} sub-batches)"
    return "off (one process, splits=1)"


@torch.no_grad()
def shuffled_forward(encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, splits: int) -> torch.Tensor:
    """``encoder(x)`` with Shuffling BN; rows come back in the original order."""
    if dist.world_size() > 1:
        x_all = dist.gather_no_grad(x)
        perm = dist.broadcast_(torch.randperm(x_all.shape[0], device=x.device))
        n, r = x.shape[0], dist.rank()
        out_all = dist.gather_no_grad(encoder(x_all[perm[r * n : (r + 1) * n]]))
        inverse = torch.argsort(perm)
        return out_all[inverse][r * n : (r + 1) * n]
    if splits <= 1:
        return encoder(x)
    perm = torch.randperm(x.shape[0], device=x.device)
    out = torch.cat([encoder(chunk) for chunk in x[perm].chunk(splits)])
    return out[torch.argsort(perm)]
