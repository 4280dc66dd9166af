"""CPC: patch grid, causal context network, shifted targets, InfoNCE against a loop, layer-norm encoder."""

import json
import math

import pytest
import timm
import torch

from sslcli.engine.patches import augment_patches, extract_patches, grid_stride, orient
from sslcli.errors import UserError
from sslcli.losses.cpc import cpc_info_nce, cpc_logits
from sslcli.methods.base import build_method
from sslcli.models.context import MaskedConvContext
from sslcli.models.encoders import create_encoder
from sslcli.models.norms import with_layer_norm


def test_patches_are_the_overlapping_windows_of_the_image() -> None:
    x = torch.randn(2, 3, 32, 32)
    patches = extract_patches(x, grid=3, patch=16)
    assert patches.shape == (2, 3, 3, 3, 16, 16)
    for i in range(3):
        for j in range(3):
            assert torch.equal(patches[:, i, j], x[:, :, 8 * i: 8 * i + 16, 8 * j: 8 * j + 16])
    assert grid_stride(256, 7, 64) == 32  # CPC v1: 7 x 7 patches of 64 px, 32 px overlap
    with pytest.raises(UserError, match="does not tile"):
        grid_stride(32, 4, 16)


def test_context_row_depends_only_on_rows_above_and_itself() -> None:
    torch.manual_seed(0)
    blocks, rows = 3, 6
    net = MaskedConvContext(dim=4, hidden=8, blocks=blocks)
    # sample i of the batch asks for the gradient of output row i: one backward for all rows
    z = torch.randn(rows, 4, rows, 5, requires_grad=True)
    out = net(z)
    torch.stack([out[i, :, i].sum() for i in range(rows)]).sum().backward()
    for i in range(rows):
        reach = z.grad[i].abs().sum(dim=(0, 2))  # gradient reaching each input row
        assert (reach[i + 1:] == 0).all(), f"context row {i} sees rows below it"
        # every row within the receptive field (one row per block) contributes; rows above it do not
        assert (reach[max(0, i - blocks): i + 1] > 0).all()
        assert (reach[: max(0, i - blocks)] == 0).all()


def test_perturbing_a_row_changes_contexts_at_and_below_it_only() -> None:
    torch.manual_seed(1)
    net = MaskedConvContext(dim=4, hidden=8, blocks=5)
    z = torch.randn(1, 4, 7, 7)
    batch = z.repeat(8, 1, 1, 1)  # copy r + 1 has row r changed; copy 0 is the reference
    for r in range(7):
        batch[r + 1, :, r] += torch.randn(4, 7)
    out = net(batch)
    changed = (out[1:] - out[:1]).abs().sum(dim=(1, 3)) > 0  # [copy, row]
    for r in range(7):  # 5 blocks: a row reaches the 5 rows below it, no further
        assert not changed[r, :r].any() and changed[r, r: r + 6].all() and not changed[r, r + 6:].any()


def test_targets_are_exactly_k_rows_below() -> None:
    """One-hot targets: the prediction at (b, i, j) that copies z[b, i + k, j] has all the mass on its label."""
    b, g, w = 2, 5, 3
    n = b * g * w
    targets = torch.eye(n).view(b, g, w, n)  # every patch its own code
    for k in (1, 2, 3):
        _, labels = cpc_logits(targets, targets, k)
        expected = [(bb * g + i + k) * w + j for bb in range(b) for i in range(g - k) for j in range(w)]
        assert labels.tolist() == expected
        right = torch.zeros_like(targets)
        right[:, : g - k] = 30 * targets[:, k:]
        assert cpc_info_nce(right, targets, k) < 1e-6
        logits, _ = cpc_logits(right, targets, k)
        assert torch.equal(logits.argmax(1), labels)
        # off by one row, or the neighbouring column: no prediction picks its positive
        for wrong in (torch.roll(right, 1, dims=1), torch.roll(right, 1, dims=2)):
            logits, _ = cpc_logits(wrong, targets, k)
            assert (logits.argmax(1) != labels).all() and cpc_info_nce(wrong, targets, k) > 3


