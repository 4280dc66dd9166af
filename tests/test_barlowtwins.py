"""Barlow Twins: the loss against explicit loops, the projector layout, the bias learning rate, and the
global-batch cross-correlation (2 gloo ranks equal 1 process, loss and gradients)."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from sslcli.config import build_config
from sslcli.engine.optim import OptimConfig, apply_schedules, build_optimizer, param_groups
from sslcli.losses import barlow_twins_loss
from sslcli.methods import build_method
from sslcli.models.encoders import create_encoder

from dist_launch import run_single, torchrun


def _reference_loss(z1: list[list[float]], z2: list[list[float]], lambd: float, eps: float = 1e-5) -> float:
    n, d = len(z1), len(z1[0])

    def standardise(z: list[list[float]]) -> list[list[float]]:
        cols = []
        for j in range(d):
            col = [row[j] for row in z]
            mean = sum(col) / n
            var = sum((v - mean) ** 2 for v in col) / n
            cols.append([(v - mean) / math.sqrt(var + eps) for v in col])
        return [[cols[j][b] for j in range(d)] for b in range(n)]

    a, b = standardise(z1), standardise(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[k][i] * b[k][j] for k in range(n)) / n
            loss += (1 - c_ij) ** 2 if i == j else lambd * c_ij ** 2
    return loss


def test_loss_matches_explicit_loops() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    ref = _reference_loss(z1.tolist(), z2.tolist(), 0.3)
    assert math.isclose(float(barlow_twins_loss(z1, z2, 0.3)), ref, rel_tol=1e-5)


def test_identical_decorrelated_views_have_zero_loss_and_shift_scale_do_not_matter() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, dtype=torch.float64, generator=g)
    # QR of centred columns: orthonormal columns that stay zero-mean, i.e. exactly decorrelated
    q, _ = torch.linalg.qr(x - x.mean(0))
    z = q * 10 + 3  # any scale and offset
    assert float(barlow_twins_loss(z, 2 * z + 1)) == pytest.approx(0.0, abs=1e-6)
    z1, z2 = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    assert torch.allclose(barlow_twins_loss(z1, z2), barlow_twins_loss(5 * z1 - 2, z2 + 7), atol=1e-4)


def test_projector_layout() -> None:
    method = build_method("barlowtwins", create_encoder("resnet18"), {"proj_hidden": 32, "proj_dim": 24})
    assert [type(m).__name__ for m in method.projector] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    linears = [m for m in method.projector if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [32, 32, 24] and all(lin.bias is None for lin in linears)


def test_biases_and_norms_take_their_own_learning_rate() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    cfg = OptimConfig(name="lars", lr=0.2, bias_lr=0.0048, weight_decay=1.5e-6, warmup_epochs=10)
    opt = build_optimizer(param_groups(model), cfg, lr=1.6)
    lr, _ = apply_schedules(opt, cfg, 1.6, epoch=5, total_epochs=100)  # half way through warm-up
    assert lr == pytest.approx(0.8)
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(0.8 if group["apply_wd"] else 0.8 * 0.0048 / 0.2)
    paper = build_config("barlowtwins", None, {}, []).optim
    assert (paper.lr, paper.bias_lr, paper.weight_decay, paper.warmup_epochs) == (0.2, 0.0048, 1.5e-6, 10)


def test_two_ranks_equal_one_rank(tmp_path: Path) -> None:
    """Statistics and C over the global batch: the 2-rank loss and gradients are the 1-process ones."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    args = json.dumps({"proj_hidden": 32, "proj_dim": 16, "lambd": 0.05})
    run_single("step_equivalence.py", "barlowtwins", args, str(one))
    torchrun("step_equivalence.py", "barlowtwins", args, str(two))
    a, b = torch.load(one), torch.load(two)
    assert (a["world"], b["world"]) == (1, 2)
    assert torch.allclose(a["loss"], b["loss"], atol=1e-5)
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 10
    for key in a["grads"]:
        # float32 noise scales with the tensor's magnitude (entries up to ~60 sit beside exact zeros)
        scale = 1 + float(a["grads"][key].abs().max())
        assert torch.allclose(a["grads"][key], b["grads"][key], rtol=1e-4, atol=1e-6 * scale), key
