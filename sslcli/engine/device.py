"""Device selection shared by every command."""

from __future__ import annotations

import torch

from sslcli import distributed as dist
from sslcli.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device '{name}' requested but CUDA is not available; use --device cpu")
        return torch.device(name if ":" in name else f"cuda:{dist.local_rank()}")
    if name != "cpu":
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")
