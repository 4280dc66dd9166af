"""Single-process Shuffling BN emulation: per-sub-batch BN over a permutation, rows restored."""

import torch
from torch import nn

from sslcli.engine import shuffle_bn


def test_rows_come_back_in_order_and_bn_is_per_sub_batch() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 5) + torch.arange(16.0)[:, None]
    linear = nn.Linear(5, 3)
    with torch.no_grad():
        assert torch.allclose(shuffle_bn.shuffled_forward(linear, x, splits=4), linear(x), atol=1e-6)
    bn = nn.BatchNorm1d(5, affine=False).train()
    torch.manual_seed(1)
    out = shuffle_bn.shuffled_forward(bn, x, splits=4)
    torch.manual_seed(1)
    perm = torch.randperm(16)
    groups = [perm[i * 4:(i + 1) * 4] for i in range(4)]
    for idx in groups:  # each random sub-batch of 4 is normalised on its own
        expected = (x[idx] - x[idx].mean(0)) / torch.sqrt(x[idx].var(0, unbiased=False) + bn.eps)
        assert torch.allclose(out[idx], expected, atol=1e-4)
    full = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn.eps)
    assert not torch.allclose(out, full, atol=1e-2)
    assert "4 sub-batches" in shuffle_bn.mode(4)


def test_one_split_is_a_plain_forward() -> None:
    bn = nn.BatchNorm1d(3).train()
    x = torch.randn(8, 3)
    assert torch.allclose(shuffle_bn.shuffled_forward(bn, x, splits=1), nn.BatchNorm1d(3).train()(x), atol=1e-6)
