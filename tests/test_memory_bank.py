"""The memory bank: proximal update arithmetic, unit-norm rows, sampling range, checkpoint round trip."""

import pytest
import torch

from sslcli.engine.memory_bank import MemoryBank


def test_rows_start_as_unit_vectors() -> None:
    bank = MemoryBank(50, 16)
    assert bank.memory.shape == (50, 16) and bank.size == 50 and bank.dim == 16
    assert torch.allclose(bank.memory.norm(dim=1), torch.ones(50), atol=1e-6)


def test_update_matches_hand_computation() -> None:
    bank = MemoryBank(4, 2)
    bank.memory.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]]))
    bank.update_(torch.tensor([2, 0]), torch.tensor([[0.0, 1.0], [0.0, 1.0]]), momentum=0.5)
    # row 2: 0.5 * (0.6, 0.8) + 0.5 * (0, 1) = (0.3, 0.9), norm sqrt(0.9)
    # row 0: 0.5 * (1, 0) + 0.5 * (0, 1) = (0.5, 0.5), norm sqrt(0.5)
    expected = torch.tensor([[0.5, 0.5], [0.0, 1.0], [0.3, 0.9], [-1.0, 0.0]])
    expected[0] /= 0.5 ** 0.5
    expected[2] /= 0.9 ** 0.5
    assert torch.allclose(bank.memory, expected, atol=1e-6)


def test_update_momentum_zero_replaces_and_one_freezes() -> None:
    bank = MemoryBank(6, 3)
    before = bank.memory.clone()
    f = torch.tensor([[3.0, 0.0, 4.0]])
    bank.update_(torch.tensor([1]), f, momentum=1.0)
    # Re-normalising an already unit row may move it by an ulp, hence allclose, not equal.
    assert torch.allclose(bank.memory, before, atol=1e-6, rtol=0)
    bank.update_(torch.tensor([1]), f, momentum=0.0)
    assert torch.allclose(bank.memory[1], torch.tensor([0.6, 0.0, 0.8]))
    assert torch.equal(bank.memory[[0, 2, 3, 4, 5]], before[[0, 2, 3, 4, 5]])


def test_rows_stay_unit_norm_after_many_updates() -> None:
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(20, 8)
    for _ in range(10):
        idx = torch.randperm(20, generator=g)[:7]
        bank.update_(idx, 5 * torch.randn(7, 8, generator=g).to(torch.bfloat16), momentum=0.5)
    assert bank.memory.dtype == torch.float32
    assert torch.allclose(bank.memory.norm(dim=1), torch.ones(20), atol=1e-5)


def test_update_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        MemoryBank(5, 4).update_(torch.tensor([0, 1]), torch.randn(3, 4), 0.5)


def test_rows_is_a_snapshot_and_keeps_index_shape() -> None:
    bank = MemoryBank(10, 4)
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    rows = bank.rows(idx)
    assert rows.shape == (2, 3, 4) and torch.equal(rows[1, 2], bank.memory[6])
    bank.update_(torch.tensor([6]), torch.ones(1, 4), momentum=0.0)
    assert not torch.equal(rows[1, 2], bank.memory[6])


def test_sampling_covers_the_range_and_is_reproducible() -> None:
    bank = MemoryBank(7, 2)
    draws = bank.sample(5000)
    assert draws.dtype == torch.long and draws.shape == (5000,)
    assert int(draws.min()) == 0 and int(draws.max()) == 6
    assert torch.bincount(draws, minlength=7).min() > 500  # uniform: ~714 each
    a = bank.sample(20, torch.Generator().manual_seed(3))
    assert torch.equal(a, bank.sample(20, torch.Generator().manual_seed(3)))


def test_state_dict_round_trip() -> None:
    bank = MemoryBank(12, 5)
    bank.update_(torch.arange(4), torch.randn(4, 5), 0.5)
    state = bank.state_dict()
    assert list(state) == ["memory"]
    other = MemoryBank(12, 5)
    assert not torch.equal(other.memory, bank.memory)
    other.load_state_dict(state)
    assert torch.equal(other.memory, bank.memory)
