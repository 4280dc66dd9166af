"""Encoders by name, and the export -> timm round trip."""

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sslcli.errors import UserError
from sslcli.export import encoder_metadata, load_encoder, save_encoder
from sslcli.models.encoders import create_encoder, resolve_arch


def test_aliases_and_timm_names() -> None:
    assert resolve_arch("vit_b16").timm_name == "vit_base_patch16_224"
    assert resolve_arch("vit_tiny_p4", img_size=32).timm_kwargs == {"patch_size": 4, "img_size": 32}
    assert resolve_arch("resnet18", img_size=32).timm_kwargs == {}  # CNNs take any size
    assert resolve_arch("convnext_atto").timm_name == "convnext_atto"
    enc = create_encoder("vit_tiny_p4", img_size=32)
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, enc.dim)


def test_unknown_arch_suggests_close_names() -> None:
    with pytest.raises(UserError, match="did you mean: resnet18"):
        resolve_arch("resnet81")


@pytest.mark.parametrize(("arch", "size"), [("resnet18", 32), ("vit_tiny_p4", 32)])
def test_export_loads_into_plain_timm(tmp_path, arch: str, size: int) -> None:
    enc = create_encoder(arch, img_size=size).eval()
    path = save_encoder(enc, tmp_path / "enc.safetensors", encoder_metadata(
        enc, method="simclr", image_size=size, mean=(0.5,) * 3, std=(0.25,) * 3, epochs=3))
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    # What a user does without sslcli:
    model = timm.create_model(meta["timm_name"], pretrained=False, num_classes=0, **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(2, 3, size, size)
    assert torch.allclose(model.eval()(x), enc(x), atol=1e-6)
    assert meta["method"] == "simclr" and meta["image_size"] == str(size) and meta["epochs"] == "3"
    again, _ = load_encoder(path)
    assert torch.allclose(again.eval()(x), enc(x), atol=1e-6)


def test_load_refuses_mismatched_arch_and_foreign_files(tmp_path) -> None:
    enc = create_encoder("resnet18")
    path = save_encoder(enc, tmp_path / "r18.safetensors", encoder_metadata(
        enc, method="x", image_size=32, mean=(0,) * 3, std=(1,) * 3, epochs=0))
    with pytest.raises(UserError, match="not resnet50"):
        load_encoder(path, expect_arch="resnet50")
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_encoder(bogus)
    with pytest.raises(UserError, match="does not exist"):
        load_encoder(tmp_path / "missing.safetensors")


def test_resnets_zero_init_each_residual_blocks_last_bn() -> None:
    # SimSiam's and BYOL's official ResNets use zero_init_residual; the recipes rely on timm doing the same.
    encoder = create_encoder("resnet18")
    last_bns = [m.bn2 for m in encoder.modules() if type(m).__name__ == "BasicBlock"]
    assert len(last_bns) == 8 and all(float(bn.weight.abs().max()) == 0.0 for bn in last_bns)
    assert all(float(m.bn1.weight.abs().min()) == 1.0 for m in encoder.modules() if type(m).__name__ == "BasicBlock")


def test_layer_pools_a_timm_feature_level() -> None:
    """``--layer N`` on a timm backbone: level N of its ``feature_info``, average-pooled (the probe on the
    conv stages that pretext tasks are judged by); the last level is the encoder's own pooled output."""
    torch.manual_seed(0)
    encoder = create_encoder("resnet18").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = encoder(x)
        encoder.select_layer(5)
        assert torch.allclose(encoder(x), pooled, atol=1e-6)
        encoder.select_layer(4)
        stage3 = encoder.model.layer3(encoder.model.layer2(encoder.model.layer1(
            encoder.model.maxpool(encoder.model.act1(encoder.model.bn1(encoder.model.conv1(x)))))))
        assert encoder.dim == 256 and torch.allclose(encoder(x), stage3.mean((2, 3)), atol=1e-6)
    vit = create_encoder("vit_tiny_p8", 32).eval()
    vit.select_layer(3)
    with torch.no_grad():
        tokens = vit.model.blocks[:3](vit.model._pos_embed(vit.model.patch_embed(x)))
        assert torch.allclose(vit(x), tokens[:, vit.model.num_prefix_tokens:].mean(1), atol=1e-5)
    with pytest.raises(UserError, match=r"--layer 6: resnet18 has feature levels 1..5 \(1 act1, .*5 layer4\)"):
        encoder.select_layer(6)
