"""SimSiam: D(p, z) = -cos(p, z), the official head layouts, the stop-gradient (the z branch's gradient is
exactly the formula's, and switching it off adds the missing term), and the fixed-lr predictor."""

import math

import pytest
import torch
from torch import nn

from sslcli.config import build_config
from sslcli.engine.optim import apply_schedules, build_optimizer
from sslcli.losses import negative_cosine
from sslcli.methods import build_method
from sslcli.models.encoders import create_encoder

SMALL = {"dim": 16, "proj_hidden": 24, "pred_hidden": 8}


def test_negative_cosine_matches_an_explicit_loop() -> None:
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    cosines = [sum(a * b for a, b in zip(pi, zi)) / math.sqrt(sum(a * a for a in pi) * sum(b * b for b in zi))
               for pi, zi in zip(p.tolist(), z.tolist())]
    assert math.isclose(float(negative_cosine(p, z)), -sum(cosines) / 6, rel_tol=1e-5)


def test_heads_follow_the_official_code() -> None:
    method = build_method("simsiam", create_encoder("resnet18"), SMALL)
    assert [type(m).__name__ for m in method.projector] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear",
                                                                                                   "BatchNorm1d"]
    linears = [m for m in method.projector if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [24, 24, 16] and all(lin.bias is None for lin in linears)
    assert method.projector[-1].affine is False and method.projector[1].affine is True
    assert [type(m).__name__ for m in method.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert method.predictor[0].out_features == 8 and method.predictor[-1].bias is not None


def _cos_grad_wrt_first(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d cos(a_i, b_i) / d a_i, row by row, written out: b/(|a||b|) - (a.b) a / (|a|^3 |b|)."""
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    dot = (a * b).sum(dim=1, keepdim=True)
    return b / (na * nb) - dot * a / (na ** 3 * nb)


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_z_branch_gradient_is_exactly_the_formulas(stop_gradient: bool) -> None:
    torch.manual_seed(0)
    method = build_method("simsiam", create_encoder("resnet18"), {**SMALL, "stop_gradient": stop_gradient}).eval()
    zs: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:  # z1, z2 with their .grad
        out.retain_grad()
        zs.append(out)

    method.projector.register_forward_hook(keep)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    method([x1, x2], {}).loss.backward()
    z1, z2 = zs
    n = z1.shape[0]
    # L = -1/(2n) sum_i [cos(p1_i, sg(z2_i)) + cos(p2_i, sg(z1_i))]: z1 gets gradient only through p1 = h(z1)
    z1_leaf = z1.detach().requires_grad_()
    p1, p2 = method.predictor(z1_leaf), method.predictor(z2.detach())
    (through_predictor,) = torch.autograd.grad(p1, z1_leaf, grad_outputs=-_cos_grad_wrt_first(p1, z2.detach()) / (2 * n))
    expected = through_predictor
    if not stop_gradient:  # the term the stop-gradient removes: z1 as the target of p2
        expected = expected - _cos_grad_wrt_first(z1.detach(), p2.detach()) / (2 * n)
    assert torch.allclose(z1.grad, expected, atol=1e-7), (z1.grad - expected).abs().max()
    if not stop_gradient:  # the removed term is not negligible: the test tells the two apart
        assert (z1.grad - through_predictor).abs().max() > 100 * 1e-7


def test_predictor_keeps_the_base_lr_and_every_parameter_is_decayed() -> None:
    method = build_method("simsiam", create_encoder("resnet18"), SMALL)
    cfg = build_config("simsiam", None, {}, []).optim
    opt = build_optimizer(method.param_groups(), cfg, lr=0.1)
    lr, wd = apply_schedules(opt, cfg, 0.1, epoch=50, total_epochs=100)  # halfway down the cosine
    assert lr == pytest.approx(0.05) and wd == 1e-4
    predictor = {id(p) for p in method.predictor.parameters()}
    for group in opt.param_groups:
        in_predictor = {id(p) in predictor for p in group["params"]}
        assert len(in_predictor) == 1  # a group is all predictor or all the rest
        assert group["lr"] == (0.1 if in_predictor == {True} else lr) and group["weight_decay"] == wd
    assert sum(len(g["params"]) for g in opt.param_groups) == len([p for p in method.parameters() if p.requires_grad])



def test_wd_all_false_exempts_biases_and_norms_and_the_small_recipe_uses_it() -> None:
    method = build_method("simsiam", create_encoder("resnet18"), {**SMALL, "wd_all": False, "fix_pred_lr": False})
    groups = method.param_groups()
    assert {g["apply_wd"] for g in groups} == {True, False} and not any(g["fixed_lr"] for g in groups)
    for group in groups:
        assert all((p.ndim > 1) == group["apply_wd"] for p in group["params"])
    small = build_config("simsiam", "small", {}, [])
    assert small.method_args["wd_all"] is False and small.method_args["proj_last_norm"] is None
    head = build_method("simsiam", create_encoder("resnet18"), small.method_args).projector
    assert not isinstance(head[-1], torch.nn.BatchNorm1d)  # Table 4 (b): no BN on the projector's output

def test_paper_recipe() -> None:
    cfg = build_config("simsiam", None, {}, [])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum) == ("sgd", 0.05, 1e-4, 0.9)
    assert (cfg.batch_size, cfg.epochs, cfg.optim.schedule, cfg.optim.warmup_epochs) == (512, 100, "cosine", 0)
    assert (cfg.method_args["dim"], cfg.method_args["pred_hidden"], cfg.method_args["stop_gradient"]) == (2048, 512, True)
