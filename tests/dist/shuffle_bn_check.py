"""Shuffling BN across 2 ranks: rows come back in order, and BN statistics mix the ranks."""

import sys
from pathlib import Path

import torch
from torch import nn

from sslcli import distributed as dist
from sslcli.engine.shuffle_bn import shuffled_forward


def main(out: Path) -> None:
    dist.init_from_env(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(16, 4, generator=g) + torch.arange(16.0)[:, None]  # rows differ by rank
    lo = dist.rank() * 8
    x = x_all[lo:lo + 8]
    torch.manual_seed(dist.rank())  # different local seeds: the permutation must still agree
    linear = nn.Linear(4, 3)
    dist.broadcast_(linear.weight.data)
    dist.broadcast_(linear.bias.data)
    with torch.no_grad():
        ordered = torch.allclose(shuffled_forward(linear, x, splits=1), linear(x), atol=1e-6)
    bn = nn.BatchNorm1d(4, affine=False).train()
    local_mean = shuffled_forward(bn, x, splits=1).mean(0).abs().max()
    result = torch.tensor([float(ordered), float(local_mean)])
    both = dist.gather_no_grad(result[None])
    if dist.is_main():
        torch.save(both, out)
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
