"""Queue, EMA, schedule, heads and optimiser groups."""

import math

import pytest
import torch
from torch import nn

from sslcli.engine.ema import ema_update_, make_target
from sslcli.engine.feature_queue import FeatureQueue
from sslcli.engine.optim import OptimConfig, apply_schedules, build_optimizer, param_groups
from sslcli.engine.schedule import schedule
from sslcli.models.heads import build_mlp, mlp_layers


def test_queue_is_fifo_and_wraps() -> None:
    q = FeatureQueue(size=5, dim=2)
    batches = [torch.full((2, 2), float(i)) for i in range(1, 5)]  # 8 keys into 5 slots
    for b in batches:
        q.enqueue(b)
    newest_five = torch.cat(batches)[-5:, 0]
    ptr = int(q.ptr)
    ring_order = torch.cat([q.keys[ptr:], q.keys[:ptr]])[:, 0]  # oldest -> newest
    assert torch.equal(ring_order, newest_five)
    assert ptr == 8 % 5


def test_queue_negatives_are_a_snapshot() -> None:
    q = FeatureQueue(size=4, dim=3)
    snap = q.negatives()
    q.enqueue(torch.ones(2, 3))
    assert not torch.equal(snap, q.keys)


def test_ema_moves_by_the_right_amount() -> None:
    online = nn.Linear(3, 2)
    target = make_target(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    before = [p.clone() for p in target.parameters()]
    ema_update_(target, online, momentum=0.9)
    for b, t, o in zip(before, target.parameters(), online.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * o)
        assert not t.requires_grad


def test_ema_momentum_one_freezes_and_zero_copies() -> None:
    online, target = nn.Linear(2, 2), nn.Linear(2, 2)
    frozen = [p.clone() for p in target.parameters()]
    ema_update_(target, online, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, target.parameters()))
    ema_update_(target, online, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(online.parameters(), target.parameters()))


def test_schedule_values() -> None:
    assert schedule(0, 100, start=1.0, end=0.0) == 1.0
    assert math.isclose(schedule(50, 100, start=1.0, end=0.0), 0.5)
    assert math.isclose(schedule(100, 100, start=1.0, end=0.0), 0.0, abs_tol=1e-12)
    assert schedule(200, 100, start=1.0, end=0.0) == 0.0  # holds past the end
    # warm-up: linear from 0 to start over 10 steps, then cosine over the remaining 90
    assert math.isclose(schedule(5, 100, start=2.0, end=0.0, warmup=10), 1.0)
    assert math.isclose(schedule(55, 100, start=2.0, end=0.0, warmup=10), 1.0)
    # EMA momentum 0.996 -> 1 (BYOL)
    assert math.isclose(schedule(0.5, 1.0, start=0.996, end=1.0), 0.998)
    # teacher temperature warm-up then constant (DINO)
    assert math.isclose(schedule(15, 100, start=0.07, warmup=30, warmup_from=0.04, kind="constant"), 0.055)
    assert schedule(60, 100, start=0.07, warmup=30, warmup_from=0.04, kind="constant") == 0.07
    assert math.isclose(schedule(25, 100, start=1.0, end=0.0, kind="linear"), 0.75)


def test_heads_are_built_from_layer_specs() -> None:
    head = build_mlp(16, mlp_layers(32, 8, depth=3, last_norm="bn"))
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert head[0].bias is None and head(torch.randn(4, 16)).shape == (4, 8)
    plain = build_mlp(16, [(32, None, "relu"), (8, None, None)])
    assert [type(m).__name__ for m in plain] == ["Linear", "ReLU", "Linear"] and plain[0].bias is not None
    with pytest.raises(ValueError):
        build_mlp(4, [(4, "groupnorm?", None)])


def test_param_groups_exclude_norms_and_biases_from_decay() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    groups = param_groups(model, fixed_lr=(model[2],))
    opt = build_optimizer(groups, OptimConfig(name="sgd", weight_decay=0.1), lr=1.0)
    lr, wd = apply_schedules(opt, OptimConfig(name="sgd", lr=1.0, weight_decay=0.1, warmup_epochs=0), 1.0, 5, 10)
    assert math.isclose(lr, 0.5) and wd == 0.1
    for g in opt.param_groups:
        assert g["weight_decay"] == (0.1 if g["apply_wd"] else 0.0)
        assert g["lr"] == (1.0 if g["fixed_lr"] else 0.5)
        if not g["apply_wd"]:
            assert all(p.ndim == 1 for p in g["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_optimizers_reduce_a_quadratic(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    opt = build_optimizer(param_groups(model), OptimConfig(name=name, weight_decay=1e-4), lr=0.05)
    for g in opt.param_groups:
        g["weight_decay"] = 1e-4 if g["apply_wd"] else 0.0
    first = None
    for _ in range(50):
        loss = nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_step_schedule_multiplies_at_each_milestone() -> None:
    values = [schedule(e, 200, start=0.03, kind="step", milestones=(120, 160)) for e in (0, 119.9, 120, 159, 160, 199)]
    assert values == pytest.approx([0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003])
    assert schedule(0.5, 200, start=0.03, warmup=1, kind="step", milestones=(120,)) == pytest.approx(0.015)
