"""The training loop: one place, for every method."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from sslcli import distributed as dist
from sslcli.engine import rng
from sslcli.engine.device import loader_views, memory_format_for
from sslcli.engine.guards import BadSampleBudget, StepGuard
from sslcli.engine.metrics import CollapseMonitor, MetricsLog, TrainProgress
from sslcli.engine.optim import OptimConfig, apply_schedules
from sslcli.engine.preemption import Preempted, PreemptionFlag
from sslcli.engine.resume import LoopState, RunCheckpoints
from sslcli.engine.step import forward_backward, guarded_update
from sslcli.methods.base import Method


@dataclass
class LoopSettings:
    epochs: int
    optim: OptimConfig
    base_lr: float
    device: torch.device
    amp_dtype: torch.dtype | None
    log_every: int = 10
    accum_steps: int = 1
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0: epoch ends only
    max_bad_steps: int = 20
    max_bad_fraction: float = 0.1
    # batch -> the step's views on the device; None: the loader's batch["views"], moved (engine/device.py)
    make_views: Callable[[dict[str, Any]], list[torch.Tensor]] | None = None


def train(model: nn.Module, method: Method, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
          loader_for_epoch: Callable[[int, int], Iterable[dict[str, Any]]], steps_per_epoch: int,
          settings: LoopSettings, metrics: MetricsLog, checkpoints: RunCheckpoints,
          on_epoch_end: Callable[[int], None], loop: LoopState | None = None) -> None:
    """Runs from ``loop`` (a resumed position, default the start) to the end of ``settings.epochs``.

    ``model`` is ``method`` itself or its DDP / compiled wrapper (forward goes through it so gradients
    are all-reduced; ``after_step`` goes to the method).  ``loader_for_epoch(epoch, start_batch)`` yields
    the epoch's batches from ``start_batch`` on.  Checkpoints are written at epoch ends, every
    ``checkpoint_every`` steps and on SIGTERM/SIGUSR1, after which :class:`Preempted` is raised.
    ``on_epoch_end(epoch)`` runs on every rank after the epoch's checkpoint.
    """
    loop = loop or LoopState()
    total_steps = settings.epochs * steps_per_epoch
    monitor, guard = CollapseMonitor(), StepGuard(settings.max_bad_steps, loop.bad_steps_in_row)
    data = BadSampleBudget(settings.max_bad_fraction, settings.device, loop.bad_samples, loop.samples)
    layout = memory_format_for(method, settings.device)  # the views', as pretrain lays out the weights
    make_views = settings.make_views or partial(loader_views, device=settings.device, layout=layout)

    def save() -> str:
        data.sync()
        loop.epoch_loss_sum = dist.all_reduce_mean(epoch_sum).item()  # the ranks' mean of this epoch's sum so far
        loop.samples, loop.bad_samples = data.seen, data.bad
        loop.bad_steps_in_row = guard.bad_steps_in_row
        return str(checkpoints.save(loop))

    with TrainProgress(total_steps, loop.epoch * steps_per_epoch + loop.batch) as progress, \
            PreemptionFlag() as preemption:
        while loop.epoch < settings.epochs:
            model.train()
            epoch_sum = torch.tensor(loop.epoch_loss_sum, device=settings.device)
            tick, seen, loss_sum, loss_count = time.perf_counter(), 0, torch.zeros((), device=settings.device), 0
            for i, batch in enumerate(rng.isolated(loader_for_epoch(loop.epoch, loop.batch)), start=loop.batch):
                step = loop.epoch * steps_per_epoch + i  # optimiser steps before this one
                lr, wd = apply_schedules(optimizer, settings.optim, settings.base_lr, loop.epoch + i / steps_per_epoch,
                                         settings.epochs)
                views = make_views(batch)
                optimizer.zero_grad(set_to_none=True)
                loss, out = forward_backward(model, views, batch, scaler, settings.device, settings.amp_dtype,
                                             settings.accum_steps)
                finite, stop = guarded_update(method, optimizer, scaler, guard, loss, settings.optim.clip_grad,
                                              preemption.requested, step, total_steps)
                if finite:
                    loss_sum, loss_count, epoch_sum = loss_sum + loss, loss_count + 1, epoch_sum + loss
                    loop.epoch_loss_steps += 1
                loop.batch = i + 1
                data.add(batch, views[0].shape[0])
                seen += views[0].shape[0] * dist.world_size()
                # Reading the loss syncs host and device, so it happens every log_every steps only.
                if (step + 1) % settings.log_every == 0 or loop.batch == steps_per_epoch:
                    data.sync()
                    loss_mean = dist.all_reduce_mean(loss_sum / loss_count).item() if loss_count else float("nan")
                    ips = seen / (time.perf_counter() - tick)
                    health = monitor(out.embedding, step + 1)  # embed_std, embed_rank (+ a warning on collapse)
                    logs = {k: float(v) for k, v in out.logs.items()}
                    metrics.write(epoch=loop.epoch, step=step + 1, loss=loss_mean, lr=lr, wd=wd, img_per_s=round(ips, 1),
                                  bad_samples=data.bad, **health, **logs)
                    entropies = {k: v for k, v in logs.items() if k in ("teacher_entropy", "student_entropy")}
                    progress.update(epoch=loop.epoch, loss=loss_mean, lr=lr, ips=ips, **health, **entropies)
                    loss_sum, loss_count = torch.zeros((), device=settings.device), 0
                progress.update(advance=1)
                due = settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0
                if stop or due or loop.batch == steps_per_epoch:
                    path = save()
                    if loop.batch == steps_per_epoch:
                        on_epoch_end(loop.epoch)
                    if stop:
                        raise Preempted(preemption.signal_name or "a signal to another rank", path)
            loop.epoch, loop.batch, loop.epoch_loss_sum, loop.epoch_loss_steps = loop.epoch + 1, 0, 0.0, 0
