"""One optimiser step: forward and backward, optionally as ``accum_steps`` micro-batches, then the
guarded update.

The loader's batch is cut into ``accum_steps`` equal slices; each slice runs forward and backward
with its loss divided by ``accum_steps``, so the summed gradient is that of the mean loss over the
whole batch when the loss is a mean of independent per-sample terms (see docs/architecture.md for
which methods that holds for).  DDP all-reduces gradients on the last slice only.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from sslcli.engine.guards import StepGuard, grad_norm
from sslcli.engine.precision import autocast
from sslcli.methods.base import Method, StepOutput


def split_batch(views: list[torch.Tensor], batch: dict[str, Any], parts: int) -> list[tuple[list[torch.Tensor], dict]]:
    """``parts`` slices of the views and of every per-sample field of ``batch`` (tensors and lists whose
    first dimension is the batch size); other entries (counts such as ``bad_samples``) go to each slice."""
    if parts == 1:
        return [(views, batch)]
    size = views[0].shape[0]
    step = size // parts

    def cut(value: Any, k: int) -> Any:
        if isinstance(value, (torch.Tensor, list)) and len(value) == size:
            return value[k * step : (k + 1) * step]
        return value

    return [([v[k * step : (k + 1) * step] for v in views], {key: cut(value, k) for key, value in batch.items()})
            for k in range(parts)]


def forward_backward(model: nn.Module, views: list[torch.Tensor], batch: dict[str, Any], scaler: torch.amp.GradScaler,
                     device: torch.device, amp_dtype: torch.dtype | None, accum_steps: int) -> tuple[torch.Tensor, StepOutput]:
    """Accumulates the gradient of the batch's loss; returns the (detached) loss and the last slice's output."""
    total = torch.zeros((), device=device)
    slices = split_batch(views, batch, accum_steps)
    out: StepOutput | None = None
    for k, (micro_views, micro_batch) in enumerate(slices):
        last = k == len(slices) - 1
        no_sync = getattr(model, "no_sync", None)  # DDP (also through torch.compile's wrapper)
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            with autocast(device, amp_dtype):
                out = model(micro_views, micro_batch)
            loss = out.loss if accum_steps == 1 else out.loss / accum_steps
            scaler.scale(loss).backward()
        total += loss.detach().float()
    assert out is not None
    return total, out


def guarded_update(method: Method, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, guard: StepGuard,
                   loss: torch.Tensor, clip: float | None, stop_requested: bool, step: int,
                   total_steps: int) -> tuple[bool, bool]:
    """Steps the optimiser unless the loss or gradient is non-finite; ``step`` optimiser steps came before.
    Returns ``(stepped, some rank asked to stop)``; a skipped step runs neither method hook (no EMA update)."""
    scaler.unscale_(optimizer)  # true gradients for the norm (a no-op without fp16)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    finite, stop = guard.check(loss, grad_norm(params, clip), stop_requested, step + 1,
                               overflow_expected=scaler.is_enabled())
    if finite:
        method.before_optimizer_step(step / total_steps)
        scaler.step(optimizer)
    scaler.update()  # with fp16, a skipped step also lowers the loss scale
    if finite:
        method.after_step((step + 1) / total_steps)
    return finite, stop
