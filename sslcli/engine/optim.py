"""Optimisers (SGD, AdamW, LARS) and the per-step update of scheduled hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from timm.optim import Lars
from torch import nn

from sslcli.engine.schedule import schedule


@dataclass
class OptimConfig:
    """Optimiser settings of a recipe.  ``lr`` is the base rate for a batch of 256."""

    name: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = 0.03
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    min_lr: float = 0.0
    weight_decay: float = 1e-4
    weight_decay_end: float | None = None
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1.0e-8  # AdamW's; CLIP uses 1e-6
    warmup_epochs: float = 0.0
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    milestones: list[float] = field(default_factory=list)  # epochs where a step schedule multiplies lr by gamma
    gamma: float = 0.1
    clip_grad: float | None = None
    # Base lr of the undecayed groups (biases, norm parameters), scheduled like ``lr``; None: ``lr``.
    # Barlow Twins trains them at 0.0048 against 0.2 for the weights.
    bias_lr: float | None = None

    def scaled_lr(self, batch_size: int) -> float:
        """The paper rule ``lr = base_lr * bs / 256`` (or its square-root variant)."""
        if self.lr_scaling == "linear":
            return self.lr * batch_size / 256
        if self.lr_scaling == "sqrt":
            return self.lr * (batch_size / 256) ** 0.5
        return self.lr


def param_groups(model: nn.Module, *, fixed_lr: tuple[nn.Module, ...] = ()) -> list[dict]:
    """Splits trainable parameters into decayed weights and undecayed biases / norm scales.

    Biases and norm parameters (``ndim <= 1``) get no weight decay and, for LARS, no trust
    ratio, as in the SimCLR / BYOL code.  Parameters of ``fixed_lr`` modules keep the base
    learning rate throughout (SimSiam's predictor).
    """
    fixed = {id(p) for m in fixed_lr for p in m.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim > 1, id(p) in fixed), []).append(p)
    return [
        {"params": ps, "apply_wd": decay, "fixed_lr": is_fixed, "weight_decay": 0.0}
        for (decay, is_fixed), ps in sorted(groups.items())
    ]


# Devices with torch's fused (single-kernel) SGD and AdamW updates among those sslcli runs on.
FUSED_DEVICES = ("cpu", "cuda")


def fused_available(groups: list[dict]) -> bool:
    """Whether torch's fused SGD / AdamW kernels take every parameter of ``groups`` (dense floats on a
    device that has them)."""
    params = [p for group in groups for p in group["params"]]
    return all(p.is_floating_point() and not p.is_sparse and p.device.type in FUSED_DEVICES for p in params)


def build_optimizer(groups: list[dict], cfg: OptimConfig, lr: float, *,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """``cfg``'s optimiser over ``groups`` at ``lr``.

    ``fused``: SGD and AdamW update all parameters in one fused kernel (None: wherever
    :func:`fused_available`; False: torch's default, a loop over tensors on the CPU and foreach
    kernels on a GPU).  Measured faster on the reference CPU, for the same update to float rounding
    (``tests/test_optimised_paths.py``): over ResNet-18's parameters AdamW took 36.6 -> 6.8 ms per
    step and SGD 9.8 -> 4.1 ms (docs/benchmarks.md).  LARS (timm's) has no fused form.
    """
    fused = fused_available(groups) if fused is None else fused
    impl = {"fused": True} if fused else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, **impl)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, **impl)
    if cfg.name == "lars":
        # Undecayed groups (biases, norms) skip the trust ratio: timm adapts only where wd != 0.
        return Lars(groups, lr=lr, momentum=cfg.momentum, trust_clip=False)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def apply_schedules(optimizer: torch.optim.Optimizer, cfg: OptimConfig, base_lr: float, epoch: float,
                    total_epochs: float) -> tuple[float, float]:
    """Sets this step's lr and weight decay on every group; returns them for logging."""
    lr = schedule(epoch, total_epochs, start=base_lr, end=cfg.min_lr, warmup=cfg.warmup_epochs, kind=cfg.schedule,
                  milestones=cfg.milestones, gamma=cfg.gamma)
    wd = schedule(epoch, total_epochs, start=cfg.weight_decay, end=cfg.weight_decay_end)
    bias_ratio = 1.0 if cfg.bias_lr is None else cfg.bias_lr / cfg.lr
    for group in optimizer.param_groups:
        group["lr"] = (base_lr if group.get("fixed_lr") else lr) * (1.0 if group.get("apply_wd", True) else bias_ratio)
        group["weight_decay"] = wd if group.get("apply_wd", True) else 0.0
    return lr, wd
