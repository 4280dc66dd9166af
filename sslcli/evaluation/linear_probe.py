"""Linear probing: a linear classifier trained on frozen features, under a paper's protocol.

The backbone stays in eval mode and runs exactly once per image (no augmentation), so probes train on
cached features in seconds.  The protocols (``custom``, ``moco``, ``mae``, ``fast``) and their paper
sources are in :mod:`sslcli.evaluation.probe_protocols`; the heads in :mod:`sslcli.evaluation.probe_heads`.

- One probe: the head is trained on the train split and scored on the test split.
- A sweep (several lrs or weight decays): a seeded class-balanced ``val_fraction`` of the train split is
  held out, every head trains on the rest in one pass, the head with the best validation top-1 (ties:
  lowest validation cross-entropy) is reported, plus a table of every head's validation and test top-1.
- Few-shot (``shots``): per shot count ``k`` and seed, a probe on ``k`` train images per class, mean and
  sample std of test top-1 over seeds (:func:`sslcli.evaluation.logistic.few_shot_curve`, the loop
  ``sslcli zero-shot clip --shots`` uses too); the ``fast`` L-BFGS probe unless a protocol is named.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslcli import distributed as dist
from sslcli.data.reader import DataSource
from sslcli.errors import UserError
from sslcli.evaluation.feature_cache import FeatureCache
from sslcli.evaluation.features import LabelledFeatures, extract_labelled
from sslcli.evaluation.logistic import ShotProbe, few_shot_curve, lbfgs_probe, shots_for_curve
from sslcli.evaluation.probe_heads import HeadFit, LinearHead, fit_linear_head, fit_probe_heads, raise_if_diverged
from sslcli.evaluation.probe_protocols import DEFAULT_LR, ProbeSettings, resolve_protocol, validation_split
from sslcli.evaluation.results import topk_accuracy

__all__ = ["DEFAULT_LR", "LinearHead", "ProbeReport", "few_shot_probe", "fit_linear_head", "linear_probe",
           "probe_features", "resolve_probe", "state_fingerprint"]

DEFAULT_VAL_FRACTION = 0.1  # held out of the train split when a sweep needs to choose


@dataclass
class ProbeReport:
    """What a probe measured (``metrics``) and every setting it ran with (``params``, for the results file)."""

    metrics: dict[str, Any]
    params: dict[str, Any]


def state_fingerprint(module: nn.Module) -> dict[str, str]:
    """A digest of every parameter and buffer's bytes: equal digests mean bit-identical state."""
    out = {}
    for name, tensor in module.state_dict().items():
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        out[name] = f"{tensor.dtype}:{tuple(tensor.shape)}:{hashlib.blake2b(memoryview(data)).hexdigest()}"
    return out


@torch.no_grad()
def _scores(head: nn.Module, feats: torch.Tensor, device: torch.device | str, chunk: int = 4096) -> torch.Tensor:
    """Class scores ``[N, C]`` of ``head`` on ``feats [N, D]``, on the CPU, in chunks (bounded memory)."""
    return torch.cat([head(feats[i : i + chunk].to(device)).float().cpu() for i in range(0, feats.shape[0], chunk)])


def _as_values(value: float | Sequence[float] | None) -> list[float] | None:
    return None if value is None else [value] if isinstance(value, (int, float)) else list(value)


def _label(fit: HeadFit, settings: ProbeSettings) -> str:
    """A sweep table key naming what varies: ``lr=0.1``, ``wd=0.001`` or ``lr=0.1 wd=0.001``."""
    parts = []
    if len(settings.lrs) > 1:
        parts.append(f"lr={fit.lr}")
    if len(settings.weight_decays) > 1:
        parts.append(f"wd={fit.weight_decay}")
    return " ".join(parts)


