"""Supervised training of a whole network: fine-tuning (stage 2 of SimCLR v2) and distillation (stage 3).

Both train a :class:`~sslcli.models.classifier.Classifier` end to end with one loop,
:func:`train_classifier`; they differ only in the loss: cross-entropy against the labels, or
``distillation_loss`` against a frozen teacher's logits on the same augmented images (labels unused).
The train augmentation is SimCLR v2's fine-tuning one: random resized crop and flip only.  The
BEiT / MAE fine-tuning protocol adds, from timm: layer-wise lr decay on timm's layer grouping
(:func:`layer_decay_groups`), mixup / cutmix with soft-target cross-entropy (:func:`build_mixup`), and
drop-path (set when the backbone is built: :func:`sslcli.evaluation.finetune_parts.with_drop_path`).

Under torchrun the loop is data-parallel: each of the W processes trains on its share of every global
batch (``--batch-size`` / W images; :func:`per_process_batch`), DistributedDataParallel averages the
gradients, and the lr is scaled from the global batch.  Evaluation shares the split between the processes
(:func:`sslcli.evaluation.features.extract_features`) and every process gets the whole split's metrics.
What differs from one process on the global batch: BatchNorm statistics are per process on CPUs (SyncBN,
over the global batch, on GPUs), the augmentation is drawn per (process, batch, slot), and mixup / cutmix
pair images within a process's share.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.models import group_parameters
from torch import nn

from sslcli import distributed as dist
from sslcli.augment import ViewConfig, view_transform
from sslcli.data.reader import DataSource, build_loader
from sslcli.engine.optim import OptimConfig, apply_schedules, build_optimizer, param_groups
from sslcli.errors import UserError
from sslcli.evaluation.features import extract_features
from sslcli.evaluation.results import topk_accuracy
from sslcli.losses import distillation_loss
from sslcli.models.classifier import Classifier

LossFn = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]  # (logits, images, batch) -> loss
EpochHook = Callable[[int, Classifier], None]  # (epochs done, model) after each epoch


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
    layer_decay: float | None = None  # lr x decay^(depth below the top) per layer (BEiT, MAE: 0.65-0.75)
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0: off (MAE: 0.8)
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix; 0: off (MAE: 1.0); with mixup, one of them per batch

    def check(self) -> None:
        if self.optimizer not in ("sgd", "lars", "adamw"):
            raise UserError(f"unknown optimizer '{self.optimizer}'; use sgd, lars or adamw")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise UserError(f"--layer-decay must be in (0, 1], got {self.layer_decay}; e.g. 0.75 (1 = no decay)")
        if self.mixup < 0 or self.cutmix < 0:
            raise UserError(f"--mixup and --cutmix are Beta alphas, 0 (off) or positive, got {self.mixup}, {self.cutmix}")
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            raise UserError(f"mixup and cutmix pair each image with another of its batch: --batch-size must be even, "
                            f"got {self.batch_size}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise UserError(f"--lr must be positive and --weight-decay non-negative, got {self.lr}, {self.weight_decay}")
        if not 0 < self.min_scale <= 1:
            raise UserError(f"--min-scale must be in (0, 1], got {self.min_scale}")


def layer_decay_groups(model: Classifier, layer_decay: float) -> list[dict]:
    """Optimiser groups with layer-wise lr decay, BEiT's / MAE's rule on timm's layer grouping.

    timm's ``group_matcher`` numbers a ViT's layers: 0 for ``cls_token``, ``pos_embed`` and ``patch_embed``,
    ``i + 1`` for ``blocks.i`` (the final ``norm`` joins the last block).  The head (kept projector
    layers and ``fc``, outside the timm model, plus unmatched parameters such as ``fc_norm``) is layer
    ``L + 1``, and layer ``l`` gets ``lr_scale = layer_decay ** (L + 1 - l)``: the embeddings
    ``decay ** (L + 1)``, block ``i`` ``decay ** (L - i)``, the head 1.  Weight decay skips 1-d
    parameters (biases, norms) and the model's ``no_weight_decay()`` names (position embedding, CLS token).
    """
    backbone = model.backbone.model
    if not (hasattr(backbone, "blocks") and hasattr(backbone, "group_matcher")):
        raise UserError(f"--layer-decay needs a backbone made of transformer blocks (a ViT); "
                        f"'{model.backbone.spec.arch}' has none: drop --layer-decay")
    layer_of = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
    # timm's own param_groups_layer_decay counts layers inside the timm model, whose head sslcli
    # removes (num_classes=0): without adding the head layer every scale would be one decay too large.
    head = max(layer_of.values()) + 1
    skip = tuple(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else ()
    named = [(name, p, layer_of.get(name, head)) for name, p in backbone.named_parameters()]
    named += [(name, p, head) for name, p in nn.ModuleList([model.projector, model.fc]).named_parameters()]
    grouped: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, p, layer in named:
        if p.requires_grad:
            decayed = p.ndim > 1 and not any(fnmatch.fnmatch(name, pattern) for pattern in skip)
            grouped.setdefault((layer, decayed), []).append(p)
    return [{"params": ps, "lr_scale": layer_decay ** (head - layer), "apply_wd": decayed, "fixed_lr": False,
             "weight_decay": 0.0} for (layer, decayed), ps in sorted(grouped.items())]


def build_mixup(settings: TrainSettings, num_classes: int, label_smoothing: float) -> Mixup | None:
    """timm's batch-wise mixup / cutmix (None when both are off); its targets are soft, smoothed by
    ``label_smoothing``: ``lam * smooth(y) + (1 - lam) * smooth(y.flip(0))``, to be trained with
    soft-target cross-entropy."""
    if not (settings.mixup or settings.cutmix):
        return None
    return Mixup(mixup_alpha=settings.mixup, cutmix_alpha=settings.cutmix, label_smoothing=label_smoothing,
                 num_classes=num_classes, mode="batch")


@contextlib.contextmanager
def _numpy_seeded(seed: int) -> Iterator[None]:
    """timm's Mixup draws from numpy's global generator: seed it for the run, then give the caller's back."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


