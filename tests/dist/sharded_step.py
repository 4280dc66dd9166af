"""One DDP training step on this rank's shard of a fixed global batch, for the tests/dist scripts."""

from __future__ import annotations

from typing import Any

import torch

from sslcli import distributed as dist


def local_rows(global_batch: int) -> slice:
    """This rank's rows of a global batch split evenly over the ranks."""
    n = global_batch // dist.world_size()
    return slice(dist.rank() * n, (dist.rank() + 1) * n)


def sharded_step(method: torch.nn.Module, views: list[torch.Tensor],
                 batch: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward + backward of ``method`` (wrapped in DDP) on this rank's rows of every view and batch field.

    Returns the loss averaged over ranks and the (DDP-averaged) gradient of every parameter that has one.
    """
    rows = local_rows(views[0].shape[0])
    local_batch: dict[str, Any] = {k: v[rows] for k, v in (batch or {}).items()}
    model = dist.wrap_ddp(method, torch.device("cpu"))
    step = model([v[rows] for v in views], local_batch)
    step.loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in method.named_parameters() if p.grad is not None}
    return dist.all_reduce_mean(step.loss.detach()), grads
