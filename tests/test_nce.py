"""InstDisc's NCE loss against an independent, loop-based reference (Wu et al., 2018, Eqs. 4-7)."""

import math

import pytest
import torch

from sslcli.losses.nce import estimate_partition, nce_loss


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def nce_reference(f: torch.Tensor, pos: torch.Tensor, noise: torch.Tensor, t: float, z: float, n: int) -> float:
    """The paper's formulas written out: P = exp(cos / t) / Z, h = P / (P + m / N), per sample and noise row."""
    f, pos, noise = f.double(), pos.double(), noise.double()
    m = noise.shape[-2]
    p_n = 1.0 / n
    total = 0.0
    for b in range(f.shape[0]):
        rows = noise if noise.ndim == 2 else noise[b]
        p = math.exp(_cos(f[b], pos[b]) / t) / z
        total -= math.log(p / (p + m * p_n))
        for j in range(m):
            p = math.exp(_cos(f[b], rows[j]) / t) / z
            total -= math.log(1 - p / (p + m * p_n))
    return total / f.shape[0]


@pytest.mark.parametrize("t", [0.07, 0.5])
def test_nce_matches_reference_with_shared_noise(t: float) -> None:
    g = torch.Generator().manual_seed(0)
    f, pos, noise = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g)
    for z in (3.0, 250.0):
        got = nce_loss(f, pos, noise, t, z, num_samples=40).item()
        assert math.isclose(got, nce_reference(f, pos, noise, t, z, 40), rel_tol=1e-5)


def test_nce_matches_reference_with_per_sample_noise() -> None:
    g = torch.Generator().manual_seed(1)
    f, pos, noise = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(4, 9, 6, generator=g)
    got = nce_loss(f, pos, noise, 0.1, torch.tensor(60.0), num_samples=100).item()
    assert math.isclose(got, nce_reference(f, pos, noise, 0.1, 60.0, 100), rel_tol=1e-5)


def test_nce_stays_finite_where_the_naive_formula_overflows() -> None:
    f = torch.eye(3)
    loss = nce_loss(f, f, torch.eye(3), 0.001, 1e-3, num_samples=10)  # exp(1000) in the naive form
    assert torch.isfinite(loss)


def test_nce_rewards_matching_the_positive_and_pushes_noise_away() -> None:
    f = torch.eye(4)
    noise = -torch.eye(4)  # far from every feature
    aligned = nce_loss(f, f, noise, 0.07, 100.0, num_samples=100)
    assert aligned < nce_loss(f, torch.roll(f, 1, dims=0), noise, 0.07, 100.0, num_samples=100)
    assert aligned < nce_loss(f, f, f, 0.07, 100.0, num_samples=100)


def test_nce_gradient_reaches_only_the_features() -> None:
    f = torch.randn(3, 4, requires_grad=True)
    pos, noise = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4)
    nce_loss(f, pos.detach(), noise, 0.07, 10.0, num_samples=20).backward()
    assert f.grad is not None and f.grad.abs().sum() > 0 and pos.grad is None


def test_partition_estimate_is_n_times_mean_exp() -> None:
    g = torch.Generator().manual_seed(2)
    f, noise = torch.randn(3, 5, generator=g), torch.randn(4, 5, generator=g)
    ref = sum(math.exp(_cos(f[b], noise[j]) / 0.07) for b in range(3) for j in range(4)) / 12 * 1000
    assert math.isclose(estimate_partition(f, noise, 0.07, 1000).item(), ref, rel_tol=1e-5)
    per_sample = noise[None].expand(3, 4, 5)
    assert torch.allclose(estimate_partition(f, per_sample, 0.07, 1000), estimate_partition(f, noise, 0.07, 1000))
