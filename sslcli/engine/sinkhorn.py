"""Sinkhorn-Knopp equipartition: SwAV's codes (Caron et al., 2020, Sec. 3.1 and App. A.1).

The codes ``Q`` of a batch of ``B`` samples over ``K`` prototypes maximise
``Tr(Q^T C^T Z) + eps H(Q)`` over the transportation polytope
``{Q >= 0 : Q 1_B = 1/K 1_K, Q^T 1_K = 1/B 1_B}``: every prototype receives the same share of
the batch, so the trivial solution (all samples on one prototype) is excluded.  The solution is
``Diag(u) exp(C^T Z / eps) Diag(v)``, found by a few alternating normalisations (the official
``distributed_sinkhorn``):

    Q = exp(scores / eps).T                  # [K, B]
    Q /= sum(Q)
    repeat n: Q /= row sums; Q /= K          # each prototype holds 1/K of the mass
              Q /= column sums; Q /= B       # each sample holds 1/B
    Q *= B                                   # each sample's code sums to 1

The batch axis is split across ranks: the total and the row sums are all-reduced, the column
sums are local (a column is one sample), so ``R`` ranks x ``B/R`` give the codes of ``1 x B``.
"""

from __future__ import annotations

import torch

from sslcli import distributed as dist


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Codes ``[B_local, K]`` (rows sum to 1) for prototype ``scores`` ``[B_local, K]`` of this rank's samples.

    Computed in float32 whatever the input dtype.  After the last (column) normalisation every
    code sums to 1 exactly; the prototypes' totals are ``B_global / K`` only up to the
    convergence of ``iterations`` steps (SwAV uses 3: an approximate equipartition suffices).
    """
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"sinkhorn needs epsilon > 0 and iterations >= 1, got {epsilon}, {iterations}")
    scores = scores.detach().float()
    # exp(s / eps) overflows float32 past s / eps ~ 88; a shift shared by all ranks is cancelled
    # by the first normalisation, so the global max is subtracted (a per-rank max would not cancel).
    shift = dist.gather_no_grad(scores.max().reshape(1)).max()
    q = torch.exp((scores - shift) / epsilon).T  # [K, B_local]
    num_prototypes = q.shape[0]
    batch = dist.all_reduce_sum_(torch.tensor(float(q.shape[1]), device=q.device))  # B_global

    q /= dist.all_reduce_sum_(q.sum())
    for _ in range(iterations):
        q /= dist.all_reduce_sum_(q.sum(dim=1, keepdim=True))
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    q *= batch
    return q.T
