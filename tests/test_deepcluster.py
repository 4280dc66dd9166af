"""DeepCluster: chunked k-means and PCA whitening against references, the Sobel input, pseudo-labels,
uniform-over-clusters weights and the per-epoch re-initialised classifier."""

import pytest
import torch
import torch.nn.functional as F

from sslcli.colorspace import sobel, to_input_space
from sslcli.engine.kmeans import assign, kmeans, pca_whiten
from sslcli.errors import UserError
from sslcli.methods import build_method
from sslcli.models.encoders import create_encoder


def _reference_lloyd(x: torch.Tensor, init: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain Lloyd iterations with explicit loops over points and clusters."""
    c = init.clone().double()
    x = x.double()
    for _ in range(iterations + 1):
        labels = torch.tensor([int(torch.argmin(((c - p) ** 2).sum(1))) for p in x])
        if _ == iterations:
            break
        for j in range(c.shape[0]):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(0)
    return c, labels


def test_kmeans_equals_reference_lloyd_and_is_seeded() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 5, generator=g) + 6 * torch.randn(1, 5, generator=g) for _ in range(4)])
    centroids, labels = kmeans(x, 4, iterations=7, seed=3, chunk=13)  # chunks smaller than N
    init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(3))[:4]]
    ref_c, ref_labels = _reference_lloyd(x, init, 7)
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(centroids.double(), ref_c, rtol=1e-5, atol=1e-5)
    assert torch.equal(kmeans(x, 4, iterations=7, seed=3)[1], labels)
    # Well-separated blobs come out as the four clusters (up to naming).
    blobs = torch.arange(160) // 40
    assert all(len(set(labels[blobs == b].tolist())) == 1 for b in range(4))


def test_an_emptied_cluster_is_refilled_by_splitting_the_largest() -> None:
    # 100 points around 0 and two identical points at 50.  When both copies are drawn as initial
    # centroids, the second loses every tie and empties; the split of the big cluster refills it.
    x = torch.cat([torch.linspace(-1, 1, 100), torch.tensor([50.0, 50.0])])[:, None]
    seed = next(s for s in range(10000)
                if {100, 101} <= set(torch.randperm(102, generator=torch.Generator().manual_seed(s))[:3].tolist()))
    centroids, labels = kmeans(x, 3, iterations=10, seed=seed)
    counts = torch.bincount(labels, minlength=3)
    assert sorted(counts.tolist()) == [2, 50, 50], counts
    assert sorted(round(float(c), 1) for c in centroids[:, 0]) == [-0.5, 0.5, 50.0]


def test_assign_matches_brute_force() -> None:
    x, c = torch.randn(50, 8), torch.randn(7, 8)
    labels, dist = assign(x, c, chunk=9)
    full = torch.cdist(x, c) ** 2
    assert torch.equal(labels, full.argmin(1))
    torch.testing.assert_close(dist, full.min(1).values, rtol=1e-4, atol=1e-4)


def test_pca_whiten_matches_an_svd_reference() -> None:
    x = torch.randn(200, 12) @ torch.randn(12, 12) + 3.0
    y = pca_whiten(x, 5, eps=0.0)
    centred = (x - x.mean(0)).double()
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    ref = F.normalize(centred @ vh[:5].T / (s[:5] / (len(x) - 1) ** 0.5), dim=1)
    assert y.shape == (200, 5)
    torch.testing.assert_close(y.double().abs(), ref.abs(), rtol=1e-4, atol=1e-5)  # axes are defined up to sign
    torch.testing.assert_close(y.norm(dim=1), torch.ones(200))
    assert pca_whiten(x, 99).shape == (200, 12)


def test_sobel_of_a_vertical_edge_and_of_flat_colour() -> None:
    img = torch.zeros(1, 3, 6, 6)
    img[..., 3:] = 1.0  # white right half
    g = sobel(img)[0]
    # conv2d is cross-correlation: kernel columns (1, 0, -1) -> (left - right) weighted 1, 2, 1.
    assert torch.allclose(g[0, 1:5, 2], torch.full((4,), -4.0)) and torch.allclose(g[0, 1:5, 3], torch.full((4,), -4.0))
    assert torch.all(g[0, 1:5, 0:2] == 0) and torch.all(g[1, 1:5, 1:5] == 0)
    flat = torch.ones(3, 5, 5) * torch.tensor([0.9, 0.1, 0.3])[:, None, None]
    assert torch.allclose(to_input_space(flat, "sobel")[:, 1:4, 1:4], torch.zeros(2, 3, 3), atol=1e-6)


def _method(**kwargs: object):
    args = {"num_clusters": 4, "pca_dim": 8, "mlp_hidden": 16, "mlp_layers": 2, "kmeans_iterations": 5, **kwargs}
    return build_method("deepcluster", create_encoder("resnet18"), args, num_samples=24)


def test_pseudo_labels_weights_and_reinitialised_classifier() -> None:
    torch.manual_seed(0)
    method = _method()
    assert method.backbone.spec.timm_kwargs["in_chans"] == 2  # the Sobel input
    images = torch.randn(24, 3, 32, 32)
    with torch.no_grad():
        method.top.weight.fill_(5.0)
    reset = method.before_epoch(0, lambda module: module.eval()(images).detach())
    assert reset == list(method.top.parameters())
    assert method.top.weight.std() < 0.05 and torch.all(method.top.bias == 0)
    y = method.pseudo_labels
    assert y.shape == (24,) and (y >= 0).all() and (y < 4).all()
    counts = torch.bincount(y, minlength=4).float()
    # Uniform over clusters: every non-empty cluster carries the same total weight N / K'.
    mass = torch.zeros(4).index_add_(0, y, method.label_weights[y])
    assert torch.allclose(mass[counts > 0], torch.full((int((counts > 0).sum()),), 24 / float((counts > 0).sum())))

    method.train()
    idx = torch.tensor([3, 7, 11, 19])
    out = method([images[idx]], {"index": idx})
    logits = method.top(F.relu(method.features(images[idx])))
    ref = (method.label_weights[y[idx]] * F.cross_entropy(logits, y[idx], reduction="none")).mean()
    torch.testing.assert_close(out.loss, ref, rtol=1e-4, atol=1e-5)
    assert out.embedding.shape == (4, 16)


def test_reassign_every_keeps_labels_and_top_layer_between_clusterings() -> None:
    torch.manual_seed(0)
    method = _method(reassign_every=2)
    images = torch.randn(24, 3, 32, 32)
    calls: list[int] = []

    def features(module: torch.nn.Module) -> torch.Tensor:
        calls.append(1)
        return module.eval()(images).detach()

    assert method.before_epoch(0, features) == list(method.top.parameters())
    labels, top = method.pseudo_labels.clone(), method.top.weight.detach().clone()
    with torch.no_grad():
        method.top.weight.add_(1.0)  # as if trained during epoch 0
    assert method.before_epoch(1, features) == [] and len(calls) == 1
    assert torch.equal(method.pseudo_labels, labels) and torch.equal(method.top.weight, top + 1.0)
    assert method.before_epoch(2, features) == list(method.top.parameters()) and len(calls) == 2
    assert method.top.weight.std() < 0.05  # re-initialised with the new clusters
    # A resumed run that starts on an off epoch without labels clusters anyway.
    fresh = _method(reassign_every=2)
    assert fresh.before_epoch(3, features) == list(fresh.top.parameters()) and (fresh.pseudo_labels >= 0).all()


def test_rgb_input_bad_arguments_and_missing_labels() -> None:
    method = _method(sobel=False)
    assert method.backbone.spec.timm_kwargs.get("in_chans", 3) == 3 and method.export_metadata() == {}
    with pytest.raises(RuntimeError, match="before_epoch"):
        method([torch.randn(2, 3, 32, 32)], {"index": torch.tensor([0, 1])})
    with pytest.raises(UserError, match="num_clusters"):
        _method(num_clusters=100)
