"""The optimised paths give the reference paths' numbers: fused vs unfused optimisers, channels_last vs the
default layout, and a loop that reads the loss on the host only at log steps.  (Compiled vs eager:
tests/test_step_guards.py::test_a_compiled_model_trains_like_the_eager_one.)  Speed is measured by
benchmarks/, not here."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sslcli.config import CropOptions, build_config
from sslcli.engine.device import is_convolutional, laid_out_for, memory_format_for, weight_layout
from sslcli.engine.guards import StepGuard
from sslcli.engine.metrics import MetricsLog
from sslcli.engine.optim import OptimConfig, apply_schedules, build_optimizer, fused_available, param_groups
from sslcli.engine.resume import LoopState, RunCheckpoints
from sslcli.engine.step import forward_backward, guarded_update
from sslcli.engine.train import LoopSettings, train
from sslcli.methods.base import Method, StepOutput
from sslcli.runs import build_run_method

CPU = torch.device("cpu")
NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)

pytestmark = pytest.mark.usefixtures("single_thread")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))


def train_quadratic(opt_cfg: OptimConfig, fused: bool, steps: int = 8) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``steps`` scheduled steps (warm-up, cosine lr, decayed and undecayed groups) on a fixed regression."""
    net = small_net()
    opt = build_optimizer(param_groups(net), opt_cfg, opt_cfg.lr, fused=fused)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=gen), torch.randn(32, 3, generator=gen)
    for i in range(steps):
        apply_schedules(opt, opt_cfg, opt_cfg.lr, i / 4, steps / 4)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return net, opt


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimisers_step_like_the_unfused_ones(name: str) -> None:
    cfg = OptimConfig(name=name, lr=0.05, weight_decay=0.05, warmup_epochs=0.5)
    fused, fused_opt = train_quadratic(cfg, fused=True)
    plain, plain_opt = train_quadratic(cfg, fused=False)
    assert fused_opt.param_groups[0]["fused"] and not plain_opt.param_groups[0].get("fused")
    start = small_net()
    for a, b, s in zip(fused.parameters(), plain.parameters(), start.parameters()):
        assert not torch.equal(b, s)  # it trained
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_opt.state.values(), plain_opt.state.values()):
        for key in a:
            torch.testing.assert_close(torch.as_tensor(a[key]).float(), torch.as_tensor(b[key]).float(),
                                       rtol=1e-5, atol=1e-7)


def test_fused_is_the_default_where_torch_has_it() -> None:
    net = small_net()
    for name in ("sgd", "adamw"):
        assert build_optimizer(param_groups(net), OptimConfig(name=name), 0.1).param_groups[0]["fused"]
    lars = build_optimizer(param_groups(net), OptimConfig(name="lars"), 0.1)
    assert not lars.param_groups[0].get("fused")
    assert not fused_available([{"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64).to_sparse())]}])


def method_and_views(arch: str, size: int) -> tuple[Method, list[torch.Tensor]]:
    """SimCLR's small recipe on ``arch`` at ``size``-px crops (training mode: BN on batch statistics)."""
    torch.manual_seed(0)
    cfg = build_config("simclr", "small", {"arch": arch}, crops=CropOptions(global_size=size))
    gen = torch.Generator().manual_seed(2)
    return build_run_method(cfg).train(), [torch.randn(8, 3, size, size, generator=gen) for _ in range(2)]


def one_step(method: Method, views: list[torch.Tensor],
             fmt: torch.memory_format) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loop's step (forward, backward, guarded LARS update) with the model and views in layout ``fmt``;
    returns the loss, the gradients and, through ``method``, the updated weights."""
    method = method.to(memory_format=fmt)
    cfg = OptimConfig(name="lars", lr=0.5, weight_decay=1e-4)
    opt = build_optimizer(method.param_groups(), cfg, cfg.lr)
    apply_schedules(opt, cfg, cfg.lr, 0.0, 1.0)
    loss, _ = forward_backward(method, [v.to(memory_format=fmt) for v in views], {"index": torch.arange(8)},
                               NO_SCALER, CPU, None, 1)
    grads = [p.grad.clone() for p in method.parameters()]
    assert guarded_update(method, opt, NO_SCALER, StepGuard(3), loss, None, False, 0, 10) == (True, False)
    return loss, grads


def test_a_channels_last_resnet_step_equals_the_contiguous_one() -> None:
    method, views = method_and_views("resnet18", 32)
    nhwc, nchw = copy.deepcopy(method), copy.deepcopy(method)
    loss_nhwc, grads_nhwc = one_step(nhwc, views, torch.channels_last)
    loss_nchw, grads_nchw = one_step(nchw, views, torch.contiguous_format)
    assert nhwc.backbone.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.backbone.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(loss_nhwc, loss_nchw, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_nhwc, grads_nchw):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    for a, b, start in zip(nhwc.parameters(), nchw.parameters(), method.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not all(torch.equal(a, s) for a, s in zip(nhwc.parameters(), method.parameters()))


def test_a_bf16_autocast_step_tracks_the_fp32_one() -> None:
    """bf16 (the GPU default, ``--precision bf16`` on a CPU) keeps 8 mantissa bits, so not equal but close:
    measured here, the loss within 0.2% and a gradient cosine of 0.992 to the fp32 step's."""
    method, views = method_and_views("resnet18", 32)
    out = []
    for dtype in (None, torch.bfloat16):
        copied = copy.deepcopy(method)
        loss, _ = forward_backward(copied, views, {"index": torch.arange(8)}, NO_SCALER, CPU, dtype, 1)
        out.append((loss, torch.cat([p.grad.flatten() for p in copied.parameters()])))
    (loss32, grad32), (loss16, grad16) = out
    assert loss16.dtype == torch.float32 and loss16 != loss32  # autocast ran, in bf16
    torch.testing.assert_close(loss16, loss32, rtol=1e-2, atol=0)
    assert nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.98


def test_channels_last_is_chosen_for_convolutional_networks_on_a_gpu() -> None:
    """By module types, not model names: a ViT's only convolution is its patch embedding (kernel = stride)."""
    resnet, _ = method_and_views("resnet18", 16)
    vit, _ = method_and_views("vit_tiny_p4", 16)
    gpu = torch.device("cuda")  # a device object only: nothing runs on it
    assert is_convolutional(resnet) and memory_format_for(resnet, gpu) == torch.channels_last
    assert not is_convolutional(vit) and memory_format_for(vit, gpu) == torch.contiguous_format
    assert memory_format_for(resnet, CPU) == torch.contiguous_format  # measured slower on the CPU
    assert is_convolutional(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)))
    assert not is_convolutional(nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.Linear(4, 4)))



