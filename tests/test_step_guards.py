"""The training loop's step-level behaviour with a toy method: NaN/inf steps are skipped without touching the
parameters or the optimiser state and stop the run when they persist; bad samples are counted and capped;
gradient accumulation and torch.compile give the gradients of the plain step; SIGUSR1 checkpoints and stops."""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sslcli.config import CropOptions, build_config
from sslcli.engine import checkpoint
from sslcli.engine.step import forward_backward
from sslcli.engine.guards import MIN_SAMPLES_FOR_BAD_FRACTION, BadSampleBudget, NonFiniteTraining, TooManyBadSamples
from sslcli.engine.metrics import MetricsLog
from sslcli.engine.optim import OptimConfig, build_optimizer
from sslcli.engine.preemption import Preempted
from sslcli.engine.resume import LoopState, RunCheckpoints
from sslcli.engine.train import LoopSettings, train
from sslcli.methods.base import Method, StepOutput
from sslcli.runs import build_run_method

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("single_thread")


class Toy(Method):
    """A per-sample squared loss of a two-layer net, so every step moves parameters and AdamW state."""

    def __init__(self) -> None:
        super().__init__(None)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        out = self.net(views[0].flatten(1))
        return StepOutput((out - 1).pow(2).sum(1).mean(), embedding=out)


def batches(n: int, *, size: int = 8, poison: set[int] = frozenset(), bad_samples: int | None = None,
            seed: int = 0) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(size, 1, 2, 2, generator=gen)
        if i in poison:
            x[0, 0, 0, 0] = float("inf")
        batch: dict[str, Any] = {"views": [x], "index": torch.arange(size)}
        if bad_samples is not None:
            batch["bad_samples"] = bad_samples
        out.append(batch)
    return out


def run(data: list[dict[str, Any]], tmp: Path, *, method: Method | None = None, compiled: bool = False,
        **settings: Any) -> tuple[Method, torch.optim.Optimizer]:
    """One epoch of ``data`` through :func:`train`, AdamW at a constant lr."""
    torch.manual_seed(0)
    tmp.mkdir(parents=True, exist_ok=True)
    method = method or Toy()
    cfg = OptimConfig(name="adamw", lr=0.01, schedule="constant", weight_decay=0.0)
    optimizer = build_optimizer(method.param_groups(), cfg, cfg.lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ckpts = RunCheckpoints(tmp / "checkpoints", method, optimizer, scaler, CPU, keep=2, steps_per_epoch=len(data),
                           extra={})
    loop_settings = LoopSettings(epochs=1, optim=cfg, base_lr=cfg.lr, device=CPU, amp_dtype=None, log_every=1,
                                 **settings)
    model = torch.compile(method) if compiled else method
    train(model, method, optimizer, scaler, lambda epoch, start: data[start:], len(data), loop_settings,
          MetricsLog(tmp / "metrics.jsonl"), ckpts, lambda epoch: None, LoopState())
    return method, optimizer


def test_an_inf_step_changes_no_parameter_and_no_optimiser_state(tmp_path: Path) -> None:
    good = batches(3)
    with_inf = [good[0], batches(2, poison={1}, seed=1)[1], good[1], good[2]]
    skipped, skipped_opt = run(with_inf, tmp_path / "a")
    plain, plain_opt = run(good, tmp_path / "b")
    for a, b in zip(skipped.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(skipped_opt.state.values(), plain_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert losses[1] != losses[1] and all(x == x for i, x in enumerate(losses) if i != 1)  # NaN: no finite step


def test_consecutive_bad_steps_stop_the_run_with_a_hint(tmp_path: Path) -> None:
    data = batches(6, poison={0, 2, 3, 4})
    with pytest.raises(NonFiniteTraining, match=r"NaN/inf for 3 steps in a row \(last at step 5\).*--lr.*precision"):
        run(data, tmp_path, max_bad_steps=3)  # the good step 2 resets the count


def test_bad_samples_are_counted_in_the_metrics_and_capped() -> None:
    budget = BadSampleBudget(0.2, CPU)
    for _ in range(MIN_SAMPLES_FOR_BAD_FRACTION // 64 - 1):
        budget.add({"bad_samples": 16}, 64)
        budget.sync()  # 25% bad, but too few samples to judge
    budget.add({}, 64)  # an older loader's batch: no count, no bad samples
    budget.sync()
    assert (budget.bad, budget.seen) == (48, MIN_SAMPLES_FOR_BAD_FRACTION)  # 18.75%: under the cap
    budget.add({"bad_samples": 32}, 64)
    with pytest.raises(TooManyBadSamples, match=r"80 of 320 samples .* max_bad_fraction 0.2"):
        budget.sync()


def test_metrics_carry_the_cumulative_bad_sample_count(tmp_path: Path) -> None:
    run(batches(4, bad_samples=1), tmp_path)
    counts = [json.loads(line)["bad_samples"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert counts == [1, 2, 3, 4]
    with pytest.raises(TooManyBadSamples):
        run(batches(40, bad_samples=2), tmp_path / "mostly-bad", max_bad_fraction=0.2)  # 25% of 320 at step 32


def test_sigusr1_checkpoints_at_the_step_boundary_and_stops(tmp_path: Path) -> None:
    data = batches(4)

    class SignalOnSecondStep(Toy):
        steps = 0

        def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
            type(self).steps += 1
            if type(self).steps == 2:
                os.kill(os.getpid(), signal.SIGUSR1)  # arrives mid-step; the step still completes
            return super().forward(views, batch)

    with pytest.raises(Preempted, match="stopped by SIGUSR1") as stop:
        run(data, tmp_path, method=SignalOnSecondStep())
    assert Path(stop.value.checkpoint).name == "epoch-0000-step-000002.pt"
    state = checkpoint.load(Path(stop.value.checkpoint))
    assert (state["loop"]["epoch"], state["loop"]["batch"]) == (0, 2)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is removed again


def rotation_vit() -> Method:
    """RotNet on a ViT: a per-sample cross-entropy with LayerNorm only, where accumulation is exact."""
    torch.manual_seed(0)
    return build_run_method(build_config("rotation", "small", {"arch": "vit_tiny_p4"}, crops=CropOptions(global_size=16)))


def gradients(method: Method, views: list[torch.Tensor], accum_steps: int, model: nn.Module | None = None) -> list:
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    forward_backward(model or method, views, {"index": torch.arange(views[0].shape[0])}, scaler, CPU, None,
                     accum_steps)
    return [p.grad.clone() for p in method.parameters() if p.grad is not None]


def test_two_accumulated_half_batches_give_the_full_batch_gradient() -> None:
    method = rotation_vit()
    views = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))]
    full = gradients(copy.deepcopy(method), views, 1)
    halves = gradients(copy.deepcopy(method), views, 2)
    assert len(full) == len(halves) > 0
    for a, b in zip(full, halves):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_a_compiled_model_trains_like_the_eager_one(tmp_path: Path) -> None:
    """``--compile`` compiles the forward of the model the loop calls; the method's hooks, state_dict and
    optimiser stay on the eager module, so the steps must match eager ones to float tolerance."""
    data = batches(3)
    eager, _ = run(data, tmp_path / "eager")
    compiled, _ = run(data, tmp_path / "compiled", compiled=True)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    initial = Toy()
    assert not any(torch.equal(a, b) for a, b in zip(eager.parameters(), initial.parameters()))  # it did train
