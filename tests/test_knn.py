"""Weighted kNN against a brute-force reference, on toy problems with known answers, and chunked."""

from __future__ import annotations

import math

import pytest
import torch

from sslcli.errors import UserError
from sslcli.evaluation.knn import knn_accuracy, knn_classify
from sslcli.evaluation.results import topk_accuracy


def reference_scores(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, k: int, temperature: float,
                     num_classes: int) -> torch.Tensor:
    """The InstDisc / DINO vote, one query at a time in float64, without any shortcut.

    Each neighbour votes ``exp(s / T)``; the result is divided by the query's largest weight,
    the normalisation ``knn_classify`` documents (it changes no class ranking).
    """
    train, test = train.double(), test.double()
    out = torch.zeros(test.shape[0], num_classes, dtype=torch.float64)
    for q in range(test.shape[0]):
        query = test[q] / test[q].norm()
        sims = [(float(query @ (train[i] / train[i].norm())), i) for i in range(train.shape[0])]
        sims.sort(key=lambda pair: -pair[0])
        top = sims[:k]
        for sim, i in top:
            out[q, int(train_y[i])] += math.exp(sim / temperature)
        out[q] /= math.exp(top[0][0] / temperature)
    return out


def blobs(n: int, num_classes: int, dim: int, *, seed: int, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234)) * 2
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return centres[labels] + noise * torch.randn(n, dim, generator=gen), labels


@pytest.mark.parametrize(("chunk_size", "memory_chunk_size"), [(1024, None), (7, 13), (1, 1)])
def test_matches_brute_force_reference(chunk_size: int, memory_chunk_size: int | None) -> None:
    train, train_y = blobs(50, 4, 8, seed=0, noise=2.0)
    test, _ = blobs(23, 4, 8, seed=1, noise=2.0)
    ks = [1, 5, 20, 50]  # 50 = the whole memory
    scores = knn_classify(train, train_y, test, k=ks, temperature=0.1, num_classes=4, chunk_size=chunk_size,
                          memory_chunk_size=memory_chunk_size)
    assert sorted(scores) == ks
    for k in ks:
        expected = reference_scores(train, train_y, test, k, 0.1, 4)
        assert scores[k].shape == (23, 4) and scores[k].dtype == torch.float32
        torch.testing.assert_close(scores[k].double(), expected, rtol=1e-4, atol=1e-5)


def test_chunked_equals_unchunked() -> None:
    train, train_y = blobs(300, 10, 16, seed=2, noise=3.0)
    test, _ = blobs(101, 10, 16, seed=3, noise=3.0)
    kwargs = dict(k=[10, 20, 200], temperature=0.07, num_classes=10)
    whole = knn_classify(train, train_y, test, chunk_size=10_000, **kwargs)
    for chunk, memory_chunk in [(16, None), (16, 64), (5, 7), (101, 299)]:
        parts = knn_classify(train, train_y, test, chunk_size=chunk, memory_chunk_size=memory_chunk, **kwargs)
        for k in whole:
            torch.testing.assert_close(parts[k], whole[k], rtol=1e-5, atol=1e-6)


def test_scale_of_features_does_not_matter() -> None:
    train, train_y = blobs(40, 3, 5, seed=4)
    test, _ = blobs(9, 3, 5, seed=5)
    a = knn_classify(train, train_y, test, k=7, num_classes=3)[7]
    b = knn_classify(train * 1e3, train_y, test * 1e-3, k=7, num_classes=3)[7]
    torch.testing.assert_close(a, b)


def test_toy_problem_with_known_accuracy() -> None:
    # Three classes on orthogonal axes; queries 0-1 sit on their own class, 2-3 on another one.
    train = torch.eye(3).repeat_interleave(2, dim=0)  # two items per class
    train_y = torch.tensor([0, 0, 1, 1, 2, 2])
    test = torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.1, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    test_y = torch.tensor([0, 2, 0, 1])
    acc = knn_accuracy(train, train_y, test, test_y, k=[1, 2], num_classes=3)
    assert acc[1] == {"top1": 0.5, "top5": 1.0}  # top-5 of 3 classes always hits
    assert acc[2] == {"top1": 0.5, "top5": 1.0}


def test_weights_decide_against_the_majority() -> None:
    # One very close neighbour of class 0 against two distant ones of class 1.
    train = torch.tensor([[1.0, 0.05], [0.5, 1.0], [0.5, -1.0]])
    train_y = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    sharp = knn_classify(train, train_y, test, k=3, temperature=0.07, num_classes=2)[3]
    flat = knn_classify(train, train_y, test, k=3, temperature=100.0, num_classes=2)[3]
    assert sharp.argmax().item() == 0
    assert flat.argmax().item() == 1
    assert sharp[0, 0].item() == pytest.approx(1.0)  # the nearest neighbour votes exactly 1


def test_small_temperature_does_not_overflow() -> None:
    train, train_y = blobs(30, 3, 4, seed=6)
    test, _ = blobs(5, 3, 4, seed=7)
    scores = knn_classify(train, train_y, test, k=10, temperature=1e-3, num_classes=3)[10]
    assert torch.isfinite(scores).all()


def test_topk_accuracy_by_hand() -> None:
    scores = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1
        [0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0],  # label 5: 5th best, top-5 only
        [0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0],  # label 6: last, neither
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # label 6: top-1
    ])
    assert topk_accuracy(scores, torch.tensor([0, 5, 6, 6])) == {"top1": 0.5, "top5": 0.75}


def test_bad_parameters() -> None:
    train, train_y = blobs(10, 2, 3, seed=8)
    with pytest.raises(UserError, match="k=11"):
        knn_classify(train, train_y, train, k=[5, 11], num_classes=2)
    with pytest.raises(UserError, match="temperature"):
        knn_classify(train, train_y, train, k=5, temperature=0.0, num_classes=2)
    with pytest.raises(ValueError, match="labels"):
        knn_classify(train, train_y - 1, train, k=5, num_classes=2)