def test_methods_that_build_their_own_inputs_follow_the_weights_layout() -> None:
    """Rotation (and jigsaw, colourisation, ...) builds its backbone input from the views; it must hand it
    over in whatever layout the engine gave the weights, not force one (NHWC is slower on the CPU)."""
    colour = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3))  # the 1-channel conv fits both layouts
    assert weight_layout(colour) == torch.contiguous_format
    assert weight_layout(colour.to(memory_format=torch.channels_last)) == torch.channels_last
    assert weight_layout(nn.Sequential(nn.Conv2d(3, 4, 4, stride=4))) == torch.contiguous_format  # patch embed
    x = torch.randn(2, 3, 8, 8)
    assert laid_out_for(x, colour).is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    cfg = build_config("rotation", "small", {"arch": "resnet18"}, crops=CropOptions(global_size=16))
    method = build_run_method(cfg).train()
    views = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))]
    seen: list[torch.Tensor] = []
    method.backbone.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    losses = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(1)
        losses[fmt] = copy.deepcopy(method).to(memory_format=fmt)(views, {}).loss
        nhwc = seen[-1].is_contiguous(memory_format=torch.channels_last) and not seen[-1].is_contiguous()
        assert nhwc == (fmt == torch.channels_last)
    torch.testing.assert_close(losses[torch.channels_last], losses[torch.contiguous_format], rtol=1e-5, atol=1e-6)


class Toy(Method):
    def __init__(self) -> None:
        super().__init__(None)
        self.net = nn.Linear(4, 2)

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        out = self.net(views[0].flatten(1))
        return StepOutput(out.pow(2).mean(), embedding=out)


def test_the_loop_reads_the_loss_on_the_host_only_at_log_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host read of the loss waits for the device; the loop does one per ``log_every`` steps (plus the
    checkpoint's), the non-finite guard's flags apart (guards.py says why those are read every step)."""
    reads: list[int] = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or real_item(self))
    torch.manual_seed(0)
    method = Toy()
    cfg = OptimConfig(name="sgd", lr=0.01, schedule="constant", weight_decay=0.0)
    opt = build_optimizer(method.param_groups(), cfg, cfg.lr)
    data = [{"views": [torch.randn(4, 1, 2, 2)], "index": torch.arange(4)} for _ in range(10)]
    ckpts = RunCheckpoints(tmp_path / "checkpoints", method, opt, NO_SCALER, CPU, keep=1, steps_per_epoch=10, extra={})
    settings = LoopSettings(epochs=1, optim=cfg, base_lr=cfg.lr, device=CPU, amp_dtype=None, log_every=5)
    train(method, method, opt, NO_SCALER, lambda epoch, start: data[start:], 10, settings,
          MetricsLog(tmp_path / "metrics.jsonl"), ckpts, lambda epoch: None, LoopState())
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert len(reads) == 2 + 1  # steps 5 and 10, and the epoch-end checkpoint's loss sum
