"""Device selection shared by every command."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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


def is_convolutional(module: nn.Module) -> bool:
    """Whether ``module`` holds a spatial convolution: a 2-D convolution whose kernel is not just its stride
    (a ViT's patch embedding cuts the image into tiles, kernel = stride, and is the only conv a ViT has)."""
    return any(isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != tuple(m.stride) for m in module.modules())


def memory_format_for(module: nn.Module, device: torch.device) -> torch.memory_format:
    """The layout of a model's weights and of the views it trains on: ``channels_last`` (NHWC) for a
    convolutional network on a GPU, where cuDNN's tensor-core convolutions want it (standard practice,
    not measured here: no GPU yet), and the default NCHW layout otherwise.  On the reference 2-core CPU,
    channels_last made the SimCLR ResNet-18 step 7% slower at 64 px and 2-7% at 32 px, and a ViT's
    step no faster (docs/benchmarks.md)."""
    if device.type == "cuda" and is_convolutional(module):
        return torch.channels_last
    return torch.contiguous_format


def loader_views(batch: dict[str, Any], device: torch.device, layout: torch.memory_format) -> list[torch.Tensor]:
    """The loader's ``batch["views"]`` on ``device`` in ``layout``: what the training loop trains on unless its
    ``make_views`` hook makes the views itself (``--augment-on device``, :mod:`sslcli.training_views`)."""
    return [v.to(device, non_blocking=True, memory_format=layout) for v in batch["views"]]


def weight_layout(module: nn.Module) -> torch.memory_format:
    """The layout the engine gave ``module``'s weights (``memory_format_for``), read back from its spatial
    convolutions: the first one whose weight tells NCHW from NHWC apart (one input channel, as in a
    colourisation net's first conv, fits both).  NCHW when there is none, as for a ViT."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != tuple(m.stride):
            nchw, nhwc = m.weight.is_contiguous(), m.weight.is_contiguous(memory_format=torch.channels_last)
            if nchw != nhwc:
                return torch.channels_last if nhwc else torch.contiguous_format
    return torch.contiguous_format


def laid_out_for(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``x`` in ``module``'s weight layout: for methods that build their own inputs from the views (tiles,
    rotations, Lab channels), which the loop could not lay out for them."""
    return x.contiguous(memory_format=weight_layout(module))
