"""DenseCL: the cross-view correspondence, the dense InfoNCE, and one step of the method against a
loop-based reference (Wang et al., CVPR 2021, and the official code's ``DenseCL.forward_train``)."""

import math

import pytest
import torch
import torch.nn.functional as F

from sslcli.config import build_config
from sslcli.engine import shuffle_bn
from sslcli.errors import UserError
from sslcli.losses import info_nce
from sslcli.losses.dense import dense_correspondence, dense_info_nce
from sslcli.methods.base import build_method
from sslcli.models.encoders import create_encoder


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def test_correspondence_is_the_argmax_cosine_not_the_argmax_dot_product() -> None:
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # [1, 3, 2]
    key = torch.tensor([[[0.0, 2.0], [10.0, 10.0], [3.0, 0.1]]])
    # (1, 0): cosines 0, 0.707, 0.9994 -> 2, although key 1 has the largest dot product (10 vs 3).
    # (0, 1): cosine 1 with key 0 -> 0.  (1, 1): cosine 1 with key 1 -> 1.
    assert dense_correspondence(query, key).tolist() == [[2, 0, 1]]


def test_correspondence_recovers_a_permutation_of_the_locations() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 16, 32, generator=g)  # 3 images, a 4 x 4 map, 32 channels
    perms = [torch.randperm(16, generator=g) for _ in range(3)]
    scale = torch.rand(3, 16, 1, generator=g) + 0.5  # cosine ignores each location's norm
    key = torch.stack([feats[b, perms[b]] for b in range(3)]) * scale  # key[b, j] = feats[b, perm_b[j]]
    match = dense_correspondence(feats, key)
    for b in range(3):  # query i sits at the key location j with perm_b[j] = i
        assert torch.equal(match[b], torch.argsort(perms[b]))
        assert torch.equal(perms[b][match[b]], torch.arange(16))


def dense_info_nce_reference(r: torch.Tensor, t: torch.Tensor, match: torch.Tensor, queue: torch.Tensor,
                             tau: float) -> float:
    total, count = 0.0, 0
    for b in range(r.shape[0]):
        for i in range(r.shape[1]):
            pos = math.exp(_cos(r[b, i], t[b, int(match[b, i])]) / tau)
            neg = sum(math.exp(_cos(r[b, i], n) / tau) for n in queue)
            total, count = total - math.log(pos / (pos + neg)), count + 1
    return total / count


def test_dense_info_nce_matches_reference() -> None:
    g = torch.Generator().manual_seed(1)
    r, t, queue = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g), torch.randn(5, 6, generator=g)
    match = torch.randint(0, 4, (2, 4), generator=g)
    for tau in (0.2, 1.0):
        assert math.isclose(dense_info_nce(r, t, match, queue, tau).item(),
                            dense_info_nce_reference(r, t, match, queue, tau), rel_tol=1e-5)


def test_permuted_key_view_gives_the_loss_of_the_aligned_one() -> None:
    """Key locations shuffled (maps and dense vectors alike): the correspondence undoes the shuffle."""
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 9, 16, generator=g)  # a 3 x 3 map
    r, t = torch.randn(2, 9, 8, generator=g), torch.randn(2, 9, 8, generator=g)
    queue = torch.randn(7, 8, generator=g)
    perm = torch.randperm(9, generator=g)
    aligned = info_nce(r.reshape(-1, 8), t.reshape(-1, 8), queue, 0.2)
    shuffled = dense_info_nce(r, t[:, perm], dense_correspondence(feats, feats[:, perm]), queue, 0.2)
    assert torch.allclose(shuffled, aligned, atol=1e-6)
    unmatched = dense_info_nce(r, t[:, perm], torch.arange(9).expand(2, 9), queue, 0.2)
    assert not torch.allclose(unmatched, aligned, atol=1e-3)


def test_shuffled_forward_reorders_every_output_of_a_tuple() -> None:
    bn = torch.nn.BatchNorm1d(4, affine=False).train()
    x = torch.randn(12, 4) + torch.arange(12.0)[:, None]
    torch.manual_seed(3)
    single = shuffle_bn.shuffled_forward(bn, x, splits=3)
    torch.manual_seed(3)
    first, second = shuffle_bn.shuffled_forward(lambda v: (bn(v), v * 2), x, splits=3)
    assert torch.allclose(first, single, atol=1e-6) and torch.equal(second, x * 2)


