"""The training loop: one place, for every method."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sslcli import distributed as dist
from sslcli.engine.metrics import CollapseMonitor, MetricsLog, TrainProgress
from sslcli.engine.optim import OptimConfig, apply_schedules
from sslcli.engine.precision import autocast
from sslcli.methods.base import Method


@dataclass
class LoopSettings:
    epochs: int
    optim: OptimConfig
    base_lr: float
    device: torch.device
    amp_dtype: torch.dtype | None
    log_every: int = 10


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf: the run stops rather than train on garbage."""


def train(
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loader_for_epoch: Callable[[int], Iterable[dict[str, Any]]],
    steps_per_epoch: int,
    settings: LoopSettings,
    metrics: MetricsLog,
    on_epoch_end: Callable[[int], None],
    start_epoch: int = 0,
) -> None:
    """Runs epochs ``start_epoch .. settings.epochs - 1``.

    ``model`` is ``method`` itself or its DDP wrapper (forward goes through the wrapper so
    gradients are all-reduced; ``after_step`` goes to the method).  ``on_epoch_end(epoch)``
    checkpoints; it runs on every rank.
    """
    total_steps = settings.epochs * steps_per_epoch
    step = start_epoch * steps_per_epoch
    params = [p for p in method.parameters() if p.requires_grad]
    monitor = CollapseMonitor()
    with TrainProgress(total_steps, step) as progress:
        for epoch in range(start_epoch, settings.epochs):
            model.train()
            tick, seen, loss_sum, loss_count = time.perf_counter(), 0, torch.zeros((), device=settings.device), 0
            for i, batch in enumerate(loader_for_epoch(epoch)):
                lr, wd = apply_schedules(optimizer, settings.optim, settings.base_lr, epoch + i / steps_per_epoch,
                                         settings.epochs)
                views = [v.to(settings.device, non_blocking=True, memory_format=torch.channels_last)
                         for v in batch["views"]]
                with autocast(settings.device, settings.amp_dtype):
                    out = model(views, batch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out.loss).backward()
                if settings.optim.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, settings.optim.clip_grad)
                method.before_optimizer_step(step / total_steps)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                method.after_step(step / total_steps)
                loss_sum += out.loss.detach().float()
                loss_count += 1
                seen += views[0].shape[0] * dist.world_size()
                # Reading the loss syncs host and device, so it happens every log_every steps only.
                if step % settings.log_every == 0 or i == steps_per_epoch - 1:
                    loss = dist.all_reduce_mean(loss_sum / loss_count).item()
                    if not math.isfinite(loss):
                        raise NonFiniteLoss(f"loss became {loss} at step {step}; lower --lr or use --set precision=fp32")
                    ips = seen / (time.perf_counter() - tick)
                    health = monitor(out.embedding, step)  # embed_std, embed_rank (+ a warning on collapse)
                    logs = {k: float(v) for k, v in out.logs.items()}
                    metrics.write(epoch=epoch, step=step, loss=loss, lr=lr, wd=wd, img_per_s=round(ips, 1), **health,
                                  **logs)
                    entropies = {k: v for k, v in logs.items() if k in ("teacher_entropy", "student_entropy")}
                    progress.update(epoch=epoch, loss=loss, lr=lr, ips=ips, **health, **entropies)
                    loss_sum.zero_()
                    loss_count = 0
                progress.update(advance=1)
            on_epoch_end(epoch)
