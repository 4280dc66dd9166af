"""Runs one multi-crop DINO step on a fixed global batch and saves the loss, gradients and centre.

Usage: ``dino_step.py OUT``.  Launched as a plain process (1 rank x B) or by torchrun (N ranks x
B/N); the test compares the two.  The centre is the cross-rank part: its batch mean must be the
all-reduced sum over every rank's teacher outputs divided by the global row count.  BatchNorm runs
in eval mode so per-rank batch statistics do not mask it.
"""

import sys
from pathlib import Path

import torch

from sslcli import distributed as dist
from sslcli.methods import build_method
from sslcli.models.encoders import create_encoder
from sharded_step import sharded_step

B = 8
ARGS = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "freeze_last_layer": 0}


def main(out: Path) -> None:
    dist.init_from_env(torch.device("cpu"))
    torch.manual_seed(0)
    method = build_method("dino", create_encoder("resnet18"), ARGS, epochs=10)
    method.eval()
    with torch.no_grad():  # a non-zero starting centre, so the momentum term is exercised too
        method.center.copy_(torch.linspace(-1, 1, ARGS["out_dim"])[None])
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)]
    views += [torch.randn(B, 3, 16, 16, generator=g) for _ in range(3)]
    loss, grads = sharded_step(method, views)
    if dist.is_main():
        torch.save({"loss": loss, "grads": grads, "center": method.center.clone(), "world": dist.world_size()}, out)
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