def cpc_reference(preds: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    b, g, w, _ = targets.shape
    keys = [targets[bb, i, j].double() for bb in range(b) for i in range(g) for j in range(w)]
    total, count = 0.0, 0
    for bb in range(b):
        for i in range(g - k):
            for j in range(w):
                p = preds[bb, i, j].double()
                scores = [float(p @ key) for key in keys]
                positive = float(p @ targets[bb, i + k, j].double())
                total -= positive - math.log(sum(math.exp(s) for s in scores))
                count += 1
    return total / count


def test_loss_matches_loop_reference_and_splits_across_ranks() -> None:
    g = torch.Generator().manual_seed(0)
    preds, targets = torch.randn(4, 4, 3, 6, generator=g), torch.randn(4, 4, 3, 6, generator=g)
    for k in (1, 2, 3):
        assert math.isclose(cpc_info_nce(preds, targets, k).item(), cpc_reference(preds, targets, k), rel_tol=1e-5)
    # two "ranks" of 2 images each, scoring against the gathered keys of both: the mean is the full loss
    keys = targets.reshape(-1, 6)
    halves = [cpc_info_nce(preds[2 * r: 2 * r + 2], targets[2 * r: 2 * r + 2], 2, keys, offset=r * 2 * 4 * 3)
              for r in range(2)]
    assert torch.allclose((halves[0] + halves[1]) / 2, cpc_info_nce(preds, targets, 2), atol=1e-6)


def test_each_direction_puts_its_next_patch_one_row_down() -> None:
    g = 4
    pos = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"))[None].float()  # (row, col)
    steps = {"down": (1, 0), "up": (-1, 0), "right": (0, 1), "left": (0, -1)}
    for direction, step in steps.items():
        turned = orient(pos, direction)
        moved = turned[0, :, 1:] - turned[0, :, :-1]  # one row down in the turned grid
        assert (moved[0] == step[0]).all() and (moved[1] == step[1]).all(), direction
    with pytest.raises(UserError, match="unknown prediction direction"):
        orient(pos, "diagonal")


def test_patch_augmentations() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    assert torch.equal(augment_patches(x, flip_p=1.0), x.flip(-1))
    dropped = augment_patches(x, color_drop_p=1.0)
    kept = (dropped != 0).flatten(2).any(-1)  # [N, C]
    assert (kept.sum(1) == 1).all()  # exactly one channel survives in every patch
    assert torch.equal(dropped[kept], x[kept])
    assert len(set(kept.float().argmax(1).tolist())) == 3  # and it is drawn at random
    jittered = augment_patches(x, jitter=2)
    assert (jittered[:, :, [0, -1]] == 0).all() and (jittered[:, :, :, [0, -1]] == 0).all()
    for n in range(8):  # the interior is a 6-px window of the patch
        inner = jittered[n, :, 1:7, 1:7]
        windows = [x[n, :, dy: dy + 6, dx: dx + 6] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(inner, w) for w in windows)


def test_layer_norm_encoder_is_per_sample_and_loads_into_timm() -> None:
    torch.manual_seed(0)
    enc = with_layer_norm(create_encoder("resnet18"))
    assert enc.spec.timm_kwargs == {"norm_layer": "groupnorm1"}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    enc.train()
    x, other = torch.randn(2, 3, 16, 16), torch.randn(5, 3, 16, 16)
    # no batch statistics: a sample's features do not depend on the rest of the batch, even in train mode
    assert torch.allclose(enc(x), enc(torch.cat([x, other]))[:2], atol=1e-5)
    # GroupNorm(1, C) is layer norm over (C, H, W) with a per-channel scale and shift
    norm, h = enc.model.bn1, torch.randn(2, 64, 5, 5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.normal_()
    flat = h.flatten(1)
    ref = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + norm.eps)
    ref = ref.view_as(h) * norm.weight[:, None, None] + norm.bias[:, None, None]
    assert torch.allclose(norm(h), ref, atol=1e-5)
    model = timm.create_model(enc.spec.timm_name, num_classes=0, **json.loads(json.dumps(enc.spec.timm_kwargs)))
    model.load_state_dict(enc.model.state_dict(), strict=True)
    vit = create_encoder("vit_tiny_p4", img_size=32)
    assert with_layer_norm(vit) is vit  # already normalised per token


def test_method_checks_its_grid_and_builds_one_predictor_per_direction() -> None:
    args = {"grid": 3, "patch_size": 16, "min_offset": 1, "max_offset": 2, "context_blocks": 1, "context_dim": 8,
            "directions": ["down", "left"]}
    method = build_method("cpc", create_encoder("resnet18"), args)
    assert len(method.predictors) == 2 and [len(p.predictors) for p in method.predictors] == [2, 2]
    out = method([torch.randn(4, 3, 32, 32)], {})
    # at init every score is near 0: each of the 2 x 2 terms is about log(number of patches)
    assert abs(out.loss.item() - 4 * math.log(4 * 9)) < 1.0
    with pytest.raises(UserError, match="does not tile"):
        method([torch.randn(4, 3, 31, 31)], {})
    with pytest.raises(UserError, match="offsets"):
        build_method("cpc", create_encoder("resnet18"), {**args, "max_offset": 3})
    with pytest.raises(UserError, match="direction"):
        build_method("cpc", create_encoder("resnet18"), {**args, "directions": ["down", "sideways"]})
    with pytest.raises(UserError, match="norm"):
        build_method("cpc", create_encoder("resnet18"), {**args, "norm": "gn"})
