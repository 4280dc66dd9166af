"""Linear heads on cached frozen features: minibatch heads (SGD / AdamW / LARS) and L-BFGS logistic heads.

A sweep trains several minibatch heads in one pass over the features: every minibatch is gathered once
and each head, with its own optimiser and schedule, takes its step on it.  Each head starts from the
same seeded initialisation and sees the same minibatch order, so a head of a sweep is bit-identical to
the head a probe with that single lr and weight decay trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslcli.engine.optim import OptimConfig, apply_schedules, build_optimizer, param_groups
from sslcli.errors import UserError
from sslcli.evaluation.logistic import feature_stats, fit_logistic
from sslcli.evaluation.probe_protocols import MOMENTUM, ProbeSettings, resolve_protocol


class LinearHead(nn.Module):
    """``fc(bn(standardise(h)))``; the standardisation statistics are fixed buffers."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int, *, bn: bool) -> None:
        super().__init__()
        dim = mean.shape[0]
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        # eps as in MAE: its features can have tiny variance along some dimensions.
        self.norm: nn.Module = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if bn else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm((h - self.mean) / self.std))


class LogisticHead(nn.Module):
    """``standardise(h) @ W + b`` in float64, with ``(W [D, C], b [C])`` fitted by L-BFGS."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        for name, value in (("mean", mean), ("std", std), ("weight", weight), ("bias", bias)):
            self.register_buffer(name, value.detach().double().clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return ((h.double() - self.mean) / self.std) @ self.weight + self.bias


@dataclass
class HeadFit:
    """One trained head of a probe: its hyper-parameters and the mean training loss of its last epoch
    (``nan`` and ``diverged_epoch`` set when the loss stopped being finite; the head then stops training)."""

    head: nn.Module
    lr: float | None
    weight_decay: float
    train_loss: float
    diverged_epoch: int | None = None


def head_optimizer(head: LinearHead, settings: ProbeSettings, lr: float,
                   weight_decay: float) -> tuple[torch.optim.Optimizer, OptimConfig]:
    """``head``'s optimiser under ``settings`` at this ``lr`` / ``weight_decay``, and the config whose
    schedule :func:`sslcli.engine.optim.apply_schedules` sets before every step."""
    cfg = OptimConfig(name=settings.optimizer, lr=lr, lr_scaling="none",  # type: ignore[arg-type]
                      weight_decay=weight_decay, momentum=MOMENTUM, schedule=settings.schedule, milestones=list(settings.milestones),
                      warmup_epochs=settings.warmup_epochs, min_lr=0.0)
    groups = param_groups(head)
    if settings.optimizer == "lars":
        # MAE's LARS scales the weight matrix's step by its trust ratio even at wd 0 (timm only adapts
        # where wd != 0 unless told); the bias keeps plain momentum SGD, as in MAE's util/lars.py.
        for group in groups:
            group["always_adapt"] = group["apply_wd"]
    return build_optimizer(groups, cfg, lr), cfg


def fit_linear_heads(feats: torch.Tensor, labels: torch.Tensor, *, num_classes: int, settings: ProbeSettings,
                     device: torch.device | str = "cpu", seed: int = 0) -> list[HeadFit]:
    """Trains one :class:`LinearHead` per ``(lr, wd)`` of ``settings.grid`` on ``feats [N, D]`` by cross-entropy.

    Heads are returned in eval mode in grid order.  A head whose loss stops being finite is frozen and
    marked; the caller decides whether that is an error (a single head) or a discarded sweep point.
    """
    x = feats.float().to(device)
    y = labels.long().to(device)
    if settings.standardize:
        mean, std = x.mean(dim=0), x.std(dim=0)
        # Constant dimensions (e.g. a border pixel) stay unscaled instead of dividing by ~0.
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
    else:
        mean, std = torch.zeros(x.shape[1], device=device), torch.ones(x.shape[1], device=device)
    fits, optimizers = [], []
    for lr, wd in settings.grid:
        assert lr is not None, "minibatch heads always have a learning rate"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = LinearHead(mean, std, num_classes, bn=settings.bn_head).to(device)
        fits.append(HeadFit(head.train(), lr, wd, float("nan")))
        optimizers.append(head_optimizer(head, settings, lr, wd))
    generator = torch.Generator().manual_seed(seed)
    batch_size, epochs = settings.batch_size, settings.epochs
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    # BatchNorm needs two rows per batch in training mode; a last batch of one is dropped.
    keep_last = x.shape[0] % batch_size != 1 or not settings.bn_head
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator).to(device)
        active = [i for i, fit in enumerate(fits) if fit.diverged_epoch is None]
        totals, seen = [0.0] * len(fits), 0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            if idx.numel() == 1 and not keep_last:
                continue
            xb, yb = x[idx], y[idx]
            for i in active:
                opt, cfg = optimizers[i]
                apply_schedules(opt, cfg, cfg.lr, epoch + step / steps_per_epoch, epochs)
                loss = F.cross_entropy(fits[i].head(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                totals[i] += loss.item() * idx.numel()
            seen += idx.numel()
        for i in active:
            fits[i].train_loss = totals[i] / max(seen, 1)
            if not math.isfinite(fits[i].train_loss):
                fits[i].train_loss, fits[i].diverged_epoch = float("nan"), epoch + 1
    for fit in fits:
        fit.head.eval()
    return fits


def fit_logistic_heads(feats: torch.Tensor, labels: torch.Tensor, *, num_classes: int, settings: ProbeSettings,
                       device: torch.device | str = "cpu") -> list[HeadFit]:
    """One :class:`LogisticHead` per weight decay (``lambda``) of ``settings``, fitted by L-BFGS on all rows."""
    x = feats.detach().double().to(device)
    y = labels.long().to(device)
    if settings.standardize:
        mean, std = feature_stats(x)
    else:
        mean, std = torch.zeros_like(x[0]), torch.ones_like(x[0])
    z = (x - mean) / std
    fits = []
    for _, wd in settings.grid:
        weight, bias = fit_logistic(z, y, num_classes, weight_decay=wd, max_iter=settings.max_iter)
        head = LogisticHead(mean, std, weight, bias).eval()
        with torch.no_grad():
            loss = float(F.cross_entropy(head(x), y))
        fits.append(HeadFit(head, None, wd, loss, None if math.isfinite(loss) else 1))
    return fits


def fit_probe_heads(feats: torch.Tensor, labels: torch.Tensor, *, num_classes: int, settings: ProbeSettings,
                    device: torch.device | str = "cpu", seed: int = 0) -> list[HeadFit]:
    """The heads of ``settings``' solver, batch capped at the number of rows (see ``ProbeSettings.for_rows``)."""
    settings = settings.for_rows(feats.shape[0])
    if settings.solver == "lbfgs":
        return fit_logistic_heads(feats, labels, num_classes=num_classes, settings=settings, device=device)
    return fit_linear_heads(feats, labels, num_classes=num_classes, settings=settings, device=device, seed=seed)


