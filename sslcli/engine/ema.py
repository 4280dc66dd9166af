"""Exponential moving average of parameters, written once for every teacher / key encoder."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``theta_t <- m * theta_t + (1 - m) * theta_o`` for every parameter, in one fused call.

    Only parameters move: buffers such as BN running statistics belong to each network's own
    forward passes, as in the MoCo / BYOL / DINO reference code.  ``target`` and ``online``
    must have the same parameter layout (e.g. one is a deepcopy of the other).
    """
    t_params = list(target.parameters())
    o_params = list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError("EMA target and online networks have different parameter lists")
    torch._foreach_lerp_(t_params, [p.detach() for p in o_params], 1.0 - momentum)


def make_target(online: nn.Module) -> nn.Module:
    """A frozen copy of ``online`` to be moved by :func:`ema_update_` (initialised equal)."""
    import copy

    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target