def probe_features(feats: LabelledFeatures, settings: ProbeSettings, *, val_fraction: float | None = None,
                   device: torch.device | str = "cpu", seed: int = 0,
                   log: Callable[[str], None] | None = None) -> ProbeReport:
    """Trains the head(s) of ``settings`` on cached features and scores them (see the module docstring).

    ``val_fraction``: hold out that class-balanced fraction of the train rows (required for a sweep).
    Metrics: ``top1`` / ``top5`` on the test split, ``train_top1`` / ``train_loss`` on the probe's
    training rows; with a validation split ``val_top1`` / ``val_loss`` and the row counts; for a sweep
    ``sweep = {key: {lr, weight_decay, val_top1, val_loss, test_top1, train_loss}}`` (None: diverged).
    """
    if settings.is_sweep and not val_fraction:
        raise UserError("a sweep of several --lr / --weight-decay values chooses on a validation split; "
                        "pass --val-fraction between 0 and 1 (e.g. 0.1)")
    train_x, train_y = feats.train_x, feats.train_y
    val_x = val_y = None
    if val_fraction:
        train_rows, val_rows = validation_split(feats.train_y, val_fraction, seed)
        train_x, train_y, val_x, val_y = (feats.train_x[train_rows], feats.train_y[train_rows],
                                          feats.train_x[val_rows], feats.train_y[val_rows])
    fits = fit_probe_heads(train_x, train_y, num_classes=feats.num_classes, settings=settings, device=device, seed=seed)
    raise_if_diverged(fits)
    rows: list[tuple[HeadFit, dict[str, Any]]] = []
    for fit in fits:
        row: dict[str, Any] = {"lr": fit.lr, "weight_decay": fit.weight_decay, "val_top1": None, "val_loss": None,
                               "test_top1": None, "train_loss": None}
        if fit.diverged_epoch is None:
            row.update(train_loss=fit.train_loss, test_top1=topk_accuracy(_scores(fit.head, feats.test_x, device),
                                                                          feats.test_y, ks=(1,))["top1"])
            if val_x is not None and val_y is not None:
                val_scores = _scores(fit.head, val_x, device)
                row.update(val_top1=topk_accuracy(val_scores, val_y, ks=(1,))["top1"],
                           val_loss=float(F.cross_entropy(val_scores, val_y.long())))
        rows.append((fit, row))
        if log is not None and settings.is_sweep:
            log(f"{_label(fit, settings)}: " + ("diverged" if fit.diverged_epoch else
                                                f"val top1 {row['val_top1']:.4f}, test top1 {row['test_top1']:.4f}"))
    usable = [(fit, row) for fit, row in rows if fit.diverged_epoch is None]
    best, best_row = max(usable, key=lambda item: (item[1]["val_top1"] or 0.0, -(item[1]["val_loss"] or 0.0)))
    if log is not None:
        trained = f"{settings.epochs} epochs" if settings.solver == "minibatch" else "L-BFGS"
        log(f"linear head ({settings.protocol}, {trained}) final train loss {best.train_loss:.4f}")
    train_top1 = topk_accuracy(_scores(best.head, train_x, device), train_y, ks=(1,))["top1"]
    metrics: dict[str, Any] = {**topk_accuracy(_scores(best.head, feats.test_x, device), feats.test_y),
                               "train_top1": train_top1, "train_loss": best.train_loss}
    if val_x is not None:
        metrics.update(val_top1=best_row["val_top1"], val_loss=best_row["val_loss"], train_samples=train_x.shape[0],
                       val_samples=val_x.shape[0])
    if settings.is_sweep:
        metrics["sweep"] = {_label(fit, settings): row for fit, row in rows}
    params = settings.for_rows(train_x.shape[0]).as_params((best.lr, best.weight_decay))
    return ProbeReport(metrics, {**params, "val_fraction": val_fraction})


def few_shot_probe(feats: LabelledFeatures, settings: ProbeSettings, *, shots: Sequence[int], seeds: Sequence[int],
                   device: torch.device | str = "cpu") -> ProbeReport:
    """``metrics["few_shot"] = {str(k): {mean, std, runs}}``: test top-1 of a ``settings`` probe on ``k``
    train images per class, one run per seed (balanced, seeded draws; the head is seeded alike)."""
    if settings.is_sweep:
        raise UserError("--shots takes one --lr and one --weight-decay (a sweep would need a validation split "
                        "the few shots cannot spare)")
    def head_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, seed: int) -> torch.Tensor:
        fits = fit_probe_heads(train_x, train_y, num_classes=feats.num_classes, settings=settings, device=device,
                               seed=seed)
        raise_if_diverged(fits)
        return _scores(fits[0].head, test_x, device).argmax(1)

    probe: ShotProbe = head_probe
    if settings.solver == "lbfgs":
        probe = lbfgs_probe(feats.num_classes, weight_decay=settings.weight_decays[0], max_iter=settings.max_iter,
                            standardize=settings.standardize)
    curve = few_shot_curve(feats.train_x, feats.train_y, feats.test_x, feats.test_y, feats.num_classes,
                           shots=tuple(shots), seeds=tuple(seeds), probe=probe)
    return ProbeReport({"few_shot": curve}, {**settings.as_params(), "shots": sorted(set(shots)),
                                             "seeds": list(seeds)})


