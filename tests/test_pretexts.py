"""Classic pretext tasks: jigsaw's permutation set, tile normalisation and shuffling; context prediction's
patch grid and labels."""

from __future__ import annotations

import torch

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
