"""Mixed precision: which autocast dtype to use and whether a GradScaler is needed."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["auto", "bf16", "fp16", "fp32"]


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """``auto`` is bf16 on a GPU and fp32 on the CPU (CPU bf16 is slower on most hosts)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Enabled only for fp16, whose narrow range needs loss scaling."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
