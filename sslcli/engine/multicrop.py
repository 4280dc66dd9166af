"""Multi-crop (SwAV, Caron et al. 2020, Sec. 3.2): one forward pass per resolution group.

Views arrive as a list ``[2 global crops at 224 px, N local crops at 96 px]`` (any method, any
sizes).  Running the encoder on each crop alone wastes the batch dimension; running them all at
once is impossible (different sizes).  As in SwAV's and DINO's code, consecutive views of the same
shape are concatenated along the batch and encoded together, then split back per view.  BatchNorm
therefore normalises each resolution group over all its crops, which is what the papers train with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def resolution_groups(views: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """``[start, stop)`` index ranges of consecutive views sharing a shape (ignoring the batch)."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[1:] != views[start].shape[1:]:
            groups.append((start, i))
            start = i
    return groups


def forward_by_resolution(fn: Callable[[torch.Tensor], torch.Tensor], views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[fn(v) for v in views]``, computed with one call of ``fn`` per resolution group.

    ``fn`` must map ``[B, ...]`` to ``[B, ...]`` row by row (an encoder, a head, or both); the
    outputs are identical to per-view calls whenever ``fn`` treats samples independently (eval-mode
    BN, LayerNorm, ViTs) and differ only by the batch statistics of training-mode BN otherwise.
    """
    if not views:
        return []
    outputs: list[torch.Tensor] = []
    for start, stop in resolution_groups(views):
        group = views[start:stop]
        out = fn(torch.cat(list(group)) if len(group) > 1 else group[0])
        outputs.extend(out.split([v.shape[0] for v in group]))
    return outputs
