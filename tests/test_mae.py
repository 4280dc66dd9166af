"""MAE: patches, masking, positional embeddings, the masked loss, the asymmetric encoder, and export."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from sslcli.engine.masking import patchify, random_masking, restore_order, unpatchify
from sslcli.losses import masked_mse, normalized_patches
from sslcli.methods.base import build_method
from sslcli.models.encoders import create_encoder
from sslcli.models.mae import encode_visible
from sslcli.models.pos_embed import sincos_2d

SMALL_DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4}


def tiny_mae(**kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_method("mae", create_encoder("vit_tiny_p4", img_size=32), {**SMALL_DECODER, **kwargs}).eval()


def test_patchify_layout_and_round_trip() -> None:
    images = torch.randn(2, 3, 12, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    # patch (i, j) of a 3 x 2 grid is row i * 2 + j, flattened as (row, column, channel)
    assert torch.equal(patches[1, 1 * 2 + 1], images[1, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, 4, (3, 2)), images)


def test_random_masking_keeps_the_ratio_and_unshuffle_inverts_shuffle() -> None:
    tokens = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 16, 1).expand(-1, -1, 3).contiguous()
    torch.manual_seed(0)
    visible, mask, ids_restore = random_masking(tokens, 0.75)
    assert visible.shape == (2, 4, 3) and mask.shape == (2, 16)
    assert mask.sum(1).tolist() == [12, 12]
    for b in range(2):  # the visible tokens are exactly the unmasked positions
        assert sorted(visible[b, :, 0].long().tolist()) == [b * 16 + i for i in range(16) if mask[b, i] == 0]
    restored = restore_order(visible, torch.full((3,), -1.0), ids_restore)
    expected = torch.where(mask[..., None].bool(), torch.tensor(-1.0), tokens)
    assert torch.equal(restored, expected)
    # the tokens with the lowest noise stay visible
    noise = torch.rand(2, 16)
    _, mask, _ = random_masking(tokens, 0.5, noise)
    assert torch.equal(mask, (noise >= noise.sort(dim=1).values[:, 8:9]).float())


def test_masked_mse_ignores_visible_patches_and_matches_its_formula() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(3, 10, 12), torch.randn(3, 10, 12)
    mask = (torch.rand(3, 10) < 0.6).float()
    loss = masked_mse(pred, target, mask)
    reference = sum(((pred[b, i] - target[b, i]) ** 2).mean() for b in range(3) for i in range(10) if mask[b, i])
    assert torch.allclose(loss, reference / mask.sum(), atol=1e-6)
    changed = pred + (1 - mask)[..., None] * torch.randn(3, 10, 12) * 100  # only visible predictions change
    assert torch.equal(masked_mse(changed, target, mask), loss)


def test_norm_pix_target_standardises_each_patch() -> None:
    patches = torch.randn(2, 5, 48) * 3 + 7
    target = normalized_patches(patches)
    for b in range(2):
        for i in range(5):
            x = patches[b, i].double()
            ref = (x - x.mean()) / torch.sqrt(((x - x.mean()) ** 2).sum() / (x.numel() - 1) + 1e-6)
            assert torch.allclose(target[b, i].double(), ref, atol=1e-5)


def _mae_reference_sincos(dim: int, size: int) -> np.ndarray:
    """MAE's util/pos_embed.py, rewritten: grid = meshgrid(w, h); first half from grid[0], second from grid[1]."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape(2, 1, size, size)
    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_sincos_positions_match_mae_reference() -> None:
    ours = sincos_2d(64, (7, 7), cls_token=True)[0].double().numpy()
    assert np.allclose(ours, _mae_reference_sincos(64, 7), atol=1e-6)


def test_encoder_sees_visible_patches_only_and_positions_are_fixed() -> None:
    mae = tiny_mae()
    vit = mae.backbone.model
    assert not vit.pos_embed.requires_grad
    assert torch.allclose(vit.pos_embed, sincos_2d(vit.embed_dim, (8, 8), cls_token=True))
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    with torch.no_grad():
        latent, mask, _ = encode_visible(vit, images, 0.75, noise)
        assert latent.shape == (2, 1 + 16, vit.embed_dim)
        # changing the pixels of masked patches leaves the encoder's output unchanged
        hidden = unpatchify(mask[..., None].expand(-1, -1, 48), 4, (8, 8))
        latent2, _, _ = encode_visible(vit, images + hidden * torch.randn_like(images) * 10, 0.75, noise)
    assert torch.allclose(latent, latent2, atol=1e-5)


def test_reconstruction_keeps_the_pixel_scale_and_reports_the_mean_patch_baseline() -> None:
    mae = tiny_mae(norm_pix_loss=True)
    images = torch.randn(2, 3, 32, 32)
    rec = mae.reconstruct(images, 0.5, torch.rand(2, 64))
    assert rec.images.shape == images.shape and rec.mask.shape == images.shape
    assert rec.mask.mean().item() == pytest.approx(0.5)
    # norm-pix targets have unit variance per patch (population variance (P - 1) / P of the unbiased 1)
    assert torch.allclose(rec.mean_patch_loss, torch.full((2,), 47 / 48), atol=1e-4)
    # predicting 0 (the mean of a normalised patch) reconstructs each patch as its original mean colour
    torch.nn.init.zeros_(mae.decoder.pred.weight)
    torch.nn.init.zeros_(mae.decoder.pred.bias)
    flat = patchify(mae.reconstruct(images, 0.5, torch.rand(2, 64)).images, 4)
    assert torch.allclose(flat, patchify(images, 4).mean(-1, keepdim=True).expand_as(flat), atol=1e-5)


def test_exported_encoder_loads_into_timm_vit_base_unchanged(tmp_path) -> None:
    from safetensors.torch import load_file

    from sslcli.export import encoder_metadata, save_encoder

    mae = build_method("mae", create_encoder("vit_b16", img_size=224), {})
    path = save_encoder(mae.export_backbone(), tmp_path / "enc.safetensors",
                        encoder_metadata(mae.export_backbone(), method="mae", image_size=224, mean=(0.5,) * 3,
                                         std=(0.5,) * 3, epochs=0))
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    model.load_state_dict(load_file(str(path)), strict=True)
    assert torch.equal(model.pos_embed, mae.backbone.model.pos_embed)


@pytest.mark.parametrize(("extra", "message"), [
    (["--arch", "resnet18"], "not a timm ViT"),
    (["--set", "method_args.mask_ratio=1.0"], "mask_ratio must be in [0, 1)"),
])
def test_bad_mae_settings_exit_2_and_create_nothing(synth_data, tmp_path, extra: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from sslcli.cli.app import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["pretrain", "mae", "--recipe", "small", "--data", str(synth_data),
                                      "--out", str(out), *extra])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not out.exists()
