"""DINO's defining pieces: the weight-normalised head, the loss over crop pairs, the centre (also across
2 real ranks), the teacher (EMA, global crops only), the temperature warm-up, the frozen last layer, the
teacher export, and the CLS attention maps of `sslcli attention`."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.data.synth import generate_synthetic
from sslcli.engine import checkpoint
from sslcli.evaluation.attention import cls_attention_maps
from sslcli.export import encoder_metadata, load_encoder, save_encoder
from sslcli.losses import dino_loss, update_center
from sslcli.methods import build_method
from sslcli.models.dino_head import DINOHead
from sslcli.models.encoders import create_encoder

from dist_launch import run_single, torchrun

runner = CliRunner()
SMALL = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_last_layer_rows_are_unit_norm_and_gain_trains_only_when_asked(norm_last_layer: bool) -> None:
    torch.manual_seed(0)
    head = DINOHead(8, 40, hidden_dim=16, bottleneck_dim=4, norm_last_layer=norm_last_layer)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(40), atol=1e-6)  # w = g v / |v|, g = 1
    z = head.bottleneck(torch.randn(5, 8))
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-6)  # the bottleneck is L2-normalised
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    head(torch.randn(5, 8)).pow(2).sum().backward()
    assert head.last_layer.parametrizations.weight.original1.grad is not None  # the direction v always trains
    optimizer.step()
    if norm_last_layer:
        assert head.gain.grad is None and not head.gain.requires_grad
        assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(40), atol=1e-5)
    else:
        assert head.gain.grad is not None and not torch.allclose(head.gain, torch.ones_like(head.gain))


def dino_loss_reference(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor, tps: float,
                        tpt: float) -> float:
    """The official DINOLoss.forward written out per sample, in float64."""
    total, terms = 0.0, 0
    for it, t in enumerate(teacher):
        for js, s in enumerate(student):
            if js == it:
                continue
            per_sample = []
            for b in range(t.shape[0]):
                q = torch.softmax((t[b].double() - center.double().flatten()) / tpt, dim=0)
                log_p = torch.log_softmax(s[b].double() / tps, dim=0)
                per_sample.append(-(q * log_p).sum().item())
            total += sum(per_sample) / len(per_sample)
            terms += 1
    return total / terms


def test_loss_matches_the_pairwise_reference() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(3, 10, generator=g) for _ in range(2)]
    student = [torch.randn(3, 10, generator=g) for _ in range(5)]
    center = torch.randn(1, 10, generator=g) * 0.1
    loss = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
    assert math.isclose(loss.item(), dino_loss_reference(student, teacher, center, 0.1, 0.04), rel_tol=1e-5)
    assert len(student) * 2 - 2 == 8  # pairs: each global crop against the 4 crops that are not itself


def test_loss_is_float32_and_finite_on_fp16_logits() -> None:
    """Logits of +-60 at tau 0.04 overflow exp() in fp16; the loss is computed in float32 instead."""
    g = torch.Generator().manual_seed(1)
    teacher = [(torch.randn(4, 256, generator=g) * 60).half() for _ in range(2)]
    student = [(torch.randn(4, 256, generator=g) * 60).half().requires_grad_() for _ in range(4)]
    loss = dino_loss(student, teacher, torch.zeros(1, 256), student_temp=0.1, teacher_temp=0.04)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(s.grad).all() for s in student)


def test_teacher_gets_no_gradient_through_the_loss() -> None:
    teacher = [torch.randn(2, 6, requires_grad=True) for _ in range(2)]
    student = [torch.randn(2, 6, requires_grad=True) for _ in range(3)]
    dino_loss(student, teacher, torch.zeros(6)).backward()
    assert all(t.grad is None for t in teacher) and all(s.grad is not None for s in student)


def test_center_update_arithmetic() -> None:
    center = torch.tensor([[1.0, -2.0, 0.5]])
    teacher_out = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, -1.0], [2.0, 4.0, 1.0], [0.0, 2.0, 1.0]])
    new = update_center(center, teacher_out, momentum=0.9)
    expected = [0.9 * 1.0 + 0.1 * 1.5, 0.9 * -2.0 + 0.1 * 2.0, 0.9 * 0.5 + 0.1 * 1.0]  # column means 1.5, 2, 1
    assert torch.allclose(new, torch.tensor([expected])) and new.shape == center.shape
    assert torch.equal(center, torch.tensor([[1.0, -2.0, 0.5]]))  # a new tensor: the input is untouched


def test_two_ranks_equal_one_rank_centre_loss_and_gradients(tmp_path: Path) -> None:
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    run_single("dino_step.py", str(one))
    torchrun("dino_step.py", str(two))
    a, b = torch.load(one), torch.load(two)
    assert a["world"] == 1 and b["world"] == 2
    # Without the all-reduce each rank would hold the centre of its own half of the batch.
    assert torch.allclose(a["center"], b["center"], atol=1e-6)
    assert not torch.allclose(a["center"], torch.linspace(-1, 1, 64)[None], atol=1e-3)  # it did move
    assert torch.allclose(a["loss"], b["loss"], atol=1e-5)
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 10
    for key in a["grads"]:
        assert torch.allclose(a["grads"][key], b["grads"][key], rtol=1e-4, atol=1e-6), key


def _views(batch: int = 4, local: int = 2) -> list[torch.Tensor]:
    return [torch.randn(batch, 3, 32, 32) for _ in range(2)] + [torch.randn(batch, 3, 16, 16) for _ in range(local)]


def test_step_teacher_sees_global_crops_only_and_loss_uses_the_old_centre() -> None:
    torch.manual_seed(0)
    method = build_method("dino", create_encoder("resnet18"), SMALL, epochs=10).eval()
    teacher_rows, student_rows = [], []
    method.teacher[0].register_forward_hook(lambda m, a, o: teacher_rows.append(a[0].shape))
    method.backbone.register_forward_hook(lambda m, a, o: student_rows.append(a[0].shape))
    with torch.no_grad():
        method.center.fill_(0.3)
    views = _views()
    out = method(views, {})
    assert teacher_rows == [(8, 3, 32, 32)]  # both global crops, one call
    assert student_rows == [(8, 3, 32, 32), (8, 3, 16, 16)]  # one call per resolution
    with torch.no_grad():
        t = [method.teacher(v) for v in views[:2]]
        s = [method.head(method.backbone(v)) for v in views]
    expected = dino_loss(s, t, torch.full((1, 64), 0.3), student_temp=0.1, teacher_temp=0.04)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert torch.allclose(method.center, 0.9 * 0.3 + 0.1 * torch.cat(t).mean(0, keepdim=True), atol=1e-6)
    assert out.embedding.shape == (4, 16)  # the student's bottleneck of the first global crop
    assert 0 <= out.logs["teacher_entropy"] <= math.log(64) and 0 <= out.logs["student_entropy"] <= math.log(64)


def test_teacher_starts_equal_gets_no_gradient_and_follows_the_ema() -> None:
    method = build_method("dino", create_encoder("resnet18"), {**SMALL, "momentum": 0.996}, epochs=10)
    student, teacher = dict(method.student.named_parameters()), dict(method.teacher.named_parameters())
    assert student.keys() == teacher.keys() and all(torch.equal(student[k], teacher[k]) for k in student)
    method(_views(), {}).loss.backward()
    assert all(p.grad is None for p in teacher.values())
    before = {k: v.clone() for k, v in teacher.items()}
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    method.after_step(0.5)  # cosine 0.996 -> 1 at half-way: m = 0.998
    moved = [teacher[k] - before[k] for k in teacher]
    assert all(torch.allclose(d, torch.full_like(d, 0.002), atol=1e-5) for d in moved)


@pytest.mark.parametrize("progress, temperature", [(0.0, 0.04), (0.15, 0.055), (0.3, 0.07), (0.9, 0.07)])
def test_teacher_temperature_warms_up_linearly_over_30_epochs(progress: float, temperature: float) -> None:
    method = build_method("dino", create_encoder("resnet18"), SMALL, epochs=100)
    method.after_step(progress)
    assert math.isclose(float(method.current_teacher_temp), temperature, rel_tol=1e-6)
    assert float(method.state_dict()["progress"]) == pytest.approx(progress)  # in checkpoints, for --resume
    assert "current_teacher_temp" not in method.state_dict()  # derived from progress: older checkpoints load
    resumed = build_method("dino", create_encoder("resnet18"), SMALL, epochs=100)
    resumed.load_state_dict(method.state_dict())  # as --resume does: the host copy follows the buffer
    assert math.isclose(float(resumed.current_teacher_temp), temperature, rel_tol=1e-6)


def test_the_logged_teacher_temperature_is_the_one_the_step_used() -> None:
    method = build_method("dino", create_encoder("resnet18"), SMALL, epochs=100)
    logs = method(_views(), {}).logs
    method.after_step(0.3)  # the loop reads the logs after the step's hooks
    assert math.isclose(float(logs["teacher_temp"]), 0.04, rel_tol=1e-6)


def test_last_layer_gets_no_update_in_the_first_epoch_only() -> None:
    method = build_method("dino", create_encoder("resnet18"), {**SMALL, "freeze_last_layer": 1}, epochs=4)
    last = list(method.head.last_layer.parameters())
    for progress, frozen in [(0.0, True), (0.24, True), (0.25, False), (0.9, False)]:
        method.zero_grad()
        method(_views(), {}).loss.backward()
        method.before_optimizer_step(progress)
        assert all((p.grad is None) == frozen for p in last if p.requires_grad), progress
        assert method.head.mlp[0].weight.grad is not None  # the rest of the network trains throughout


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of DINO on a ViT with 32-px global and 16-px local crops, exporting the teacher."""
    root = tmp_path_factory.mktemp("dino")
    generate_synthetic(root / "data", train=64, test=8, size=32, seed=0)
    result = runner.invoke(app, ["pretrain", "dino", "--recipe", "small", "--arch", "vit_tiny_p4",
                                 "--data", str(root / "data"), "--epochs", "1", "--batch-size", "32",
                                 "--num-workers", "0", "--device", "cpu", "--out", str(root / "run"),
                                 "--set", "method_args.export=teacher", "--set", "method_args.out_dim=128",
                                 "--set", "method_args.freeze_last_layer=0"])
    assert result.exit_code == 0, result.output
    return root


