"""L-BFGS multinomial logistic regression on frozen features, and few-shot probe curves (CLIP).

The probe is the one CLIP fits on frozen features (sklearn's L-BFGS logistic regression): for
features ``x [n, D]``, labels ``y [n]``, weights ``W [D, C]`` and bias ``b [C]``,

    L(W, b) = (1 / n) sum_i -log softmax(x_i W + b)_{y_i} + (lambda / 2) ||W||_F^2

minimised full-batch with ``torch.optim.LBFGS`` (strong-Wolfe line search) in float64 from
zeros, so a fit is a deterministic function of its inputs.  The bias is not penalised.  sklearn's
``C`` corresponds to ``lambda = 1 / (C n)``.

Few-shot curves: for each shot count ``k`` and seed, :func:`balanced_shots` draws ``k`` training
samples per class, the features are standardised with that subset's mean and std,
``z = (x - mu) / sigma`` (tiny ``sigma`` replaced by 1), the probe is fitted, and top-1 on the
whole test split is recorded; the curve reports mean and std over seeds.  The fit is pluggable
(:data:`ShotProbe`), so ``sslcli linear-probe --shots`` runs the same loop with any probe protocol.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from sslcli.errors import UserError


def logistic_objective(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       weight_decay: float) -> torch.Tensor:
    """``L(W, b)``: mean cross-entropy of ``x [n, D] @ W [D, C] + b [C]`` plus ``lambda/2 ||W||^2``."""
    return F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, weight_decay: float = 1e-3,
                 max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 minimiser ``(W [D, C], b [C])`` of ``L`` on ``x [n, D]``, ``y [n]``.

    A class absent from ``y`` gets an ever more negative bias, bounded only by ``max_iter``.
    """
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise UserError(f"features {tuple(x.shape)} and labels {tuple(y.shape)} do not match; pass [n, D] and [n]")
    if weight_decay < 0 or max_iter < 1:
        raise UserError(f"weight decay {weight_decay} must be >= 0 and max_iter {max_iter} >= 1; fix the probe options")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise UserError(f"labels span {int(y.min())}..{int(y.max())}, outside 0..{num_classes - 1}; "
                        "pass the dataset's class count")
    x64, y = x.detach().double(), y.detach().long()
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    # Tight tolerances: float64 can resolve them, and a probe stopped early depends on max_iter.
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = logistic_objective(x64, y, weight, bias, weight_decay)
        loss.backward()
        return loss

    # L-BFGS's many tiny vector ops gain nothing from threads, and on a shared CPU (a busy cluster
    # node) OpenMP's spin-waiting made each 5k-element dot ~4000x slower (measured: 54 s vs 0.16 s).
    threads = torch.get_num_threads()
    if x.device.type == "cpu" and x.numel() < 1 << 22:
        torch.set_num_threads(1)
    try:
        optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    return weight.detach(), bias.detach()


