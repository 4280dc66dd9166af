"""Linear probing: a linear classifier trained on frozen features.

The backbone stays in eval mode and runs exactly once per image (no augmentation), so the
probe trains on cached features in seconds.  The head is ``Linear(standardise(h))``, optionally
with a ``BatchNorm1d(affine=False)`` in between as in MAE's protocol, trained with cross-entropy
by SGD (momentum 0.9) or AdamW under a per-step cosine learning rate.

Defaults and the papers' settings: features are standardised with the train split's mean and
std, so one learning rate (0.1 for SGD) suits any backbone and converges in a few dozen
epochs.  MoCo and SimCLR probe unnormalised ResNet features with ``lr=30`` (SGD, 100 epochs):
pass ``lr=30, standardize=False``.  MAE normalises with ``bn_head=True`` instead (its LARS
optimiser is not offered; SGD on the normalised features plays its role here).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sslcli.data.reader import DataSource
from sslcli.engine.optim import OptimConfig, apply_schedules, build_optimizer, param_groups
from sslcli.errors import UserError
from sslcli.evaluation.features import extract_labelled
from sslcli.evaluation.results import topk_accuracy

Optimizer = Literal["sgd", "adamw"]
# Per-optimizer peak learning rates for standardised features; AdamW's steps are already normalised.
DEFAULT_LR: dict[str, float] = {"sgd": 0.1, "adamw": 1e-3}


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


def fit_linear_head(
    feats: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    epochs: int = 100,
    lr: float | None = None,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    optimizer: Optimizer = "sgd",
    bn_head: bool = False,
    standardize: bool = True,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[LinearHead, float]:
    """Trains a :class:`LinearHead` on ``feats [N, D]``; returns it (eval mode) and the last epoch's mean loss.

    ``lr=None`` takes the optimizer's default from :data:`DEFAULT_LR`.
    """
    lr = _check_params(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, optimizer=optimizer)
    x = feats.float().to(device)
    y = labels.long().to(device)
    if standardize:
        mean, std = x.mean(dim=0), x.std(dim=0)
        # Constant dimensions (e.g. a border pixel) stay unscaled instead of dividing by ~0.
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
    else:
        mean, std = torch.zeros(x.shape[1], device=device), torch.ones(x.shape[1], device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LinearHead(mean, std, num_classes, bn=bn_head).to(device)
    cfg = OptimConfig(name=optimizer, lr=lr, lr_scaling="none", weight_decay=weight_decay, momentum=0.9,
                      schedule="cosine", min_lr=0.0)
    opt = build_optimizer(param_groups(head), cfg, lr)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    # BatchNorm needs two rows per batch in training mode; a last batch of one is dropped.
    keep_last = x.shape[0] % batch_size != 1 or not bn_head
    head.train()
    epoch_loss = float("nan")
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator).to(device)
        total, seen = 0.0, 0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            if idx.numel() == 1 and not keep_last:
                continue
            apply_schedules(opt, cfg, lr, epoch + step / steps_per_epoch, epochs)
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
            seen += idx.numel()
        epoch_loss = total / max(seen, 1)
        if not math.isfinite(epoch_loss):
            raise UserError(f"the linear probe diverged (loss {epoch_loss}) in epoch {epoch + 1}; lower --lr")
    return head.eval(), epoch_loss


def _check_params(*, epochs: int, lr: float | None, batch_size: int, weight_decay: float, optimizer: str) -> float:
    """Checks the probe's settings; returns the learning rate to use."""
    if optimizer not in DEFAULT_LR:
        raise UserError(f"unknown optimizer '{optimizer}'; use one of {', '.join(DEFAULT_LR)}")
    if epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {epochs}")
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    if not lr > 0:
        raise UserError(f"--lr must be positive, got {lr}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if weight_decay < 0:
        raise UserError(f"--weight-decay must be non-negative, got {weight_decay}")
    return lr


def state_fingerprint(module: nn.Module) -> dict[str, str]:
    """A digest of every parameter and buffer's bytes: equal digests mean bit-identical state."""
    out = {}
    for name, tensor in module.state_dict().items():
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        out[name] = f"{tensor.dtype}:{tuple(tensor.shape)}:{hashlib.blake2b(memoryview(data)).hexdigest()}"
    return out


@torch.no_grad()
def _predict(head: nn.Module, feats: torch.Tensor, batch_size: int, device: torch.device | str) -> torch.Tensor:
    return torch.cat([head(feats[i : i + batch_size].to(device)).cpu() for i in range(0, feats.shape[0], batch_size)])


def linear_probe(
    encoder: nn.Module,
    train_source: DataSource,
    test_source: DataSource,
    transform: Callable[[Any], torch.Tensor],
    *,
    epochs: int = 100,
    lr: float | None = None,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    optimizer: Optimizer = "sgd",
    bn_head: bool = False,
    standardize: bool = True,
    device: torch.device | str = "cpu",
    seed: int = 0,
    num_workers: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Trains a linear classifier on the frozen encoder's train-split features.

    Returns ``top1`` / ``top5`` on the test split, ``train_top1`` and the final ``train_loss``;
    ``log`` gets progress lines.  Raises ``RuntimeError`` if the backbone's state changed at
    all during the probe.
    """
    _check_params(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, optimizer=optimizer)
    before = state_fingerprint(encoder)
    feats = extract_labelled(encoder, train_source, test_source, transform, batch_size=batch_size,
                             device=device, num_workers=num_workers, log=log)
    head, train_loss = fit_linear_head(
        feats.train_x, feats.train_y, num_classes=feats.num_classes, epochs=epochs, lr=lr, batch_size=batch_size,
        weight_decay=weight_decay, optimizer=optimizer, bn_head=bn_head, standardize=standardize,
        device=device, seed=seed,
    )
    if log is not None:
        log(f"linear head trained for {epochs} epochs (final loss {train_loss:.4f})")
    test = topk_accuracy(_predict(head, feats.test_x, batch_size, device), feats.test_y)
    train = topk_accuracy(_predict(head, feats.train_x, batch_size, device), feats.train_y, ks=(1,))
    after = state_fingerprint(encoder)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    if changed:
        raise RuntimeError(
            f"the frozen backbone changed during the linear probe ({len(changed)} tensors, e.g. {changed[:3]}); "
            "this is a bug in sslcli"
        )
    return {**test, "train_top1": train["top1"], "train_loss": train_loss}
