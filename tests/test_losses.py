"""Each loss against an independent, loop-based reference computation."""

import math

import torch

from sslcli.losses import in_batch_contrastive, info_nce, nt_xent


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR Eq. 1 written out: for each of the 2N anchors, -log softmax at its positive."""
    z = torch.cat([z1, z2]).double()
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = (i + n) % n2
        denom = sum(math.exp(_cos(z[i], z[j]) / t) for j in range(n2) if j != i)
        total += -math.log(math.exp(_cos(z[i], z[pos]) / t) / denom)
    return total / n2


def test_nt_xent_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for t in (0.1, 0.5):
        assert math.isclose(nt_xent(z1, z2, t).item(), nt_xent_reference(z1, z2, t), rel_tol=1e-5)


def test_nt_xent_with_global_keys_equals_full_batch_slices() -> None:
    """Anchors of one rank against gathered keys: the mean of the per-rank losses is the full loss."""
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    full = nt_xent(z1, z2, 0.2)
    halves = [nt_xent(z1[r * 4:(r + 1) * 4], z2[r * 4:(r + 1) * 4], 0.2, keys1=z1, keys2=z2, offset=r * 4)
              for r in range(2)]
    assert torch.allclose((halves[0] + halves[1]) / 2, full, atol=1e-6)


def test_nt_xent_is_low_for_aligned_views() -> None:
    z = torch.eye(8)
    assert nt_xent(z, z, 0.1) < nt_xent(z, torch.roll(z, 1, dims=0), 0.1)


def info_nce_reference(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> float:
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(_cos(q[i], k[i]) / t)
        neg = sum(math.exp(_cos(q[i], queue[j]) / t) for j in range(queue.shape[0]))
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


def test_info_nce_matches_reference() -> None:
    g = torch.Generator().manual_seed(2)
    q, k, queue = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(7, 6, generator=g)
    for t in (0.07, 0.2):
        assert math.isclose(info_nce(q, k, queue, t).item(), info_nce_reference(q, k, queue, t), rel_tol=1e-5)


def test_info_nce_gradient_flows_only_through_query() -> None:
    q = torch.randn(4, 3, requires_grad=True)
    k = torch.randn(4, 3)
    info_nce(q, k, torch.randn(10, 3), 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def in_batch_reference(q: torch.Tensor, k: torch.Tensor, t: float, offset: int) -> float:
    total = 0.0
    for i in range(q.shape[0]):
        denom = sum(math.exp(_cos(q[i], k[j]) / t) for j in range(k.shape[0]))
        total += -math.log(math.exp(_cos(q[i], k[offset + i]) / t) / denom)
    return total / q.shape[0]


def test_in_batch_contrastive_matches_reference() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(3, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    for offset in (0, 2, 4):
        got = in_batch_contrastive(q, k, 0.2, offset=offset).item()
        assert math.isclose(got, in_batch_reference(q, k, 0.2, offset), rel_tol=1e-5)


def test_in_batch_contrastive_on_a_rank_slice_equals_full_batch_rows() -> None:
    torch.manual_seed(1)
    q, k = torch.randn(8, 4), torch.randn(8, 4)
    full = in_batch_contrastive(q, k, 0.5)
    halves = [in_batch_contrastive(q[r * 4:(r + 1) * 4], k, 0.5, offset=r * 4) for r in range(2)]
    assert torch.allclose(full, sum(halves) / 2, atol=1e-6)


def test_nt_xent_with_memory_negatives_matches_reference() -> None:
    """SimCLR v2's memory: the K buffered keys join every anchor's denominator, and nothing else changes."""
    g = torch.Generator().manual_seed(5)
    z1, z2, memory = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(7, 6, generator=g)
    t = 0.2
    z = torch.cat([z1, z2]).double()
    total = 0.0
    for i in range(8):
        pos = (i + 4) % 8
        denom = sum(math.exp(_cos(z[i], z[j]) / t) for j in range(8) if j != i)
        denom += sum(math.exp(_cos(z[i], m.double()) / t) for m in memory)
        total += -math.log(math.exp(_cos(z[i], z[pos]) / t) / denom)
    assert math.isclose(float(nt_xent(z1, z2, t, negatives=memory)), total / 8, rel_tol=1e-5)
    assert float(nt_xent(z1, z2, t, negatives=memory)) > float(nt_xent(z1, z2, t))


def test_distillation_loss_matches_formula() -> None:
    """-sum_y P_T(y|x; t) log P_S(y|x; t), averaged over the batch, no gradient into the teacher."""
    from sslcli.losses import distillation_loss

    g = torch.Generator().manual_seed(2)
    student = torch.randn(3, 5, generator=g, requires_grad=True)
    teacher = torch.randn(3, 5, generator=g, requires_grad=True)
    for t in (1.0, 2.0):
        expected = 0.0
        for s_row, t_row in zip(student.double(), teacher.double()):
            p_t = [math.exp(v / t) for v in t_row.tolist()]
            p_s = [math.exp(v / t) for v in s_row.tolist()]
            expected -= sum(pt / sum(p_t) * math.log(ps / sum(p_s)) for pt, ps in zip(p_t, p_s))
        assert math.isclose(distillation_loss(student, teacher, t).item(), expected / 3, rel_tol=1e-5)
    distillation_loss(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None
    # Its minimum over students is the teacher's own distribution: the gradient vanishes there.
    same = teacher.detach().clone().requires_grad_(True)
    distillation_loss(same, teacher).backward()
    assert same.grad.abs().max() < 1e-6
