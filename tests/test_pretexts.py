"""Classic pretext tasks: jigsaw's permutation set, tile normalisation and shuffling; context prediction's
patch grid and labels; rotation's quarter turns; colourisation's bins, soft targets and rebalancing; the context
encoder's masks and loss."""

from __future__ import annotations

import pytest
import torch

from sslcli.errors import UserError
from sslcli.methods.base import build_method
from sslcli.methods.jigsaw import max_hamming_permutations, standardise_tiles
from sslcli.models.encoders import create_encoder


def test_permutations_are_distinct_seeded_and_spread_out() -> None:
    perms = max_hamming_permutations(30, tiles=6, seed=0)
    assert perms.shape == (30, 6) and len({tuple(p.tolist()) for p in perms}) == 30
    assert all(sorted(p.tolist()) == list(range(6)) for p in perms)
    assert torch.equal(perms, max_hamming_permutations(30, tiles=6, seed=0))
    # each choice maximises the mean Hamming distance to those before it (the greedy rule), checked by brute force
    import itertools

    pool = torch.tensor(list(itertools.permutations(range(6))))
    for k in range(1, 30):
        chosen = perms[:k]
        mean_distance = (pool[:, None, :] != chosen[None]).sum(-1).float().mean(1)
        taken = (pool[:, None, :] == chosen[None]).all(-1).any(1)
        best = mean_distance.masked_fill(taken, -1).max()
        assert mean_distance[(pool == perms[k]).all(1)].item() == best.item()
    # more spread than random permutations, whose expected distance is n - 1 (one fixed point on average)
    d = (perms[:, None] != perms[None]).sum(-1).float()
    assert d[~torch.eye(30, dtype=torch.bool)].mean() > 5.0


def test_tiles_are_standardised_each_on_its_own() -> None:
    tiles = torch.rand(5, 3, 7, 7) * torch.arange(1, 6).view(5, 1, 1, 1) + 3
    out = standardise_tiles(tiles)
    assert torch.allclose(out.mean(dim=(1, 2, 3)), torch.zeros(5), atol=1e-5)
    assert torch.allclose(out.std(dim=(1, 2, 3)), torch.ones(5), atol=1e-3)


