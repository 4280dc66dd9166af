"""BEiT and its dVAE tokenizer: blockwise masks, the token loss, the KL prior, the tokenizer file, the masked forward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from sslcli.augment import AugmentConfig
from sslcli.engine.masking import blockwise_mask
from sslcli.losses import kl_to_uniform, masked_token_loss
from sslcli.methods.base import build_method
from sslcli.models.beit import forward_with_mask_token
from sslcli.models.dvae import DiscreteVAE, load_tokenizer, save_tokenizer
from sslcli.models.encoders import create_encoder

SMALL_TOKENIZER = {"vocab": 32, "code_dim": 16, "widths": [8, 8, 16, 16]}


@pytest.mark.parametrize(("grid", "num_masked", "min_block"), [((14, 14), 75, 16), ((8, 8), 26, 4), ((8, 8), 26, 16)])
def test_blockwise_mask_stays_within_its_budget(grid: tuple[int, int], num_masked: int, min_block: int) -> None:
    generator = torch.Generator().manual_seed(0)
    counts = [int(blockwise_mask(grid, num_masked, min_block=min_block, generator=generator).sum()) for _ in range(200)]
    assert max(counts) <= num_masked  # never more than asked
    assert sum(counts) / len(counts) > 0.9 * num_masked  # and nearly always all of it
    masks = {tuple(blockwise_mask(grid, num_masked, min_block=min_block, generator=generator).flatten().tolist())
             for _ in range(20)}
    assert len(masks) > 15  # random placement


def test_blockwise_mask_is_made_of_blocks_not_scattered_patches() -> None:
    generator = torch.Generator().manual_seed(1)
    mask = blockwise_mask((14, 14), 75, min_block=16, generator=generator).float()
    # a masked patch has, on average, far more masked 4-neighbours than under uniform masking (75/196 ~ 0.38)
    neighbours = F.conv2d(F.pad(mask[None, None], (1, 1, 1, 1)), torch.tensor([[[[0, 1, 0], [1, 0, 1], [0, 1, 0]]]],
                                                                                dtype=torch.float32))[0, 0]
    assert (neighbours[mask.bool()] / 4).mean() > 0.6


def test_masked_token_loss_is_cross_entropy_on_masked_positions_only() -> None:
    torch.manual_seed(0)
    tokens = torch.randint(0, 10, (2, 6))
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    logits = torch.randn(int(mask.sum()), 10)
    reference, row = 0.0, 0
    for b in range(2):
        for i in range(6):
            if mask[b, i]:
                reference += -torch.log_softmax(logits[row], 0)[tokens[b, i]]
                row += 1
    assert torch.allclose(masked_token_loss(logits, tokens, mask), reference / row)
    changed = torch.where(mask, tokens, (tokens + 3) % 10)  # only unmasked targets differ
    assert torch.equal(masked_token_loss(logits, changed, mask), masked_token_loss(logits, tokens, mask))
    where = torch.tensor([0, 2, 5, 7])  # the same positions as flat indices (what BEiT's step passes)
    assert torch.equal(masked_token_loss(logits, tokens, where), masked_token_loss(logits, tokens, mask))


def test_kl_to_uniform_matches_its_formula_and_bounds() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 3, 3)
    q = logits.softmax(1)
    reference = (q * (q.log() - math.log(1 / 7))).sum(1).mean()
    assert torch.allclose(kl_to_uniform(logits), reference, atol=1e-6)
    assert kl_to_uniform(torch.zeros(2, 7, 3, 3)).abs() < 1e-6  # uniform: no divergence
    assert torch.allclose(kl_to_uniform(torch.eye(7)[None, :, :, None] * 100), torch.tensor(math.log(7)), atol=1e-4)


def test_tokenizer_file_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tokenizer = DiscreteVAE(**SMALL_TOKENIZER)
    save_tokenizer(tokenizer, tmp_path / "tokenizer.safetensors", {"image_size": "32", "mean": "[0.5, 0.5, 0.5]",
                                                                    "std": "[0.5, 0.5, 0.5]"})
    loaded, meta = load_tokenizer(tmp_path)
    images = torch.randn(3, 3, 32, 32)
    assert tokenizer.stride == 8 and loaded.tokens(images).shape == (3, 4, 4)
    assert torch.equal(loaded.tokens(images), tokenizer.eval().tokens(images)) and meta["image_size"] == "32"
    recon = loaded.decode_tokens(loaded.tokens(images))
    assert recon.shape == images.shape


def _tokenizer_dir(tmp_path: Path, mean: list[float], std: list[float]) -> Path:
    torch.manual_seed(0)
    save_tokenizer(DiscreteVAE(**SMALL_TOKENIZER), tmp_path / "tokenizer.safetensors",
                   {"image_size": "32", "mean": str(mean), "std": str(std)})
    return tmp_path


def test_beit_masks_patch_embeddings_and_keeps_its_tokenizer_frozen(tmp_path: Path) -> None:
    augment = AugmentConfig()
    path = _tokenizer_dir(tmp_path, list(augment.mean), list(augment.std))
    beit = build_method("beit", create_encoder("vit_tiny_p4", img_size=32), {"tokenizer": str(path), "min_block": 4},
                        augment=augment).train()
    assert not beit.tokenizer.training and not any(p.requires_grad for p in beit.tokenizer.parameters())
    assert torch.allclose(beit.to_tokenizer[0], torch.ones(3, 1, 1)) and beit.to_tokenizer[1].abs().max() < 1e-6
    images = torch.randn(2, 3, 32, 32)
    out = beit([images], {})
    out.loss.backward()
    assert all(p.grad is None for p in beit.tokenizer.parameters())
    assert beit.mask_token.grad is not None and beit.mask_token.grad.abs().sum() > 0
    # the tokens of a 32-px crop come from the tokenizer at its own 8-px-per-token grid: 8 x 8 patches -> 64-px input
    assert beit.tokenizer_size == (64, 64) and beit.visual_tokens(images).shape == (2, 64)
    # masked patches are replaced: their pixels do not reach the output
    beit.eval()
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :20] = True
    pixel_mask = mask.reshape(2, 1, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3)
    with torch.no_grad():
        a = forward_with_mask_token(beit.backbone.model, images, mask, beit.mask_token)
        b = forward_with_mask_token(beit.backbone.model, images + 5 * pixel_mask * torch.randn_like(images), mask,
                                    beit.mask_token)
    assert torch.allclose(a, b, atol=1e-5)


def test_beit_tokenizer_input_is_renormalised(tmp_path: Path) -> None:
    augment = AugmentConfig()
    path = _tokenizer_dir(tmp_path, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    beit = build_method("beit", create_encoder("vit_tiny_p8", img_size=64), {"tokenizer": str(path), "min_block": 4},
                        augment=augment)
    pixels = torch.rand(1, 3, 64, 64)
    images = (pixels - torch.tensor(augment.mean)[:, None, None]) / torch.tensor(augment.std)[:, None, None]
    expected = beit.tokenizer.tokens((pixels - 0.5) / 0.25).flatten(1)
    assert torch.equal(beit.visual_tokens(images), expected)


def test_beit_exports_into_timm_beit(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from sslcli.export import encoder_metadata, save_encoder

    augment = AugmentConfig()
    beit = build_method("beit", create_encoder("beit_base_patch16_224", img_size=224),
                        {"tokenizer": str(_tokenizer_dir(tmp_path, list(augment.mean), list(augment.std)))},
                        augment=augment)
    path = save_encoder(beit.export_backbone(), tmp_path / "enc.safetensors",
                        encoder_metadata(beit.export_backbone(), method="beit", image_size=224, mean=augment.mean,
                                         std=augment.std, epochs=0))
    timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0).load_state_dict(
        load_file(str(path)), strict=True)


def test_beit_without_a_tokenizer_says_how_to_get_one() -> None:
    from sslcli.errors import UserError

    with pytest.raises(UserError, match="sslcli pretrain dvae"):
        build_method("beit", create_encoder("vit_tiny_p4", img_size=32), {}, augment=AugmentConfig())


def test_dvae_step_fits_a_batch_and_uses_many_words() -> None:
    torch.manual_seed(0)
    dvae = build_method("dvae", None, {**SMALL_TOKENIZER, "widths": [16, 16, 32, 32], "kl_warmup": 0.0},
                        augment=AugmentConfig())
    images = F.interpolate(torch.rand(16, 3, 4, 4), size=32, mode="nearest") * 2 - 1  # 8-px blocks of colour
    optimizer = torch.optim.Adam(dvae.parameters(), lr=3e-3)
    steps, first = 200, None
    for step in range(steps):
        out = dvae([images], {})
        first = first if first is not None else float(out.logs["recon_mse"])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        dvae.after_step((step + 1) / steps)
    assert float(out.logs["tau"]) == pytest.approx(1 / 16, rel=0.05)  # annealed 1 -> 1/16
    assert float(out.logs["recon_mse"]) < 0.7 * first
    assert float(out.logs["perplexity"]) > 4  # the tokens are not one word
    # hard tokens decode closer to the images than their mean colour does (the variance, 1/3, of U(-1, 1))
    tokens = dvae.tokenizer.eval().tokens(images)
    assert (dvae.tokenizer.decode_tokens(tokens) - images).pow(2).mean() < 0.8 * images.var()
