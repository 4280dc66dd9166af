"""`info_nce_chunked` (issue 10): the same loss and gradients as `info_nce`, without `[N, K+1]` logits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sslcli.losses import info_nce
from sslcli.losses.chunked import info_nce_chunked

# (N, K, D, chunk_size, temperature): K a multiple of the chunk, not one, chunk == K, chunk > K, chunk 1,
# and t = 0.01, where logits reach 100 and a naive running sum of exponentials would overflow float32.
SHAPES = [(8, 64, 16, 16, 0.2), (5, 33, 7, 8, 0.07), (6, 40, 12, 40, 0.07), (4, 10, 8, 1000, 0.2),
          (3, 7, 5, 1, 0.5), (16, 257, 32, 64, 0.01)]


def _inputs(n: int, k: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Rows of uneven norms, so the normalisations' gradients matter.
    return [torch.randn(rows, d, generator=g, dtype=dtype) * torch.rand(rows, 1, generator=g, dtype=dtype).add(0.5)
            for rows in (n, n, k)]


def _loss_and_grads(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], negatives_grad: bool,
                    **kwargs: Any) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    leaves = [x.clone().requires_grad_(i < 2 or negatives_grad) for i, x in enumerate(inputs)]
    loss = fn(*leaves, **kwargs)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


def _assert_close(grad: torch.Tensor, ref: torch.Tensor) -> None:
    """Float32 agreement: at t = 0.01 logits near 100 carry absolute rounding errors near 1e-5, which the
    softmax passes on to every gradient entry whatever the order of summation, so the absolute tolerance
    scales with the gradient's largest entry (`info_nce` itself is off float64 by 1e-6 of it there)."""
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def _reference_float64(query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor, t: float) -> torch.Tensor:
    """MoCo Eq. 1 written out in float64: mean over rows of -log_softmax at the positive."""
    q, k, n = (x.double() / x.double().norm(dim=1, keepdim=True) for x in (query, key, negatives))
    pos = (q * k).sum(dim=1) / t
    logits = torch.cat([pos[:, None], q @ n.T / t], dim=1)
    return (torch.logsumexp(logits, dim=1) - pos).mean()


@pytest.mark.parametrize("negatives_grad", [False, True], ids=["queue", "negatives-with-grad"])
@pytest.mark.parametrize(("n", "k", "d", "chunk", "t"), SHAPES)
def test_equals_info_nce_in_loss_and_gradients(n: int, k: int, d: int, chunk: int, t: float,
                                               negatives_grad: bool) -> None:
    inputs = _inputs(n, k, d, seed=n * k + chunk)
    loss, grads = _loss_and_grads(info_nce_chunked, inputs, negatives_grad, temperature=t, chunk_size=chunk)
    ref_loss, ref_grads = _loss_and_grads(info_nce, inputs, negatives_grad, temperature=t)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for grad, ref in zip(grads[:2], ref_grads[:2]):
        assert grad is not None and ref is not None
        _assert_close(grad, ref)
    if negatives_grad:
        assert grads[2] is not None and ref_grads[2] is not None
        _assert_close(grads[2], ref_grads[2])
    else:
        assert grads[2] is None


@pytest.mark.parametrize(("n", "k", "d", "chunk", "t"), [SHAPES[1], SHAPES[5]])
def test_equals_an_explicit_float64_log_softmax(n: int, k: int, d: int, chunk: int, t: float) -> None:
    inputs = _inputs(n, k, d, seed=7)
    loss, grads = _loss_and_grads(info_nce_chunked, inputs, True, temperature=t, chunk_size=chunk)
    ref_loss, ref_grads = _loss_and_grads(_reference_float64, [x.double() for x in inputs], True, t=t)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    for grad, ref in zip(grads, ref_grads):
        assert grad is not None and ref is not None
        _assert_close(grad.double(), ref)


def test_gradcheck_in_float64() -> None:
    """The hand-written backward against finite differences (float64: the function without its float32 cast)."""
    leaves = [x.requires_grad_() for x in _inputs(3, 5, 4, seed=3, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda q, k, n: info_nce_chunked.__wrapped__(q, k, n, 0.3, chunk_size=2),
                                    leaves)


def test_bf16_inputs_under_autocast_run_in_float32() -> None:
    low = [x.bfloat16().requires_grad_() for x in _inputs(8, 50, 16, seed=5)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = info_nce_chunked(*low, 0.07, chunk_size=16)
    exact = info_nce_chunked(*[x.detach().float() for x in low], 0.07, chunk_size=16)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, exact)
    torch.testing.assert_close(mixed, info_nce(*[x.detach().float() for x in low], 0.07), rtol=1e-6, atol=1e-6)
    mixed.backward()
    assert all(x.grad is not None and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all() for x in low)


def test_keeps_no_n_by_k_tensor_for_backward() -> None:
    """What autograd saves: `info_nce` an [N, K+1] log-softmax, the chunked loss nothing wider than D or the chunk."""
    n, k, d, chunk = 4, 96, 8, 32

    def widest_saved(fn: Callable[..., torch.Tensor], **kwargs: Any) -> int:
        widths: list[int] = []

        def pack(x: torch.Tensor) -> torch.Tensor:
            widths.append(x.shape[-1] if x.dim() == 2 and x.shape[0] == n else 0)
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn(*[x.requires_grad_(i < 2) for i, x in enumerate(_inputs(n, k, d, seed=0))], 0.2, **kwargs)
        return max(widths)

    assert widest_saved(info_nce) == k + 1
    assert widest_saved(info_nce_chunked, chunk_size=chunk) == d


def test_an_empty_queue_and_a_bad_chunk_size() -> None:
    q, k, _ = _inputs(4, 0, 8, seed=1)
    empty = torch.empty(0, 8)
    torch.testing.assert_close(info_nce_chunked(q, k, empty, 0.2), info_nce(q, k, empty, 0.2))
    with pytest.raises(ValueError, match="chunk_size"):
        info_nce_chunked(q, k, F.normalize(k), 0.2, chunk_size=0)


def test_moco_with_loss_chunk_takes_the_reference_step() -> None:
    """``method_args.loss_chunk`` swaps the loss only: the same MoCo v2 step, loss and gradients."""
    from sslcli.config import CropOptions, build_config
    from sslcli.runs import build_run_method

    views = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    results = []
    for chunk in (0, 300):  # a queue of 1024 seeded random keys: 3 full chunks and a part
        torch.manual_seed(0)
        cfg = build_config("mocov2", "small", {"arch": "resnet18", "method_args": {"queue_size": 1024, "loss_chunk": chunk}},
                           crops=CropOptions(global_size=16))
        method = build_run_method(cfg).train()
        assert (method.contrast is info_nce) == (chunk == 0) and method.queue.size == 1024
        torch.manual_seed(4)  # the Shuffling-BN permutation
        out = method(views, {})
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad for p in method.parameters() if p.grad is not None]))
    (loss_ref, grads_ref), (loss_chunked, grads_chunked) = results
    torch.testing.assert_close(loss_chunked, loss_ref, rtol=1e-6, atol=1e-6)
    assert len(grads_ref) == len(grads_chunked) > 0
    for a, b in zip(grads_chunked, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
