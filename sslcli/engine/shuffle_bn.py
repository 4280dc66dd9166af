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


Outputs = torch.Tensor | tuple[torch.Tensor, ...]


def _rows(out: Outputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Outputs:
    # Encoders with several outputs (DenseCL: global, dense, backbone map) get each one re-ordered.
    return tuple(fn(o) for o in out) if isinstance(out, tuple) else fn(out)


@torch.no_grad()
def shuffled_forward(encoder: Callable[[torch.Tensor], Outputs], x: torch.Tensor, splits: int) -> Outputs:
    """``encoder(x)`` with Shuffling BN; rows come back in the original order.

    ``encoder`` may return one tensor or a tuple of tensors with one row per sample each.
    """
    if dist.world_size() > 1:
        x_all = dist.gather_no_grad(x)
        perm = dist.broadcast_(torch.randperm(x_all.shape[0], device=x.device))
        n, r = x.shape[0], dist.rank()
        out_all = _rows(encoder(x_all[perm[r * n : (r + 1) * n]]), dist.gather_no_grad)
        inverse = torch.argsort(perm)
        return _rows(out_all, lambda o: o[inverse][r * n : (r + 1) * n])
    if splits <= 1:
        return encoder(x)
    perm = torch.randperm(x.shape[0], device=x.device)
    outs = [encoder(chunk) for chunk in x[perm].chunk(splits)]
    out = tuple(torch.cat(parts) for parts in zip(*outs)) if isinstance(outs[0], tuple) else torch.cat(outs)
    inverse = torch.argsort(perm)
    return _rows(out, lambda o: o[inverse])