def _method(**kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(dim=8, mlp_hidden=16, queue_size=6, temperature=0.2, shuffle_splits=1) | kw
    return build_method("densecl", create_encoder("resnet18"), args)


def test_one_step_matches_a_loop_reference_on_backbone_correspondence() -> None:
    """(1 - lambda) InfoNCE(global) + lambda mean over locations of InfoNCE(dense), recomputed by hand."""
    method = _method(loss_lambda=0.3).eval()  # eval: BN from running stats, so separate forwards agree
    with torch.no_grad():  # a key encoder distinct from the query, as after some EMA steps
        for p in method.key.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(4)
    x_q, x_k = torch.randn(3, 3, 64, 64, generator=g), torch.randn(3, 3, 64, 64, generator=g)
    queue, dense_queue = method.queue.negatives(), method.dense_queue.negatives()
    out = method([x_q, x_k], {})

    with torch.no_grad():
        maps = {}
        for name, net, x in (("q", method.query, x_q), ("k", method.key, x_k)):
            fmap = net.encoder.forward_dense(x)  # [3, 512, 2, 2]
            locs = [fmap[:, :, i // 2, i % 2] for i in range(4)]  # 4 x [3, 512]
            maps[name] = (net.global_head(fmap.mean(dim=(2, 3))), [net.dense_head(v) for v in locs], locs)
        (q, r, fq), (k, t, fk) = maps["q"], maps["k"]
        head_match = [[max(range(4), key=lambda j: _cos(r[i][b], t[j][b])) for i in range(4)] for b in range(3)]
    match = [[max(range(4), key=lambda j: _cos(fq[i][b], fk[j][b])) for i in range(4)] for b in range(3)]
    assert match != head_match, "test data must tell backbone from head correspondences apart"
    glob = sum(-math.log(math.exp(_cos(q[b], k[b]) / 0.2) / (math.exp(_cos(q[b], k[b]) / 0.2)
               + sum(math.exp(_cos(q[b], n) / 0.2) for n in queue))) for b in range(3)) / 3
    dense = 0.0
    for b in range(3):
        for i in range(4):
            pos = math.exp(_cos(r[i][b], t[match[b][i]][b]) / 0.2)
            dense -= math.log(pos / (pos + sum(math.exp(_cos(r[i][b], n) / 0.2) for n in dense_queue)))
    expected = 0.7 * glob + 0.3 * dense / 12
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-4)

    # Queues: the global keys, and one averaged dense key per image (the official code's k2).
    assert torch.allclose(method.queue.keys[:3], F.normalize(k, dim=1), atol=1e-5)
    assert torch.allclose(method.dense_queue.keys[:3], F.normalize(sum(t) / 4, dim=1), atol=1e-5)
    assert torch.equal(method.dense_queue.keys[3:], dense_queue[3:])


def test_gradients_reach_both_heads_and_the_key_encoder_moves_by_ema() -> None:
    method = _method(momentum=0.5)
    out = method([torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)], {})
    out.loss.backward()
    assert method.query.dense_head[0].weight.grad.abs().sum() > 0
    assert method.query.global_head[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.key.parameters())
    q_w, k_w = method.query.dense_head[0].weight, method.key.dense_head[0].weight
    with torch.no_grad():
        q_w.add_(1.0)
    before = k_w.clone()
    method.after_step(0.0)
    assert torch.allclose(k_w, 0.5 * before + 0.5 * q_w, atol=1e-6)


def test_small_recipe_gives_the_dense_loss_a_spatial_map() -> None:
    cfg = build_config("densecl", "small", {}, [])
    size = cfg.augment.views[0].size
    x = torch.randn(2, 3, size, size)  # 2 images: train-mode BN needs more than one value per channel
    assert create_encoder(cfg.arch).forward_dense(x).shape[-2:] == (2, 2)  # dilated last stage: stride 16
    assert create_encoder("resnet18").forward_dense(x).shape[-2:] == (1, 1)  # stride 32: nothing to match


def test_token_backbones_and_bad_lambda_are_user_errors() -> None:
    vit = build_method("densecl", create_encoder("vit_tiny_p4", img_size=32), dict(queue_size=4, mlp_hidden=8))
    with pytest.raises(UserError, match="convolutional backbone"):
        vit([torch.randn(2, 3, 32, 32)] * 2, {})
    with pytest.raises(UserError, match="loss_lambda"):
        _method(loss_lambda=1.5)
