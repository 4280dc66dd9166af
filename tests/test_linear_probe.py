"""The linear probe on synthetic features: convergence, the BN head, the frozen-backbone check (every protocol)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from sslcli.evaluation import linear_probe as lp
from sslcli.errors import UserError
from sslcli.evaluation.features import LabelledFeatures
from sslcli.evaluation.linear_probe import fit_linear_head, linear_probe, state_fingerprint
from sslcli.evaluation.results import topk_accuracy

NUM_CLASSES = 6


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These tensors are tiny: extra intra-op threads only add OpenMP spin-waits, which on a
    busy 2-core machine make each op up to ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def separable(n: int, *, seed: int, scale: float = 1.0, dim: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs far apart relative to their spread: linearly separable with margin."""
    centres = torch.randn(NUM_CLASSES, dim, generator=torch.Generator().manual_seed(99)) * 4
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    feats = centres[labels] + 0.5 * torch.randn(n, dim, generator=gen)
    return feats * scale + 3.0 * scale, labels  # offset: standardisation must remove it


@pytest.mark.parametrize("bn_head", [False, True])
def test_separable_features_reach_full_accuracy(bn_head: bool) -> None:
    train_x, train_y = separable(300, seed=0)
    test_x, test_y = separable(120, seed=1)
    head, loss = fit_linear_head(train_x, train_y, num_classes=NUM_CLASSES, epochs=30, batch_size=64, bn_head=bn_head)
    assert isinstance(head.norm, nn.BatchNorm1d if bn_head else nn.Identity)
    with torch.no_grad():
        acc = topk_accuracy(head(test_x), test_y)
    assert acc["top1"] >= 0.99
    assert loss < 0.1


def test_bn_head_is_affine_free_and_learns_running_stats() -> None:
    train_x, train_y = separable(200, seed=2, scale=1e3)
    # Without standardisation only the BN head copes with features of scale 1000.
    head, _ = fit_linear_head(train_x, train_y, num_classes=NUM_CLASSES, epochs=20, batch_size=50,
                              bn_head=True, standardize=False)
    assert not head.training and head.norm.weight is None and head.norm.bias is None
    assert head.norm.running_mean.abs().mean() > 100  # the stats of the raw features were tracked
    with torch.no_grad():
        assert topk_accuracy(head(separable(60, seed=3, scale=1e3)[0]), separable(60, seed=3)[1])["top1"] >= 0.99


def test_seeded_training_is_reproducible() -> None:
    x, y = separable(120, seed=4)
    a, _ = fit_linear_head(x, y, num_classes=NUM_CLASSES, epochs=5, seed=7)
    b, _ = fit_linear_head(x, y, num_classes=NUM_CLASSES, epochs=5, seed=7)
    assert torch.equal(a.fc.weight, b.fc.weight)


def test_adamw_optimizer_converges() -> None:
    x, y = separable(240, seed=5)
    head, _ = fit_linear_head(x, y, num_classes=NUM_CLASSES, epochs=30, batch_size=60, optimizer="adamw",
                              weight_decay=1e-4)
    with torch.no_grad():
        assert topk_accuracy(head(x), y)["top1"] >= 0.99


def test_bad_parameters_are_user_errors() -> None:
    x, y = separable(12, seed=6)
    for kwargs, match in [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"optimizer": "adam"}, "optimizer")]:
        with pytest.raises(UserError, match=match):
            fit_linear_head(x, y, num_classes=NUM_CLASSES, **kwargs)


class TinyBackbone(nn.Module):
    """Stands in for an encoder: parameters and a BN buffer the probe must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.dim = 4


def fake_extraction(mutate: bool) -> Any:
    """Replaces feature extraction by separable features, optionally touching a backbone weight."""

    def extract(encoder: nn.Module, *args: Any, **kwargs: Any) -> LabelledFeatures:
        if mutate:
            with torch.no_grad():
                encoder.fc.weight[0, 0] += 1e-6  # the smallest change still has to be caught
        train_x, train_y = separable(180, seed=8)
        test_x, test_y = separable(60, seed=9)
        return LabelledFeatures(train_x, train_y, test_x, test_y, NUM_CLASSES)

    return extract


def test_linear_probe_reports_accuracy_and_keeps_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lp, "extract_labelled", fake_extraction(mutate=False))
    backbone = TinyBackbone()
    before = state_fingerprint(backbone)
    metrics = linear_probe(backbone, None, None, None, epochs=20, batch_size=64).metrics  # type: ignore[arg-type]
    assert metrics["top1"] >= 0.99 and metrics["top5"] == 1.0 and metrics["train_top1"] >= 0.99
    assert state_fingerprint(backbone) == before


# Every protocol, a sweep and few-shot probes: the backbone check wraps them all.
PROBES: dict[str, dict[str, Any]] = {
    "custom": {"epochs": 2},
    "moco": {"protocol": "moco", "epochs": 2},
    "mae": {"protocol": "mae", "epochs": 2},
    "fast": {"protocol": "fast"},
    "sweep": {"lr": [0.1, 1.0], "epochs": 2},
    "shots": {"shots": [2], "seeds": 2},
}


@pytest.mark.parametrize("probe", list(PROBES))
def test_changed_backbone_raises(probe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lp, "extract_labelled", fake_extraction(mutate=True))
    with pytest.raises(RuntimeError, match="backbone changed"):
        linear_probe(TinyBackbone(), None, None, None, **PROBES[probe])  # type: ignore[arg-type]


@pytest.mark.parametrize("probe", list(PROBES))
def test_every_protocol_keeps_the_backbone(probe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lp, "extract_labelled", fake_extraction(mutate=False))
    backbone = TinyBackbone()
    before = state_fingerprint(backbone)
    report = linear_probe(backbone, None, None, None, **PROBES[probe])  # type: ignore[arg-type]
    assert state_fingerprint(backbone) == before
    assert report.params["protocol"] == PROBES[probe].get("protocol", "fast" if probe == "shots" else "custom")


def test_fingerprint_sees_buffers() -> None:
    backbone = TinyBackbone()
    before = state_fingerprint(backbone)
    backbone.bn.num_batches_tracked += 1
    assert state_fingerprint(backbone) != before
