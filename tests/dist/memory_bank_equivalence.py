"""Runs two InstDisc steps on fixed global batches and saves the bank, Z, losses and gradients.

Launched as a plain process (1 rank x B) or by torchrun (N ranks x B/N); the test compares the
two.  Every rank seeds the same way, so the initial weights, the bank and the shared noise draw
agree; BatchNorm runs in eval mode so per-rank batch statistics do not mask what is under test:
the gathered bank update, the all-reduced partition estimate and the loss.
"""

import sys
from pathlib import Path

import torch

from sslcli import distributed as dist
from sslcli.methods import build_method
from sslcli.models.encoders import create_encoder

N, B = 32, 8


def main(out: Path) -> None:
    dist.init_from_env(torch.device("cpu"))
    torch.manual_seed(0)
    method = build_method("instdisc", create_encoder("resnet18"), {"dim": 16, "num_noise": 12}, num_samples=N)
    method.eval()
    initial = method.bank.memory.clone()
    model = dist.wrap_ddp(method, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2 * B, 3, 32, 32, generator=g)
    indices = torch.randperm(N, generator=g)[: 2 * B]  # distinct within each step's global batch
    n = B // dist.world_size()
    losses, grads = [], {}
    for step in range(2):  # the second step reads rows the first one wrote, and the first step's Z
        lo = step * B + dist.rank() * n
        out_step = model([images[lo:lo + n]], {"index": indices[lo:lo + n]})
        if step == 0:
            out_step.loss.backward()
            grads = {k: p.grad.detach().clone() for k, p in method.named_parameters() if p.grad is not None}
        losses.append(dist.all_reduce_mean(out_step.loss.detach()))
    if dist.is_main():
        torch.save({"bank": method.bank.memory.clone(), "partition": method.partition.clone(),
                    "losses": torch.stack(losses), "grads": grads, "world": dist.world_size(),
                    "initial": initial, "touched": indices}, out)
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