def resolve_probe(protocol: str | None, *, epochs: int | None = None, lr: float | Sequence[float] | None = None,
                  weight_decay: float | Sequence[float] | None = None, optimizer: str | None = None,
                  bn_head: bool | None = None, standardize: bool | None = None, batch_size: int | None = None,
                  val_fraction: float | None = None, shots: Sequence[int] = (),
                  seeds: int = 3) -> tuple[ProbeSettings, float | None]:
    """Checks a probe's options without touching data; returns its settings and validation fraction.

    The protocol defaults to ``fast`` with ``shots``, else ``custom``; ``val_fraction`` to 0.1 for a sweep.
    """
    settings = resolve_protocol(protocol or ("fast" if shots else "custom"), epochs=epochs, lr=_as_values(lr),
                                weight_decay=_as_values(weight_decay), optimizer=optimizer, batch_size=batch_size,
                                bn_head=bn_head, standardize=standardize)
    if shots:
        shots_for_curve(shots)
        if seeds < 1:
            raise UserError(f"--seeds must be at least 1, got {seeds}")
        if val_fraction is not None or settings.is_sweep:
            raise UserError("--shots trains each few-shot probe with one --lr / --weight-decay and no "
                            "--val-fraction; drop the sweep or the shots")
    elif val_fraction is None and settings.is_sweep:
        val_fraction = DEFAULT_VAL_FRACTION
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}; e.g. 0.1")
    return settings, val_fraction


def linear_probe(
    encoder: nn.Module,
    train_source: DataSource,
    test_source: DataSource,
    transform: Callable[[Any], torch.Tensor],
    *,
    protocol: str | None = None,
    epochs: int | None = None,
    lr: float | Sequence[float] | None = None,
    weight_decay: float | Sequence[float] | None = None,
    optimizer: str | None = None,
    bn_head: bool | None = None,
    standardize: bool | None = None,
    batch_size: int | None = None,
    val_fraction: float | None = None,
    shots: Sequence[int] = (),
    seeds: int = 3,
    device: torch.device | str = "cpu",
    seed: int = 0,
    num_workers: int = 0,
    log: Callable[[str], None] | None = None,
    cache: FeatureCache | None = None,
) -> ProbeReport:
    """Probes the frozen encoder's features of ``train_source`` / ``test_source`` (reused from ``cache`` if given).

    ``protocol``: ``custom`` (default), ``moco``, ``mae`` or ``fast`` (default with ``shots``); every
    other non-None option overrides the protocol's value.  ``lr`` / ``weight_decay`` may be lists (a
    sweep, choosing on ``val_fraction``, default 0.1, of the train split).  ``batch_size``: images per
    forward pass (default 256) and, when given, the probe's batch.  ``shots``: few-shot probes instead,
    ``seeds`` draws each (seeds ``seed .. seed + seeds - 1``).  Raises ``RuntimeError`` if the
    backbone's state changed at all during the probe.
    """
    settings, val_fraction = resolve_probe(protocol, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                           optimizer=optimizer, bn_head=bn_head, standardize=standardize,
                                           batch_size=batch_size, val_fraction=val_fraction, shots=shots, seeds=seeds)
    before = state_fingerprint(encoder)
    feats = extract_labelled(encoder, train_source, test_source, transform, batch_size=batch_size or 256,
                             device=device, num_workers=num_workers, log=log, cache=cache)

    def fit() -> ProbeReport:
        if shots:
            return few_shot_probe(feats, settings, shots=shots, seeds=range(seed, seed + seeds), device=device)
        return probe_features(feats, settings, val_fraction=val_fraction, device=device, seed=seed, log=log)

    report = dist.on_main(fit)  # under torchrun: extraction shared, the probe fitted once on rank 0
    after = state_fingerprint(encoder)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    if changed:
        raise RuntimeError(
            f"the frozen backbone changed during the linear probe ({len(changed)} tensors, e.g. {changed[:3]}); "
            "this is a bug in sslcli"
        )
    return report
