"""BYOL: the 2 - 2 cos loss, symmetrised against an EMA target that no gradient reaches, the cosine
tau schedule, the heads with and without BN, and the paper recipe's asymmetric views."""

import math

import pytest
import torch

from sslcli.config import build_config
from sslcli.errors import UserError
from sslcli.losses import byol_loss
from sslcli.methods import build_method
from sslcli.models.encoders import create_encoder

SMALL = {"dim": 16, "mlp_hidden": 32}


def test_byol_loss_is_the_squared_distance_of_unit_vectors() -> None:
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    rows = []
    for pi, zi in zip(p.tolist(), z.tolist()):
        norm_p, norm_z = math.sqrt(sum(v * v for v in pi)), math.sqrt(sum(v * v for v in zi))
        rows.append(sum((a / norm_p - b / norm_z) ** 2 for a, b in zip(pi, zi)))
    assert math.isclose(float(byol_loss(p, z)), sum(rows) / len(rows), rel_tol=1e-5)
    assert float(byol_loss(p, 3 * p)) == pytest.approx(0.0, abs=1e-6)  # scale-free: same direction, no loss
    assert float(byol_loss(p, -p)) == pytest.approx(4.0, abs=1e-6)


def test_step_loss_is_symmetric_and_no_gradient_reaches_the_target() -> None:
    torch.manual_seed(0)
    method = build_method("byol", create_encoder("resnet18"), SMALL).eval()  # eval BN: a re-run gives the same
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    out = method([x1, x2], {})
    with torch.no_grad():
        p1, p2 = method.predictor(method.online(x1)), method.predictor(method.online(x2))
        t1, t2 = method.target(x1), method.target(x2)
    assert torch.allclose(out.loss, byol_loss(p1, t2) + byol_loss(p2, t1), atol=1e-6)
    assert out.embedding.shape == (4, 16)
    out.loss.backward()
    target = list(method.target.parameters())
    assert target and all(not p.requires_grad and p.grad is None for p in target)
    assert {n for n, _ in method.target.named_parameters()} == {n for n, _ in method.online.named_parameters()}
    assert method.predictor[0].weight.grad.abs().sum() > 0 and method.backbone.model.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("progress, tau", [(0.0, 0.996), (0.5, 0.998), (1.0, 1.0)])
def test_target_is_an_ema_with_tau_cosine_to_one(progress: float, tau: float) -> None:
    method = build_method("byol", create_encoder("resnet18"), SMALL)
    assert method.tau(progress) == pytest.approx(tau)
    before = [p.clone() for p in method.target.parameters()]
    with torch.no_grad():
        for p in method.online.parameters():
            p.add_(1.0)
    method.after_step(progress)
    for t, t0 in zip(method.target.parameters(), before):  # moved (1 - tau) of the way to the online net
        assert torch.allclose(t - t0, torch.full_like(t, 1 - tau), atol=1e-6)


def test_heads_with_and_without_batch_norm() -> None:
    method = build_method("byol", create_encoder("resnet18"), SMALL)
    for head in (method.online[1], method.predictor):
        assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
        assert head[0].out_features == 32 and head[-1].out_features == 16 and head[-1].bias is not None
    bare = build_method("byol", create_encoder("resnet18"), {**SMALL, "head_norm": None})
    for head in (bare.online[1], bare.predictor):
        assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Linear"]
    assert "collapse" in bare.describe()["heads"]
    with pytest.raises(UserError, match="head_norm"):
        build_method("byol", create_encoder("resnet18"), {**SMALL, "head_norm": "gn"})


def test_paper_recipe_has_asymmetric_views_and_the_papers_optimiser() -> None:
    cfg = build_config("byol", None, {}, [])
    assert [(v.count, v.blur_p, v.solarize_p) for v in cfg.augment.views] == [(1, 1.0, 0.0), (1, 0.1, 0.2)]
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_epochs) == ("lars", 0.2, 1.5e-6, 10)
    assert (cfg.batch_size, cfg.epochs, cfg.method_args["momentum"]) == (4096, 1000, 0.996)
    assert cfg.optim.scaled_lr(cfg.batch_size) == pytest.approx(3.2)
