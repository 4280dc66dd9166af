"""Runs one training step of a method on a fixed global batch and saves the loss and gradients.

Usage: ``step_equivalence.py METHOD METHOD_ARGS_JSON OUT``.  Launched as a plain process
(1 rank x B) or by torchrun (N ranks x B/N); the test compares the two.  BatchNorm runs in
eval mode so that per-rank batch statistics (SyncBN has no CPU kernels) do not mask what is
under test: the loss, the cross-rank gathers and their gradients.
"""

import json
import sys
from pathlib import Path

import torch

from sslcli import distributed as dist
from sslcli.methods import build_method
from sslcli.models.encoders import create_encoder
from sharded_step import sharded_step


# One caption per image, for image-text methods (CLIP); their tokenizer is learnt from these.
CAPTIONS = [f"{n} {size} {colour} shapes" for n, size, colour in
            zip(("a", "two", "three", "a", "two", "three", "a", "two"), ("small", "large") * 4,
                ("red", "green", "blue", "pink", "grey", "black", "white", "cyan"))]


def main(name: str, method_args: dict, out: Path) -> None:
    dist.init_from_env(torch.device("cpu"))
    torch.manual_seed(0)
    method = build_method(name, create_encoder("resnet18"), method_args, num_samples=64, captions=lambda: CAPTIONS)
    method.eval()
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
    loss, grads = sharded_step(method, [x1, x2], {"index": torch.arange(8), "text": CAPTIONS})
    buffers = {k: b.detach().clone() for k, b in method.named_buffers()}  # queues and banks after the update
    if dist.is_main():
        torch.save({"loss": loss, "grads": grads, "buffers": buffers, "world": dist.world_size()}, out)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]))
