"""MoCo v3's defining pieces: heads, momentum encoder without predictor, the 2t-scaled symmetric loss,
the momentum schedule, and the frozen random patch projection (--freeze-patch-embed)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.data.synth import generate_synthetic
from sslcli.losses import in_batch_contrastive
from sslcli.methods import build_method
from sslcli.models.encoders import create_encoder

runner = CliRunner()
SMALL = {"dim": 16, "mlp_hidden": 32, "temperature": 0.2}


def test_loss_is_symmetric_2t_scaled_in_batch_contrastive() -> None:
    torch.manual_seed(0)
    method = build_method("mocov3", create_encoder("resnet18"), SMALL).eval()
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss = method([x1, x2], {}).loss
    with torch.no_grad():
        q1, q2 = method.predictor(method.base(x1)), method.predictor(method.base(x2))
        k1, k2 = method.momentum_encoder(x1), method.momentum_encoder(x2)
    expected = 2 * 0.2 * (in_batch_contrastive(q1, k2, 0.2) + in_batch_contrastive(q2, k1, 0.2))
    assert torch.allclose(loss, expected, atol=1e-5)


def test_momentum_encoder_has_no_predictor_and_gets_no_gradient() -> None:
    method = build_method("mocov3", create_encoder("resnet18"), SMALL)
    names = {n for n, _ in method.momentum_encoder.named_parameters()}
    assert names == {n for n, _ in method.base.named_parameters()}
    assert not any(p.requires_grad for p in method.momentum_encoder.parameters())
    out = method([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)], {})
    out.loss.backward()
    assert all(p.grad is None for p in method.momentum_encoder.parameters())
    assert method.predictor[0].weight.grad is not None


def test_heads_follow_the_paper_layout() -> None:
    method = build_method("mocov3", create_encoder("resnet18"), {"dim": 16, "mlp_hidden": 32})
    projector = method.base[1]
    linears = [m for m in projector if isinstance(m, torch.nn.Linear)]
    norms = [m for m in projector if isinstance(m, torch.nn.BatchNorm1d)]
    assert [lin.out_features for lin in linears] == [32, 32, 16] and all(lin.bias is None for lin in linears)
    assert len(norms) == 3 and norms[-1].affine is False and norms[0].affine is True
    pred_norms = [m for m in method.predictor if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(pred_norms) == 2 and pred_norms[-1].affine is False


@pytest.mark.parametrize("progress, expected", [(0.0, 0.99), (0.5, 0.995), (1.0, 1.0)])
def test_momentum_follows_cosine_to_one(progress: float, expected: float) -> None:
    method = build_method("mocov3", create_encoder("resnet18"), SMALL)
    target0 = [p.clone() for p in method.momentum_encoder.parameters()]
    with torch.no_grad():
        for p in method.base.parameters():
            p.add_(1.0)
    method.after_step(progress)
    moved = [(t - t0) for t, t0 in zip(method.momentum_encoder.parameters(), target0)]
    # theta_k moves by (1 - m) times the (here uniform, +1) gap to theta_q
    assert all(torch.allclose(d, torch.full_like(d, 1 - expected), atol=1e-6) for d in moved)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "shapes"
    generate_synthetic(out, train=64, test=16, size=32, seed=0)
    return out


def test_freeze_patch_embed_keeps_it_bit_identical_and_trains_the_rest(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "mocov3", "--recipe", "small", "--arch", "vit_tiny_p4",
                                 "--freeze-patch-embed", "--data", str(tiny_data), "--epochs", "1",
                                 "--batch-size", "32", "--num-workers", "0", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    torch.manual_seed(0)  # the recipe's seed: the encoder pretrain started from
    init = create_encoder("vit_tiny_p4", img_size=32).model.state_dict()
    trained = load_file(str(out / "encoder.safetensors"))
    frozen = [k for k in init if k.startswith("patch_embed.")]
    assert frozen and all(torch.equal(trained[k], init[k]) for k in frozen)
    others = [k for k in init if not k.startswith("patch_embed.") and init[k].is_floating_point()]
    assert all(not torch.equal(trained[k], init[k]) for k in others if "cls_token" not in k and "pos_embed" not in k)


def test_freeze_patch_embed_on_a_cnn_is_a_user_error(tiny_data: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["pretrain", "mocov3", "--recipe", "small", "--freeze-patch-embed", "--batch-size", "32",
                                 "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 2 and "needs a ViT" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_the_papers_command_runs(tmp_path: Path) -> None:
    """`sslcli pretrain mocov3 --arch vit_b16 --freeze-patch-embed` with the paper recipe (one step of 8 images)."""
    data = tmp_path / "shapes"
    generate_synthetic(data, train=8, test=8, size=32, seed=0)
    result = runner.invoke(app, ["pretrain", "mocov3", "--arch", "vit_b16", "--freeze-patch-embed", "--data", str(data),
                                 "--batch-size", "8", "--epochs", "1", "--num-workers", "0", "--device", "cpu",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "lr: 0.00015" in config and "weight_decay: 0.1" in config and "freeze_patch_embed: true" in config
    assert "size: 224" in config and "temperature: 0.2" in config