def test_puzzle_is_the_grid_shuffled_by_the_labelled_permutation() -> None:
    torch.manual_seed(0)
    jigsaw = build_method("jigsaw", create_encoder("resnet18"), {"num_permutations": 10, "tile_fraction": 1.0,
                                                                  "tile_dim": 8, "hidden": 16})
    # cell k = 3 i + j of image b is dark but for one bright pixel at position k of its 4 x 4 (brightness 1 + b)
    images = torch.zeros(2, 3, 12, 12)
    for b in range(2):
        for k in range(9):
            r, c = divmod(k, 3)
            images[b, :, 4 * r + k // 4, 4 * c + k % 4] = 1 + b
    tiles, labels = jigsaw.puzzle(images)
    assert tiles.shape == (2, 9, 3, 4, 4)
    for b in range(2):
        order = jigsaw.permutations[labels[b]]
        for i in range(9):  # tile i is cell order[i]: its bright pixel sits at position order[i]
            assert int(tiles[b, i, 0].flatten().argmax()) == int(order[i])


def test_context_prediction_patches_keep_their_grid_positions_and_labels_name_them() -> None:
    from sslcli.methods.relative_position import NEIGHBOURS

    torch.manual_seed(0)
    method = build_method("relative-position", create_encoder("resnet18"),
                          {"patch_size": 4, "jitter": 2, "color_drop_p": 0.0, "fc6_dim": 8, "hidden": 16})
    # cell k = 3 i + j of a 3 x 3 grid of 6-px cells (4-px patches jittered by 2) holds the value k everywhere
    images = torch.arange(9.0).view(1, 1, 3, 3).repeat_interleave(6, 2).repeat_interleave(6, 3).expand(2, 3, 18, 18)
    patches = method.patches(images.clone())
    assert patches.shape == (2, 9, 3, 4, 4)
    assert torch.equal(patches.mean(dim=(2, 3, 4)), torch.arange(9.0).expand(2, 9))
    assert NEIGHBOURS == (0, 1, 2, 3, 5, 6, 7, 8)  # label k: the k-th non-centre cell in raster order
    out = method([images.clone()], {})
    assert out.loss.isfinite() and out.embedding.shape == (2, 512)


def test_colour_dropping_keeps_one_channel() -> None:
    from sslcli.engine.patches import augment_patches

    torch.manual_seed(0)
    patches = augment_patches(torch.ones(50, 3, 4, 4), color_drop_p=1.0)
    kept = (patches.abs().sum(dim=(2, 3)) > 0).sum(1)
    assert torch.equal(kept, torch.ones(50, dtype=torch.long))


def test_rotations_are_the_four_quarter_turns_labelled_in_blocks() -> None:
    from sslcli.methods.rotation import rotations

    x = torch.arange(2 * 3 * 4 * 4.0).view(2, 3, 4, 4)
    rotated, labels = rotations(x)
    assert rotated.shape == (8, 3, 4, 4) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for k in range(4):
        assert torch.equal(rotated[2 * k: 2 * k + 2], torch.rot90(x, k, dims=(2, 3)))
    # a quarter turn counter-clockwise moves the top-right pixel to the top-left
    assert rotated[2, 0, 0, 0] == x[0, 0, 0, 3]
    with pytest.raises(UserError, match="square crops"):
        rotations(torch.zeros(1, 3, 4, 6))


def test_rotation_is_learnable_on_upright_images() -> None:
    """The mechanism: on images with an orientation (a bright top row) the classifier learns all four labels."""
    torch.manual_seed(0)
    method = build_method("rotation", create_encoder("resnet18"), {})
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    for _ in range(30):
        images = torch.rand(16, 3, 16, 16) * 0.5
        images[:, :, :3] += 1.0
        out = method([images], {})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.logs["rotation_acc"] > 0.9, out.logs


def test_ab_bins_cover_the_srgb_gamut_on_a_grid() -> None:
    from sslcli.colorspace import rgb_to_lab
    from sslcli.losses.colorization import ab_bins

    bins = ab_bins(10)
    assert 240 < len(bins) < 320 and torch.equal(bins % 10, torch.zeros_like(bins))
    ab = rgb_to_lab(torch.rand(3, 2000, 1))[1:].reshape(2, -1).T
    assert torch.cdist(ab, bins).min(1).values.max() <= 5 * 2**0.5 + 1e-3  # every colour lies in a bin's square


def test_soft_encoding_and_rebalancing_follow_their_formulas() -> None:
    from sslcli.losses.colorization import ab_bins, colorization_loss, rebalance_weights, soft_encode

    bins = ab_bins(10)
    ab = torch.tensor([[3.0, -12.0], [41.0, 27.0]]).T.reshape(1, 2, 1, 2)
    z = soft_encode(ab, bins, neighbours=5, sigma=5.0)
    assert z.shape == (1, len(bins), 1, 2) and torch.allclose(z.sum(1), torch.ones(1, 1, 2))
    for j in range(2):
        point = ab[0, :, 0, j]
        d = (bins - point).norm(dim=1)
        nearest = d.argsort()[:5]
        expected = torch.exp(-d[nearest] ** 2 / 50) / torch.exp(-d[nearest] ** 2 / 50).sum()
        assert torch.allclose(z[0, nearest, 0, j], expected, atol=1e-6)
        assert (z[0, :, 0, j] > 0).sum() == 5
    counts = torch.zeros(len(bins))
    counts[:10] = 1000.0
    counts[10:] = 1.0
    w = rebalance_weights(counts, bins, mix=0.5, sigma=5.0)
    kernel = torch.exp(-torch.cdist(bins, bins) ** 2 / 50)
    smoothed = kernel @ (counts / counts.sum())
    smoothed = smoothed / smoothed.sum()
    assert torch.allclose((smoothed * w).sum(), torch.tensor(1.0), atol=1e-4)  # E_p~[w] = 1
    assert w[:10].mean() < w[10:].mean()  # common colours weigh less
    logits = torch.randn(1, len(bins), 1, 2)
    manual = sum(-w[z[0, :, 0, j].argmax()] * (z[0, :, 0, j] * logits[0, :, 0, j].log_softmax(0)).sum()
                 for j in range(2)) / 2
    assert torch.allclose(colorization_loss(logits, z, w), manual, atol=1e-5)


def test_colorization_sees_lightness_only_and_fits_its_class_weights_once() -> None:
    from sslcli.augment import AugmentConfig

    torch.manual_seed(0)
    method = build_method("colorization", create_encoder("resnet18"), {}, augment=AugmentConfig())
    assert method.backbone.model.conv1.in_channels == 1
    assert method.export_metadata()["input_space"] == "lab_l"
    images = torch.randn(4, 3, 32, 32)
    calls = []

    def dataset_features(module: torch.nn.Module) -> torch.Tensor:
        calls.append(1)
        return module(images)

    method.before_epoch(0, dataset_features)
    method.before_epoch(1, dataset_features)
    assert len(calls) == 1 and bool(method.weights_fitted) and not torch.allclose(method.class_weights, torch.ones(1))
    out = method([images], {})
    assert out.loss.isfinite() and out.embedding.shape == (4, 512)


def test_context_encoder_never_sees_the_hole_and_weights_its_rim() -> None:
    from sslcli.augment import AugmentConfig, ViewConfig

    torch.manual_seed(0)
    augment = AugmentConfig(views=[ViewConfig(count=1, size=32)])
    method = build_method("inpainting", create_encoder("resnet18"), {"overlap": 2, "overlap_weight": 10.0,
                                                                      "decoder_width": 32}, augment=augment).eval()
    images = torch.randn(2, 3, 32, 32)
    context, weights = method.drop(images)
    hole = weights[0, 0] == 1
    assert hole.sum() == 12 * 12 and hole[10:22, 10:22].all()  # the 16-px centre shrunk by 2 px on each side
    assert (weights[0, 0] == 10).sum() == 16 * 16 - 12 * 12 and (weights[0, 0] == 0).sum() == 32 * 32 - 16 * 16
    assert torch.equal(context[:, :, hole], torch.zeros(2, 3, 144))
    assert torch.equal(context[:, :, ~hole], images[:, :, ~hole])
    changed = images.clone()
    changed[:, :, 12:20, 12:20] = 5.0  # inside the hole: the encoder's input, hence the loss's prediction, is unchanged
    with torch.no_grad():
        assert torch.equal(method.backbone(method.drop(changed)[0]), method.backbone(context))
        out = method([images], {})
        filled = method.decoder(method.backbone(context))
    expected = (weights * (filled - images) ** 2).sum() / (weights.sum() * 3)
    assert torch.allclose(out.loss, expected, atol=1e-5)


def test_random_block_masks_drop_their_blocks() -> None:
    from sslcli.methods.inpainting import block_masks

    masks = block_masks(50, 32, blocks=1, block=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks.sum(dim=(1, 2)), torch.full((50,), 64))  # one 8 x 8 square each
    rows = masks.any(2).float().argmax(1)
    cols = masks.any(1).float().argmax(1)
    for m, r, c in zip(masks, rows, cols):
        assert m[r: r + 8, c: c + 8].all()
