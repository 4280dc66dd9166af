"""MoCo's InfoNCE against a large queue, computed chunk by chunk of the queue (issue 10).

:func:`sslcli.losses.info_nce` builds the whole ``[N, K+1]`` logit matrix, and autograd keeps it (and
its log-softmax) for the backward pass.  :func:`info_nce_chunked` is the same loss through a custom
autograd function that never holds more than one ``[N, chunk]`` block: the forward pass streams a
log-sum-exp over the queue, and the backward pass recomputes each block's logits from the saved
embeddings (a second ``N x K x D`` matrix product: memory traded for compute, as in memory-efficient
attention).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

from sslcli.losses.float32 import float32_loss

DEFAULT_CHUNK = 8192


class _ChunkedInfoNCE(torch.autograd.Function):
    """InfoNCE of L2-normalised ``q``, ``k`` ``[N, D]`` against ``n`` ``[K, D]``, the positive at index 0.

    Saved for backward: ``q``, ``k``, ``n`` (the normalised queue, ``K x D``, is the one large tensor, and
    `info_nce`'s matrix product keeps it too), the per-row positive logit and log-sum-exp (``[N]`` each).
    Nothing of size ``N x K``.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, q: torch.Tensor, k: torch.Tensor, n: torch.Tensor,  # type: ignore[override]
                temperature: float, chunk_size: int) -> torch.Tensor:
        # Folding 1/t into the [N, D] query scales N*D numbers instead of every N*K logit.
        q_t = q / temperature
        l_pos = (q_t * k).sum(dim=1)  # [N]
        lse = l_pos  # running log(exp(l_pos) + sum of exp over the chunks seen so far)
        for start in range(0, n.shape[0], chunk_size):
            block = q_t @ n[start : start + chunk_size].T  # [N, C]
            lse = torch.logaddexp(lse, torch.logsumexp(block, dim=1))
        ctx.save_for_backward(q, k, n, l_pos, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return (lse - l_pos).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, n, l_pos, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk_size
        need_q, need_k, need_n = ctx.needs_input_grad[:3]
        # d loss / d logit_ij = (softmax_ij - [j = 0]) / N, and d logit / d q = (key) / t.
        scale = grad_out / (q.shape[0] * t)
        pos_weight = (torch.exp(l_pos - lse) - 1).unsqueeze(1)  # [N, 1], softmax at index 0 minus the label
        grad_q = pos_weight * k if need_q else None
        grad_k = pos_weight * q * scale if need_k else None
        grad_n = torch.empty_like(n) if need_n else None
        if need_q or need_n:
            q_t = q / t  # the forward's logits, bit for bit
            for start in range(0, n.shape[0], chunk):
                n_c = n[start : start + chunk]
                probs = (q_t @ n_c.T).sub_(lse.unsqueeze(1)).exp_()  # [N, C] softmax block, in place
                if grad_q is not None:
                    grad_q.addmm_(probs, n_c)
                if grad_n is not None:
                    torch.mm(probs.T, q, out=grad_n[start : start + chunk])
        if grad_q is not None:
            grad_q.mul_(scale)
        if grad_n is not None:
            grad_n.mul_(scale)
        return grad_q, grad_k, grad_n, None, None


@float32_loss
def info_nce_chunked(query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor, temperature: float,
                     chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """:func:`~sslcli.losses.info_nce` computed ``chunk_size`` queue rows at a time, without ``[N, K+1]`` logits.

    ``L = -mean_i log( exp(q_i.k_i / t) / (exp(q_i.k_i / t) + sum_j exp(q_i.n_j / t)) )``
    (He et al., 2020, "Momentum Contrast", Eq. 1), with ``q``, ``k``, ``n`` L2-normalised here.

    Forward: ``lse_i = logaddexp(q_i.k_i / t, logsumexp_j(q_i.n_j / t))`` accumulated over chunks of the
    queue with ``logaddexp``, so no exponential overflows at any temperature; ``L = mean_i(lse_i - q_i.k_i / t)``.
    Backward, with ``p_ij = exp(q_i.n_j / t - lse_i)`` recomputed per chunk and ``p_i0`` the positive's share:
    ``dL/dq_i = ((p_i0 - 1) k_i + sum_j p_ij n_j) / (N t)``, ``dL/dk_i = (p_i0 - 1) q_i / (N t)``,
    ``dL/dn_j = sum_i p_ij q_i / (N t)`` (computed only when ``negatives`` requires grad; a queue does not).
    The normalisations are ordinary autograd ops outside the custom function, so their gradient is exact.

    Shapes: ``query`` and ``key`` ``[N, D]``, ``negatives`` ``[K, D]``; returns a scalar.  Float32 whatever
    the autocast dtype (:func:`~sslcli.losses.float32.float32_loss`).

    Memory: :func:`info_nce` holds several ``[N, K+1]`` float32 matrices at once (the similarities, the
    concatenated and the scaled logits, the log-softmax that autograd saves for backward; 64 MiB each at
    MoCo's N = 256, K = 65,536); this holds one ``[N, chunk_size]`` block at a time (8 MiB at the default
    8192) and saves only ``[N]`` vectors besides the normalised inputs.  Measured at N = 256, K = 65,536,
    D = 128 on the CPU: 224 -> 48 MiB peak over the call, 96 -> 32 MiB kept for backward (the normalised
    queue, which both keep), and 2.3x faster despite one more ``N x K x D`` matrix product in backward
    (docs/benchmarks.md, "Chunked InfoNCE over a large queue").
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    q = F.normalize(query, dim=1)
    k = F.normalize(key, dim=1)
    n = F.normalize(negatives, dim=1)
    return _ChunkedInfoNCE.apply(q, k, n, float(temperature), int(chunk_size))
