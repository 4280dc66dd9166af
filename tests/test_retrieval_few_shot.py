"""CLIP evaluation maths: retrieval recall vs brute force, chance levels by enumeration, the L-BFGS
logistic probe, balanced few-shot sampling, the few-shot curve, and the PIL figures."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sslcli.errors import UserError
from sslcli.evaluation.logistic import (
    balanced_shots,
    few_shot_curve,
    fit_logistic,
    predict_logistic,
    shots_for_curve,
    standardise,
)
from sslcli.evaluation.plots import PALETTE, confusion_layout, confusion_matrix, confusion_png, curve_axes, curve_png
from sslcli.evaluation.retrieval import retrieval_recall, unique_texts



@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These tensors are tiny: extra intra-op threads only add OpenMP spin-waits, which on a busy
    2-core machine make each L-BFGS evaluation ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# 12 images, 4 distinct captions seen (counts 4, 3, 1, 4) in a shuffled order.
CAPTIONS = ["a red disc", "a blue square", "a red disc", "a green star", "a blue square", "a red disc",
            "a tiny ring", "a tiny ring", "a blue square", "a red disc", "a tiny ring", "a tiny ring"]


def brute_force_recall(image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[float, float]:
    """(image->text, text->image) R@k from an explicit argsort per query, over captions with images."""
    sim = image.double() @ text.double().T
    i2t = [float(int(ids[i]) in sim[i].argsort(descending=True)[:k].tolist()) for i in range(len(ids))]
    t2i = []
    for u in sorted(set(ids.tolist())):
        top = sim[:, u].argsort(descending=True)[:k].tolist()
        t2i.append(float(any(int(ids[i]) == u for i in top)))
    return sum(i2t) / len(i2t), sum(t2i) / len(t2i)


def embeddings(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_unique_texts_first_seen_order() -> None:
    unique, ids = unique_texts(CAPTIONS)
    assert unique == ["a red disc", "a blue square", "a green star", "a tiny ring"]
    assert [unique[i] for i in ids.tolist()] == CAPTIONS


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_brute_force_with_duplicates_and_a_distractor(seed: int) -> None:
    unique, ids = unique_texts(CAPTIONS)
    unique = unique + ["a caption no image has"]  # a distractor for image->text only
    image, text = embeddings(len(CAPTIONS), 6, seed), embeddings(len(unique), 6, seed + 100)
    out = retrieval_recall(image, CAPTIONS, text, unique, ks=(1, 2, 3, 5))
    for k in (1, 2, 3, 5):
        i2t, t2i = brute_force_recall(image, text, ids, k)
        assert out[f"image_to_text_r{k}"] == pytest.approx(i2t, abs=1e-12)
        assert out[f"text_to_image_r{k}"] == pytest.approx(t2i, abs=1e-12)
    assert out["image_to_text_r5"] == 1.0  # k equals the gallery size


def test_perfect_embeddings_give_recall_one() -> None:
    unique, ids = unique_texts(CAPTIONS)
    text = torch.eye(len(unique), 8)
    out = retrieval_recall(text[ids], CAPTIONS, text, unique, ks=(1, 5))
    assert all(out[f"{d}_r{k}"] == 1.0 for d in ("image_to_text", "text_to_image") for k in (1, 5))


def test_chance_levels_match_exact_enumeration_and_collapsed_embeddings() -> None:
    captions = ["x", "x", "y", "z", "z"]
    unique, ids = unique_texts(captions)
    n = len(captions)
    for k in (1, 2, 3, 4):
        # Every ranking of the 5 images (text->image) and of the 3 captions (image->text) equally likely.
        t2i = statistics.fmean(
            statistics.fmean(float(any(ids[i] == u for i in perm[:k])) for perm in itertools.permutations(range(n)))
            for u in range(len(unique)))
        i2t = statistics.fmean(float(u in perm[:k]) for perm in itertools.permutations(range(3)) for u in range(3))
        collapsed = torch.ones(n, 4) / 2  # every similarity ties: expected recall must be chance
        out = retrieval_recall(collapsed, captions, torch.ones(3, 4) / 2, unique, ks=(k,))
        for key, exact in (("text_to_image", t2i), ("image_to_text", i2t)):
            assert out[f"{key}_chance_r{k}"] == pytest.approx(exact, abs=1e-12)
            assert out[f"{key}_r{k}"] == pytest.approx(exact, abs=1e-12)
        # A caption no image has widens the image->text gallery and is no text->image query.
        wider = retrieval_recall(collapsed, captions, torch.ones(4, 4) / 2, unique + ["w"], ks=(k,))
        assert wider[f"text_to_image_chance_r{k}"] == pytest.approx(t2i, abs=1e-12)
        assert wider[f"image_to_text_chance_r{k}"] == pytest.approx(min(k, 4) / 4, abs=1e-12)


def test_ties_score_the_mean_over_random_tie_breaks() -> None:
    unique, ids = unique_texts(CAPTIONS)
    gen = torch.Generator().manual_seed(5)
    # 0/1 vectors: integer similarities, so many exact ties among images and among captions.
    image = torch.randint(0, 2, (12, 3), generator=gen).float()
    text = torch.randint(0, 2, (4, 3), generator=gen).float()
    out = retrieval_recall(image, CAPTIONS, text, unique, ks=(1, 2, 4))
    # Monte-Carlo: jitter far below the gap between distinct similarities breaks ties at random.
    noisy = image @ text.T + 1e-3 * torch.rand(20000, 12, 4, generator=gen)
    own = noisy.gather(2, ids.expand(20000, 12)[..., None])
    best = torch.stack([own[:, ids == u, 0].amax(1) for u in range(4)], 1)
    i2t_rank, t2i_rank = (noisy > own).sum(2), (noisy > best[:, None, :]).sum(1)
    for k in (1, 2, 4):
        assert out[f"image_to_text_r{k}"] == pytest.approx(float((i2t_rank < k).double().mean()), abs=0.01)
        assert out[f"text_to_image_r{k}"] == pytest.approx(float((t2i_rank < k).double().mean()), abs=0.01)


def test_chunking_gives_identical_results() -> None:
    captions = [f"caption {i % 17}" for i in range(203)]
    unique, _ = unique_texts(captions)
    image, text = embeddings(203, 16, 3), embeddings(len(unique), 16, 4)
    whole = retrieval_recall(image, captions, text, unique, ks=(1, 5, 10))
    assert retrieval_recall(image, captions, text, unique, ks=(1, 5, 10), chunk_size=7) == whole
    assert retrieval_recall(image, captions, text, unique, ks=(1, 5, 10), chunk_size=1) == whole


def test_retrieval_bad_input() -> None:
    unique, _ = unique_texts(CAPTIONS)
    image, text = embeddings(12, 4, 0), embeddings(len(unique), 4, 1)
    with pytest.raises(UserError, match="not in unique_captions"):
        retrieval_recall(image, CAPTIONS, text[:3], unique[:3])
    with pytest.raises(UserError, match="positive"):
        retrieval_recall(image, CAPTIONS, text, unique, ks=(0,))
    with pytest.raises(UserError, match="NaN"):
        retrieval_recall(image * float("nan"), CAPTIONS, text, unique)


def clusters(n: int, num_classes: int, dim: int, *, seed: int, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * spread
    y = torch.arange(n) % num_classes
    return centres[y] + torch.randn(n, dim, generator=gen), y


def test_fit_logistic_separates_and_is_a_stationary_point() -> None:
    x, y = clusters(90, 3, 5, seed=0, spread=8.0)
    weight, bias = fit_logistic(x, y, 3, weight_decay=1e-4)
    assert weight.shape == (5, 3) and bias.shape == (3,) and weight.dtype == torch.float64
    assert (predict_logistic(x, weight, bias) == y).all()

    x, y = clusters(120, 4, 6, seed=1, spread=1.0)  # overlapping: a finite, interior optimum
    weight, bias = fit_logistic(x, y, 4, weight_decay=1e-2)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    logits = x.double() @ w + b
    objective = -logits.log_softmax(1)[torch.arange(len(y)), y].mean() + 0.5e-2 * (w * w).sum()
    grads = torch.autograd.grad(objective, [w, b])
    assert max(float(g.abs().max()) for g in grads) < 1e-6
    again = fit_logistic(x, y, 4, weight_decay=1e-2)
    assert torch.equal(again[0], weight) and torch.equal(again[1], bias)


def test_weight_decay_shrinks_weights_and_bad_labels_raise() -> None:
    x, y = clusters(120, 4, 6, seed=1, spread=1.0)
    norms = [float(fit_logistic(x, y, 4, weight_decay=wd)[0].norm()) for wd in (1e-3, 1e-1, 1.0)]
    assert norms[0] > norms[1] > norms[2] > 0
    with pytest.raises(UserError, match="outside 0..2"):
        fit_logistic(x, y, 3)


def test_balanced_shots_counts_seeds_and_errors() -> None:
    order = torch.randperm(21, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0] * 5 + [1] * 7 + [2] * 3 + [4] * 6)[order]  # class 3 absent
    picked = balanced_shots(labels, 3, seed=0)
    assert len(set(picked.tolist())) == 12
    assert torch.bincount(labels[picked], minlength=5).tolist() == [3, 3, 3, 0, 3]
    assert torch.equal(picked, balanced_shots(labels, 3, seed=0))
    assert any(not torch.equal(picked, balanced_shots(labels, 3, seed=s)) for s in range(1, 5))
    assert set(balanced_shots(labels, 1, seed=0).tolist()) <= set(picked.tolist())  # nested across shots
    with pytest.raises(UserError, match="class 2 has 3 training samples"):
        balanced_shots(labels, 4, seed=0)
    with pytest.raises(UserError, match="not positive"):
        balanced_shots(labels, 0, seed=0)


def test_shots_for_curve_validation() -> None:
    assert shots_for_curve([4, 1, 4, 2]) == [1, 2, 4]
    for bad in ([0], [1, -2], []):
        with pytest.raises(UserError, match="shot"):
            shots_for_curve(bad)


def test_standardise_uses_training_rows_and_guards_constant_features() -> None:
    train = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]], dtype=torch.float64)
    test = torch.tensor([[3.0, 7.0, 5.0]], dtype=torch.float64)
    z_train, z_test = standardise(train, test)
    assert torch.allclose(z_train[:, [0, 2]].mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(z_train[:, [0, 2]].std(0, unbiased=False), torch.ones(2, dtype=torch.float64))
    assert z_train[:, 1].eq(0).all() and z_test[0, 1] == 2.0  # constant feature: centred, not divided by 0
    assert z_test[0, 0] == 0.0 and z_test[0, 2] == pytest.approx((5 - 5) / train[:, 2].std(unbiased=False))


def test_few_shot_curve_rises_with_shots() -> None:
    train_x, train_y = clusters(400, 5, 16, seed=2, spread=0.6)
    test_x, test_y = clusters(500, 5, 16, seed=3, spread=0.6)
    curve = few_shot_curve(train_x, train_y, test_x, test_y, 5, shots=(16, 1, 4), seeds=(0, 1, 2))
    assert list(curve) == ["1", "4", "16"]
    for entry in curve.values():
        assert len(entry["runs"]) == 3 and all(0.0 <= r <= 1.0 for r in entry["runs"])
        assert entry["mean"] == pytest.approx(statistics.fmean(entry["runs"]))
        assert entry["std"] == pytest.approx(statistics.stdev(entry["runs"]))
    assert curve["16"]["mean"] > curve["1"]["mean"] + 0.1
    assert curve == few_shot_curve(train_x, train_y, test_x, test_y, 5, shots=(1, 4, 16), seeds=(0, 1, 2))
    # Standardisation makes the probe blind to per-feature units, which the weight decay is not.
    scale = 10 ** torch.linspace(-2, 2, 16)
    rescaled = few_shot_curve(train_x * scale + 3, train_y, test_x * scale + 3, test_y, 5, shots=(1, 4), seeds=(0, 1))
    assert all(rescaled[k]["runs"] == pytest.approx(curve[k]["runs"][:2], abs=0.005) for k in ("1", "4"))


def test_confusion_matrix_matches_manual_count() -> None:
    gen = torch.Generator().manual_seed(0)
    true, pred = torch.randint(0, 4, (200,), generator=gen), torch.randint(0, 4, (200,), generator=gen)
    manual = torch.zeros(4, 4, dtype=torch.long)
    for t, p in zip(true.tolist(), pred.tolist()):
        manual[t, p] += 1
    assert torch.equal(confusion_matrix(pred, true, 4), manual)
    with pytest.raises(UserError, match="outside"):
        confusion_matrix(pred, true, 3)


def luminance(image: Image.Image, xy: tuple[int, int]) -> float:
    r, g, b = image.getpixel(xy)
    return 0.299 * r + 0.587 * g + 0.114 * b


@pytest.mark.parametrize("num_classes", [2, 7, 100])
def test_confusion_png_diagonal_darker(num_classes: int, tmp_path: Path) -> None:
    names = [f"class number {i} with a long name" for i in range(num_classes)]
    matrix = torch.diag(torch.arange(1, num_classes + 1) * 10)
    path = confusion_png(matrix, names, tmp_path / "sub" / "cm.png", title="perfect")
    layout = confusion_layout(names, int(matrix.max()), "perfect")
    with Image.open(path) as image:
        image = image.convert("RGB")
        assert image.size == (layout.width, layout.height)
        assert num_classes * layout.cell < image.width < 3000 and num_classes * layout.cell < image.height < 3000
        for t, p in [(0, 0), (num_classes - 1, num_classes - 1), (0, 1), (1, 0), (num_classes - 1, 0)]:
            x0, y0, x1, y1 = layout.cell_box(t, p)
            # Up to 30 classes the count sits at the centre, so sample beside it; above, the centre is bare.
            xy = ((x0 + x1) // 2, (y0 + y1) // 2) if num_classes > 30 else (x0 + 2, y0 + 2)
            dark = luminance(image, xy) < 100
            assert dark == (t == p), (t, p)
    assert not list(tmp_path.glob("sub/.*tmp*"))


def test_curve_png_draws_points_and_hline(tmp_path: Path) -> None:
    points = {"few-shot": [(1, 0.2), (2, 0.3), (4, 0.45), (8, 0.55), (16, 0.62)], "other": [(1, 0.9), (16, 0.95)]}
    hlines = {"zero-shot": 0.42}
    path = curve_png(points, tmp_path / "curve.png", x_label="shots", y_label="top-1", title="t", hlines=hlines)
    axes = curve_axes(points, hlines)
    assert axes.x_ticks == [1, 2, 4, 8, 16] and axes.y_range[0] <= 0.2 and axes.y_range[1] >= 0.95
    with Image.open(path) as image:
        image = image.convert("RGB")
        assert image.width > axes.box[2] and image.height > axes.box[3]
        assert image.getpixel((axes.x_pixel(4), axes.y_pixel(0.45))) == PALETTE[0]
        assert image.getpixel((axes.x_pixel(16), axes.y_pixel(0.95))) == PALETTE[1]
        row = [image.getpixel((x, axes.y_pixel(0.42))) for x in range(axes.box[0] + 1, axes.box[2])]
        assert row.count(PALETTE[2]) > 100
    with pytest.raises(UserError, match="log2"):
        curve_axes({"bad": [(0, 0.1)]})
    assert math.isclose(axes.x_pixel(2) - axes.x_pixel(1), axes.x_pixel(16) - axes.x_pixel(8), abs_tol=1)