def raise_if_diverged(fits: list[HeadFit]) -> None:
    """A one-line error when every head diverged (a sweep keeps going while one head is still usable)."""
    if all(fit.diverged_epoch is not None for fit in fits):
        lrs = ", ".join(str(fit.lr) for fit in fits)
        raise UserError(f"the linear probe diverged (loss nan) in epoch {fits[0].diverged_epoch} at lr {lrs}; "
                        "lower --lr")


def fit_linear_head(
    feats: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    epochs: int = 100,
    lr: float | None = None,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    bn_head: bool = False,
    standardize: bool = True,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[LinearHead, float]:
    """One :class:`LinearHead` under the ``custom`` protocol (cosine lr, no warm-up) on ``feats [N, D]``;
    returns it (eval mode) and the last epoch's mean loss.  ``lr=None``: the optimizer's default."""
    settings = resolve_protocol("custom", epochs=epochs, lr=None if lr is None else [lr], weight_decay=[weight_decay],
                                optimizer=optimizer, batch_size=batch_size, bn_head=bn_head, standardize=standardize,
                                num_train=feats.shape[0])
    (fit,) = fit_linear_heads(feats, labels, num_classes=num_classes, settings=settings, device=device, seed=seed)
    raise_if_diverged([fit])
    assert isinstance(fit.head, LinearHead)
    return fit.head, fit.train_loss
