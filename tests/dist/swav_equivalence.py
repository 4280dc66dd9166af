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

B, K, QUEUE = 8, 6, 12


def main(out: Path) -> None:
    dist.init_from_env(torch.device("cpu"))
    n = B // dist.world_size()
    lo = dist.rank() * n
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(B, K, generator=g)
    codes = dist.gather_no_grad(sinkhorn(scores[lo:lo + n], epsilon=0.1, iterations=3))

    torch.manual_seed(0)
    args = {"proj_hidden": 32, "proj_dim": 16, "num_prototypes": K, "queue_length": QUEUE, "queue_start_epoch": 0}
    method = build_method("swav", create_encoder("resnet18"), args, epochs=10)
    method.eval()
    method.queued.fill_(QUEUE)  # a full queue: it joins Sinkhorn in this step
    views = [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)] + [torch.randn(B, 3, 16, 16, generator=g)
                                                                           for _ in range(2)]
    model = dist.wrap_ddp(method, torch.device("cpu"))
    step = model([v[lo:lo + n] for v in views], {})
    step.loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in method.named_parameters() if p.grad is not None}
    loss = dist.all_reduce_mean(step.loss.detach())
    if dist.is_main():
        torch.save({"codes": codes, "loss": loss, "grads": grads, "queue": method.queues[0].keys.clone(),
                    "world": dist.world_size()}, out)
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
