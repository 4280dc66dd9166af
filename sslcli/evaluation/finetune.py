"""Supervised training of a whole network: fine-tuning (stage 2 of SimCLR v2) and distillation (stage 3).

Both train a :class:`~sslcli.models.classifier.Classifier` end to end with one loop,
:func:`train_classifier`; they differ only in the loss: cross-entropy against the labels, or
``distillation_loss`` against a frozen teacher's logits on the same augmented images (labels unused).
The train augmentation is SimCLR v2's fine-tuning one: random resized crop and flip only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sslcli.augment import ViewConfig, view_transform
from sslcli.data.reader import DataSource, build_loader
from sslcli.engine.optim import OptimConfig, apply_schedules, build_optimizer, param_groups
from sslcli.errors import UserError
from sslcli.evaluation.results import topk_accuracy
from sslcli.losses import distillation_loss
from sslcli.models.classifier import Classifier

LossFn = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]  # (logits, images, batch) -> loss


@dataclass
class TrainSettings:
    """How a classifier is trained.  ``lr`` is the peak rate for a batch of 256 (linear scaling)."""

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "lars"
    lr: float = 0.16  # SimCLR v2's fine-tuning rate (LARS, 0.16 x bs / 256)
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    image_size: int = 224
    min_scale: float = 0.08
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    num_workers: int = 0
    seed: int = 0

    def check(self) -> None:
        if self.optimizer not in ("sgd", "lars", "adamw"):
            raise UserError(f"unknown optimizer '{self.optimizer}'; use sgd, lars or adamw")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise UserError(f"--lr must be positive and --weight-decay non-negative, got {self.lr}, {self.weight_decay}")
        if not 0 < self.min_scale <= 1:
            raise UserError(f"--min-scale must be in (0, 1], got {self.min_scale}")


def train_classifier(model: Classifier, source: DataSource, settings: TrainSettings, loss_fn: LossFn, *,
                     device: torch.device, log: Callable[[str], None] = print) -> float:
    """Trains ``model`` on ``source`` for ``settings.epochs``; returns the last epoch's mean loss."""
    settings.check()
    view = ViewConfig(count=1, size=settings.image_size, scale=(settings.min_scale, 1.0), flip=0.5, jitter_p=0.0,
                      gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    transform = view_transform(view, settings.mean, settings.std)
    batch_size = min(settings.batch_size, source.num_samples)
    cfg = OptimConfig(name=settings.optimizer, lr=settings.lr, weight_decay=settings.weight_decay,  # type: ignore[arg-type]
                      warmup_epochs=settings.warmup_epochs, schedule="cosine")
    base_lr = cfg.scaled_lr(batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model.to(device)
        optimizer = build_optimizer(param_groups(model), cfg, base_lr)
        epoch_loss = float("nan")
        for epoch in range(settings.epochs):
            loader = build_loader(source, transform, batch_size=batch_size, shuffle=True, seed=settings.seed,
                                  epoch=epoch, num_workers=settings.num_workers, drop_last=True)
            model.train()
            total = torch.zeros((), device=device)
            for i, batch in enumerate(loader):
                apply_schedules(optimizer, cfg, base_lr, epoch + i / len(loader), settings.epochs)
                x = batch["image"].to(device, non_blocking=True)
                loss = loss_fn(model(x), x, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach()
            epoch_loss = float(total) / len(loader)
            if not math.isfinite(epoch_loss):
                raise UserError(f"training diverged (loss {epoch_loss}) in epoch {epoch + 1}; lower --lr")
            log(f"epoch {epoch + 1}/{settings.epochs}: loss {epoch_loss:.4f}")
    return epoch_loss


@torch.no_grad()
def evaluate_classifier(model: Classifier, source: DataSource, transform: Callable[[Any], torch.Tensor], *,
                        device: torch.device, batch_size: int = 256, num_workers: int = 0) -> dict[str, float]:
    """Top-1 / top-5 accuracy and mean cross-entropy of ``model`` on a labelled split."""
    loader = build_loader(source, transform, batch_size=batch_size, shuffle=False, drop_last=False,
                          num_workers=num_workers)
    model.eval().to(device)
    logits, labels = [], []
    for batch in loader:
        logits.append(model(batch["image"].to(device)).float().cpu())
        labels.append(torch.as_tensor(batch["label"]).long())
    scores, y = torch.cat(logits), torch.cat(labels)
    if (y < 0).any():
        raise UserError(f"split '{source.split}' of '{source.spec}' is unlabelled; accuracy needs labels")
    return {**topk_accuracy(scores, y), "loss": F.cross_entropy(scores, y).item()}


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    def loss(logits: torch.Tensor, images: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        labels = torch.as_tensor(batch["label"]).to(logits.device)
        if (labels < 0).any():
            raise UserError("fine-tuning needs labels, and this split has unlabelled images; pass a labelled --data")
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)

    return loss


def teacher_loss(teacher: Classifier, temperature: float) -> LossFn:
    """SimCLR v2's distillation loss against ``teacher``'s logits on the same augmented images."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss(logits: torch.Tensor, images: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(images)
        return distillation_loss(logits, target, temperature)

    return loss
