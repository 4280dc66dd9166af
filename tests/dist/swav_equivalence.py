"""Sinkhorn and one SwAV step (multi-crop, a full queue in use) on a fixed global batch.

Usage: ``swav_equivalence.py OUT``.  Launched as a plain process (1 rank x B) or by torchrun
(N ranks x B/N); tests/test_swav.py compares the two.  Every rank seeds the same way, so weights
and queue agree; BatchNorm runs in eval mode so per-rank batch statistics do not mask what is
under test: the all-reduced Sinkhorn sums, each rank's share of the queue, the gathered enqueue.
"""

import sys
from pathlib import Path

import torch

from sslcli import distributed as dist
from sslcli.engine.sinkhorn import sinkhorn
from sslcli.methods import build_method
from sslcli.models.encoders import create_encoder
from sharded_step import local_rows, sharded_step

B, K, QUEUE = 8, 6, 12


def main(out: Path) -> None:
    dist.init_from_env(torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(B, K, generator=g)
    codes = dist.gather_no_grad(sinkhorn(scores[local_rows(B)], epsilon=0.1, iterations=3))

    torch.manual_seed(0)
    args = {"proj_hidden": 32, "proj_dim": 16, "num_prototypes": K, "queue_length": QUEUE, "queue_start_epoch": 0}
    method = build_method("swav", create_encoder("resnet18"), args, epochs=10)
    method.eval()
    method.queued.fill_(QUEUE)  # a full queue: it joins Sinkhorn in this step
    views = [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)] + [torch.randn(B, 3, 16, 16, generator=g)
                                                                           for _ in range(2)]
    loss, grads = sharded_step(method, views)
    if dist.is_main():
        torch.save({"codes": codes, "loss": loss, "grads": grads, "queue": method.queues[0].keys.clone(),
                    "world": dist.world_size()}, out)
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