def predict_logistic(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``argmax_c (x W + b)_c`` for ``x [m, D]``: LongTensor ``[m]``."""
    return (x.to(weight) @ weight + bias).argmax(1)


def balanced_shots(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """Sorted positions of exactly ``shots`` samples of every class present in ``labels [N]``.

    One seeded permutation is shared by all shot counts, so for a fixed seed the ``k``-shot subset
    contains the ``k'``-shot subset for ``k' < k`` and a curve over shots varies one thing at a time.
    """
    if shots < 1:
        raise UserError(f"shot count {shots} is not positive; pass --shots as positive integers such as 1,2,4,8,16")
    labels = labels.detach().cpu().long()
    classes, counts = labels.unique(return_counts=True)
    short = counts < shots
    if short.any():
        c = int(short.nonzero()[0, 0])
        raise UserError(f"class {int(classes[c])} has {int(counts[c])} training samples, fewer than {shots} shots; "
                        "pass smaller --shots")
    perm = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(seed))
    shuffled = labels[perm]
    picked = [perm[shuffled == c][:shots] for c in classes.tolist()]
    return torch.cat(picked).sort().values


def shots_for_curve(shots: Sequence[int]) -> list[int]:
    """The distinct shot counts, ascending, after checking they are positive integers."""
    if not shots:
        raise UserError("no shot counts given; pass --shots such as 1,2,4,8,16")
    for k in shots:
        if not isinstance(k, int) or k < 1:
            raise UserError(f"shot count {k!r} is not a positive integer; pass --shots such as 1,2,4,8,16")
    return sorted(set(shots))


def standardise(train: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(x - mu) / sigma`` of ``train [n, D]`` and of each ``[m, D]`` in ``others``, with the training rows'
    statistics; returns ``(train, *others)`` standardised.

    A feature constant on the few training rows (``sigma <= 1e-6 max sigma``, always at 1 shot of a
    feature shared by the classes) keeps ``sigma = 1``: dividing by ~0 would blow up its test values.
    """
    mu, sigma = feature_stats(train)
    return tuple((x - mu) / sigma for x in (train, *others))


def feature_stats(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu [D], sigma [D])`` of :func:`standardise`: population std, near-constant features at 1."""
    mu = train.mean(0)
    sigma = train.std(0, unbiased=False)
    return mu, torch.where(sigma <= 1e-6 * sigma.max(), torch.ones_like(sigma), sigma)


# A few-shot probe: (train_x [n, D], train_y [n], test_x [m, D], seed) -> predicted classes [m].
ShotProbe = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def lbfgs_probe(num_classes: int, *, weight_decay: float = 1e-3, max_iter: int = 200,
                standardize: bool = True) -> ShotProbe:
    """The default :data:`ShotProbe`: standardise with the shots' statistics, fit :func:`fit_logistic`
    in float64 (deterministic, so the seed is unused), predict."""

    def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, seed: int) -> torch.Tensor:
        x_train, x_test = train_x.detach().double(), test_x.detach().double()
        if standardize:
            x_train, x_test = standardise(x_train, x_test)
        weight, bias = fit_logistic(x_train, train_y, num_classes, weight_decay=weight_decay, max_iter=max_iter)
        return predict_logistic(x_test, weight, bias)

    return probe


def few_shot_curve(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   num_classes: int, shots: Sequence[int] = (1, 2, 4, 8, 16), seeds: Sequence[int] = (0, 1, 2), *,
                   weight_decay: float = 1e-3, max_iter: int = 200,
                   probe: ShotProbe | None = None) -> dict[str, dict[str, float | list[float]]]:
    """Test top-1 of the probe fitted on ``k`` samples per class, for every ``k`` in ``shots``.

    ``train_x [N, D]``, ``train_y [N]``, ``test_x [M, D]``, ``test_y [M]``.  ``probe`` fits and predicts
    (default: :func:`lbfgs_probe` with ``weight_decay`` and ``max_iter``); zero-shot and linear-probe
    share this loop.  Returns ``{str(k): {"mean": .., "std": .., "runs": [one accuracy per seed]}}`` in
    ascending ``k``; ``std`` is the sample standard deviation over seeds (0.0 with one seed).
    """
    if not seeds:
        raise UserError("no seeds given; pass at least one --seed")
    if test_x.ndim != 2 or test_y.shape != (test_x.shape[0],) or test_x.shape[0] == 0:
        raise UserError(f"test features {tuple(test_x.shape)} and labels {tuple(test_y.shape)} do not match; "
                        "pass [m, D] and [m]")
    probe = probe or lbfgs_probe(num_classes, weight_decay=weight_decay, max_iter=max_iter)
    train_y = train_y.to(train_x.device).long()
    test_y = test_y.long()
    curve: dict[str, dict[str, float | list[float]]] = {}
    for k in shots_for_curve(shots):
        runs = []
        for seed in seeds:
            idx = balanced_shots(train_y, k, seed).to(train_x.device)
            predicted = probe(train_x[idx], train_y[idx], test_x, seed)
            runs.append(float((predicted.cpu() == test_y.cpu()).double().mean()))
        std = statistics.stdev(runs) if len(runs) > 1 else 0.0
        curve[str(k)] = {"mean": statistics.fmean(runs), "std": std, "runs": runs}
    return curve
