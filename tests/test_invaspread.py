"""InvaSpread: the loss against a loop reference and the identity "original" view (2 ranks = 1 rank: test_distributed)."""

import math

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from sslcli.augment import AugmentConfig, MultiView
from sslcli.config import build_config
from sslcli.losses.invaspread import invaspread_loss


def invaspread_reference(f: torch.Tensor, f_hat: torch.Tensor, t: float) -> float:
    """The paper's loss written out: P(j|i) over k != i, the positive's log P, log(1 - P) for the rest."""
    z = torch.cat([f, f_hat]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        e = {j: math.exp(float(z[i] @ z[j]) / t) for j in range(n2) if j != i}
        denom = sum(e.values())
        total += math.log(e[pos] / denom)
        total += sum(math.log(1 - e[j] / denom) for j in e if j != pos)
    return -total / n2


def test_loss_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    f, f_hat = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    for t in (0.1, 0.5, 1.0):
        assert math.isclose(invaspread_loss(f, f_hat, t).item(), invaspread_reference(f, f_hat, t), rel_tol=1e-5)


def test_loss_is_low_for_invariant_spread_embeddings() -> None:
    z = torch.eye(8)
    assert invaspread_loss(z, z, 0.1) < invaspread_loss(z, torch.roll(z, 1, dims=0), 0.1)


def test_loss_stays_finite_when_a_negative_takes_all_the_mass() -> None:
    """P(j|i) -> 1 for a negative: log(1 - P) must not turn into NaN in the loss or its gradient."""
    f = torch.tensor([[1.0, 0.0], [1.0, 1e-4]], requires_grad=True)
    f_hat = torch.tensor([[-1.0, 0.0], [-1.0, 0.0]])
    loss = invaspread_loss(f, f_hat, 0.05)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f.grad).all()


def test_global_keys_with_offsets_equal_the_full_batch() -> None:
    """Each rank's anchors against the gathered keys: the mean of the per-rank losses is the full loss."""
    g = torch.Generator().manual_seed(1)
    f, f_hat = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    full = invaspread_loss(f, f_hat, 0.1)
    halves = [invaspread_loss(f[r * 4:(r + 1) * 4], f_hat[r * 4:(r + 1) * 4], 0.1, keys=f, keys_hat=f_hat,
                              offset=r * 4) for r in range(2)]
    assert torch.allclose((halves[0] + halves[1]) / 2, full, atol=1e-6)


def test_gradient_flows_only_through_anchors() -> None:
    g = torch.Generator().manual_seed(2)
    f, f_hat = torch.randn(6, 5, generator=g, requires_grad=True), torch.randn(6, 5, generator=g, requires_grad=True)
    keys, keys_hat = f.detach().clone().requires_grad_(), f_hat.detach().clone().requires_grad_()
    invaspread_loss(f, f_hat, 0.1, keys=keys, keys_hat=keys_hat).backward()
    assert keys.grad is None and keys_hat.grad is None
    assert f.grad.abs().sum() > 0 and f_hat.grad.abs().sum() > 0

    # The default keys (the anchors themselves) are detached too: the same gradient as separate copies.
    grads = f.grad.clone(), f_hat.grad.clone()
    f.grad = f_hat.grad = None
    invaspread_loss(f, f_hat, 0.1).backward()
    assert torch.allclose(f.grad, grads[0]) and torch.allclose(f_hat.grad, grads[1])

    # Anchor i's gradient comes from its own row alone: d/df_i of the loss with every key frozen equals
    # d/df_i of -(1/2N) [log P(pos|i) + sum log(1 - P(j|i))], computed from the reference row by autograd.
    i, t = 2, 0.1
    z = torch.nn.functional.normalize(torch.cat([f, f_hat]).detach().double(), dim=1)
    anchor = torch.cat([f, f_hat]).detach().double()[i].clone().requires_grad_()
    a = torch.nn.functional.normalize(anchor, dim=0)
    e = torch.exp(z @ a / t)
    e = torch.cat([e[:i], torch.zeros(1, dtype=e.dtype), e[i + 1:]])
    p = e / e.sum()
    pos = i + 6
    row = torch.log(p[pos]) + sum(torch.log(1 - p[j]) for j in range(12) if j not in (i, pos))
    (-row / 12).backward()
    assert torch.allclose(f.grad[i].double(), anchor.grad, atol=1e-6)


def _original_view(img: Image.Image) -> tuple[torch.Tensor, AugmentConfig]:
    """The first view of the small recipe (the paper recipe's original differs only in mean / std)."""
    cfg = build_config("invaspread", "small")
    return MultiView(cfg.augment)(img)[0], cfg.augment


def test_original_view_is_the_whole_image_resized() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    view, aug = _original_view(img)
    size = aug.views[0].size
    plain = T.Compose([T.ToImage(), T.Resize((size, size), antialias=True), T.ToDtype(torch.float32, scale=True),
                       T.Normalize(list(aug.mean), list(aug.std))])(img)
    assert view.shape == (3, size, size) and torch.equal(view, plain)
    for _ in range(5):  # no randomness left: flip, jitter, grayscale and blur are all off
        assert torch.equal(_original_view(img)[0], view)


def test_original_view_of_a_non_square_image_is_its_centre_square() -> None:
    """RandomResizedCrop's fallback when no square crop of the whole area fits: the centred square."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))  # H 48, W 64
    view, aug = _original_view(img)
    size = aug.views[0].size
    plain = T.Compose([T.ToImage(), T.CenterCrop(48), T.Resize((size, size), antialias=True),
                       T.ToDtype(torch.float32, scale=True), T.Normalize(list(aug.mean), list(aug.std))])(img)
    assert torch.equal(view, plain)