def test_teacher_export_holds_the_teachers_backbone(vit_run: Path, tmp_path: Path) -> None:
    run = vit_run / "run"
    state = checkpoint.load(checkpoint.latest(run / "checkpoints"))["model"]
    teacher = {k.removeprefix("teacher.0.model."): v for k, v in state.items() if k.startswith("teacher.0.model.")}
    student = {k.removeprefix("backbone.model."): v for k, v in state.items() if k.startswith("backbone.model.")}
    assert teacher.keys() == student.keys() and any(not torch.equal(teacher[k], student[k]) for k in teacher)
    exported = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "e.safetensors")])
    assert exported.exit_code == 0, exported.output
    for path in (run / "encoder.safetensors", tmp_path / "e.safetensors"):
        weights = load_file(str(path))
        assert weights.keys() == teacher.keys() and all(torch.equal(weights[k], teacher[k]) for k in weights)
    # Local crops of another size reach the ViT through timm's interpolated positional embeddings.
    assert json.loads(load_encoder(run / "encoder.safetensors")[1]["timm_kwargs"])["dynamic_img_size"] is True


def test_cls_attention_matches_timms_unfused_attention_and_sums_to_one() -> None:
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny_p4", 32).eval()
    images = torch.randn(2, 3, 32, 32)
    maps = cls_attention_maps(encoder, images)
    assert maps.shape == (2, 3, 8, 8)  # 3 heads, an 8 x 8 patch grid
    assert (maps >= 0).all() and torch.allclose(maps.sum(dim=(-2, -1)), torch.ones(2, 3), atol=1e-5)
    # The reference: timm's own softmax, captured where its unfused path passes it to attn_drop.
    attn = encoder.model.blocks[-1].attn
    attn.fused_attn, captured = False, []
    attn.attn_drop.register_forward_hook(lambda m, a, o: captured.append(a[0]))
    with torch.no_grad():
        encoder(images)
    row = captured[0][:, :, 0, 1:]  # CLS query, patch keys
    assert torch.allclose(maps.flatten(2), row / row.sum(-1, keepdim=True), atol=1e-5)


def test_attention_command_writes_one_panel_per_image(vit_run: Path, tmp_path: Path) -> None:
    single = tmp_path / "one.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(single)
    out = tmp_path / "maps"
    result = runner.invoke(app, ["attention", str(vit_run / "run"), str(single), str(vit_run / "data"),
                                 "--limit", "2", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3 and (out / "one.png").exists()
    for png in pngs:  # image + 3 heads, 32-px tiles zoomed 7x, 2-px gaps
        assert Image.open(png).size == (4 * 224 + 3 * 2, 224)


def test_attention_command_refuses_a_resnet_in_one_line(tmp_path: Path) -> None:
    encoder = create_encoder("resnet18")
    path = save_encoder(encoder, tmp_path / "r.safetensors", encoder_metadata(
        encoder, method="simclr", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, epochs=1))
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    result = runner.invoke(app, ["attention", str(path), str(tmp_path / "x.png"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "not a ViT" in result.output
    assert not (tmp_path / "o").exists()


def test_fp16_centre_and_loss_stay_float32() -> None:
    center = torch.zeros(1, 8)
    new = update_center(center, torch.randn(4, 8).half())
    assert new.dtype == torch.float32
    assert torch.isfinite(F.softmax(new, dim=-1)).all()
