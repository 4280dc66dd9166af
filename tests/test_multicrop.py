"""Multi-crop: one encoder call per resolution group, same outputs as one call per crop."""

import torch

from sslcli.engine.multicrop import forward_by_resolution, resolution_groups
from sslcli.models.encoders import create_encoder


def _views() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32),
            torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)]


def test_groups_are_runs_of_equal_shapes() -> None:
    views = _views()
    assert resolution_groups(views) == [(0, 2), (2, 5)]
    assert resolution_groups(views[:1]) == [(0, 1)]
    # A size that comes back later is a new group: order is kept, never re-sorted.
    assert resolution_groups([views[0], views[2], views[1]]) == [(0, 1), (1, 2), (2, 3)]
    assert resolution_groups([]) == []


def test_grouped_forward_equals_one_call_per_crop_and_calls_once_per_group() -> None:
    encoder = create_encoder("resnet18").eval()  # eval-mode BN treats samples independently
    calls: list[int] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return encoder(x)

    views = _views()
    with torch.no_grad():
        grouped = forward_by_resolution(fn, views)
        separate = [encoder(v) for v in views]
    assert calls == [6, 9]
    assert len(grouped) == len(views)
    for g, s in zip(grouped, separate):
        torch.testing.assert_close(g, s, rtol=1e-4, atol=1e-5)


def test_gradients_flow_to_every_crop() -> None:
    views = [v.requires_grad_() for v in _views()]
    out = forward_by_resolution(lambda x: x.mean(dim=(1, 2, 3), keepdim=False)[:, None] * 2, views)
    sum(o.sum() for o in out).backward()
    for v in views:
        assert v.grad is not None and torch.all(v.grad != 0)
