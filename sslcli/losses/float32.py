"""Losses computed in float32 whatever the autocast dtype.

Autocast casts every matmul to the autocast dtype even when both inputs are float32, so a
``q.float() @ k.float().T`` inside a bf16/fp16 region still yields low-precision logits: at
temperature 0.07 (logits up to 14.3) fp16 keeps ~3 significant digits of each similarity, and
DINO's 65536-way softmax over fp16 logits is a known source of NaNs.  :func:`float32_loss` turns
autocast off for the whole loss and casts its floating-point tensor inputs (also inside lists
and tuples) to float32, so the logits, the softmax and the reduction are all float32 and the
gradient flows back to the low-precision activations through the casts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

Loss = TypeVar("Loss", bound=Callable[..., Any])


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    return value


def _device_type(values: list[Any]) -> str:
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device.type
        if isinstance(value, (list, tuple)) and value:
            found = _device_type(list(value))
            if found:
                return found
    return ""


def float32_loss(fn: Loss) -> Loss:
    """Decorator: ``fn`` runs with autocast disabled on its inputs' device and float32 inputs."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = _to_float32(args), {k: _to_float32(v) for k, v in kwargs.items()}
        device = _device_type([*args, *kwargs.values()]) or "cpu"
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]