def per_process_batch(settings: TrainSettings, source: DataSource, *, paired: bool) -> int:
    """Each process's share of the global ``settings.batch_size`` (all of it in one process).

    A split smaller than the batch shrinks it to the split (even when ``paired``: mixup / cutmix pair the
    images of a process's share, so each share must be even).
    """
    world = dist.world_size()
    if settings.batch_size % world:
        raise UserError(f"--batch-size {settings.batch_size} is not divisible by the {world} processes; "
                        f"pick a multiple of {world}")
    local = settings.batch_size // world
    if paired and local % 2:
        raise UserError(f"--batch-size {settings.batch_size} gives {local} images per process, and mixup / cutmix "
                        f"pair the images of each process's share; pick a multiple of {2 * world}")
    local = min(local, source.num_samples // world)
    if paired:
        local -= local % 2
    if local < 1:
        raise UserError(f"'{source.spec}' has {source.num_samples} training image(s), too few for a batch on each "
                        f"of {world} process(es); use more data or fewer processes")
    return local


def train_classifier(model: Classifier, source: DataSource, settings: TrainSettings, loss_fn: LossFn, *,
                     device: torch.device, log: Callable[[str], None] = print, mixup: Mixup | None = None,
                     after_epoch: EpochHook | None = None) -> float:
    """Trains ``model`` on ``source`` for ``settings.epochs``; returns the last epoch's mean loss (over all
    processes under torchrun, where each process trains on its share of every batch).

    With ``mixup`` each batch is mixed before the forward pass and ``batch["soft_target"]`` holds its soft
    labels (see :func:`soft_target_loss`); ``after_epoch(epochs_done, model)`` runs after every epoch, on
    every process.
    """
    settings.check()
    view = ViewConfig(count=1, size=settings.image_size, scale=(settings.min_scale, 1.0), flip=0.5, jitter_p=0.0,
                      gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    transform = view_transform(view, settings.mean, settings.std)
    world, rank = dist.world_size(), dist.rank()
    local_batch = per_process_batch(settings, source, paired=mixup is not None)
    cfg = OptimConfig(name=settings.optimizer, lr=settings.lr, weight_decay=settings.weight_decay,  # type: ignore[arg-type]
                      warmup_epochs=settings.warmup_epochs, schedule="cosine")
    base_lr = cfg.scaled_lr(local_batch * world)
    log(f"batch {local_batch * world} ({world} process(es) x {local_batch}); lr {settings.lr:g} per 256 -> "
        f"{base_lr:.3g}")
    # numpy (timm's mixup) is seeded alike on every process: one mixup / cutmix draw per global step, as one
    # process draws one per batch.  torch (drop-path, dropout) is seeded per process, or every process would
    # drop the same paths for its first image, its second, ...
    with torch.random.fork_rng(devices=[]), _numpy_seeded(settings.seed):
        torch.manual_seed(settings.seed + rank)
        model.to(device)
        if device.type == "cuda":  # SyncBN has CUDA kernels only; on CPUs each process keeps its own statistics
            model = dist.convert_sync_batchnorm(model)  # type: ignore[assignment]
        ddp = dist.wrap_ddp(model, device)  # forward and backward go through it; the hooks get the model itself
        groups = layer_decay_groups(model, settings.layer_decay) if settings.layer_decay else param_groups(model)
        optimizer = build_optimizer(groups, cfg, base_lr)
        epoch_loss = float("nan")
        for epoch in range(settings.epochs):
            loader = build_loader(source, transform, batch_size=local_batch, shuffle=True, seed=settings.seed,
                                  epoch=epoch, num_workers=settings.num_workers, drop_last=True, rank=rank,
                                  world_size=world, pin_memory=device.type == "cuda")
            model.train()
            total = torch.zeros((), device=device)
            for i, batch in enumerate(loader):
                apply_schedules(optimizer, cfg, base_lr, epoch + i / len(loader), settings.epochs)
                for group in optimizer.param_groups:  # warm-up + cosine, times each layer's decay
                    group["lr"] *= group.get("lr_scale", 1.0)
                x = batch["image"].to(device, non_blocking=True)
                if mixup is not None:
                    x, batch["soft_target"] = mixup(x, _labels(batch, device))
                loss = loss_fn(ddp(x), x, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach()
            # The mean over processes: every process then takes the same branch below.
            epoch_loss = float(dist.all_reduce_mean(total)) / len(loader)
            if not math.isfinite(epoch_loss):
                raise UserError(f"training diverged (loss {epoch_loss}) in epoch {epoch + 1}; lower --lr")
            log(f"epoch {epoch + 1}/{settings.epochs}: loss {epoch_loss:.4f}")
            if after_epoch is not None:
                after_epoch(epoch + 1, model)
    return epoch_loss


def evaluate_classifier(model: Classifier, source: DataSource, transform: Callable[[Any], torch.Tensor], *,
                        device: torch.device, batch_size: int = 256, num_workers: int = 0) -> dict[str, float]:
    """Top-1 / top-5 accuracy and mean cross-entropy of ``model`` on a labelled split.

    Under torchrun each process computes the logits of its share and every process gets the whole split's
    metrics (the logits are gathered in sample order, as knn gathers features).
    """
    scores, y = extract_features(model, source, transform, batch_size=batch_size, device=device,
                                 num_workers=num_workers)
    if (y < 0).any():
        raise UserError(f"split '{source.split}' of '{source.spec}' is unlabelled; accuracy needs labels")
    return {**topk_accuracy(scores, y), "loss": F.cross_entropy(scores, y).item()}


def _labels(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    labels = torch.as_tensor(batch["label"]).to(device)
    if (labels < 0).any():
        raise UserError("fine-tuning needs labels, and this split has unlabelled images; pass a labelled --data")
    return labels


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    def loss(logits: torch.Tensor, images: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return F.cross_entropy(logits.float(), _labels(batch, logits.device), label_smoothing=label_smoothing)

    return loss


def soft_target_loss() -> LossFn:
    """timm's soft-target cross-entropy ``-sum_c t_c log softmax(z)_c`` against mixup's ``batch["soft_target"]``."""
    criterion = SoftTargetCrossEntropy()

    def loss(logits: torch.Tensor, images: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return criterion(logits.float(), batch["soft_target"].float())

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
