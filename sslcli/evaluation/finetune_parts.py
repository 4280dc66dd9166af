"""What fine-tuning trains on and keeps: label subsets, the validation part, drop-path, the best epoch.

- :func:`labelled_parts`: a seeded, class-balanced fraction of the train split's labels (the 1% / 10%
  semi-supervised protocol) and a held-out, class-balanced validation part, both as restricted
  :class:`DataSource` views: nothing is written.
- :func:`with_drop_path`: the same backbone rebuilt with timm's stochastic depth.
- :class:`BestEpoch`: validation accuracy every N epochs; the best epoch's classifier on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslcli import distributed as dist
from sslcli.data.reader import DataSource
from sslcli.data.subset import balanced_subset, select_samples, split_labels
from sslcli.errors import UserError
from sslcli.evaluation.finetune import evaluate_classifier
from sslcli.models.classifier import Classifier, load_classifier, save_classifier
from sslcli.models.encoders import Encoder


def labelled_parts(train: DataSource, *, label_fraction: float | None, val_fraction: float | None,
                   seed: int) -> tuple[DataSource, DataSource | None]:
    """``(part to train on, validation part or None)`` of the train split.

    ``label_fraction`` keeps ``round(f * n_c)`` (at least one) images of every class ``c``, drawn as
    ``sslcli data subset --fraction f --seed SEED`` draws them (the same images).  ``val_fraction`` then
    holds out a class-balanced fraction of those labelled images, so validation costs no extra labels;
    every class must keep at least one image to train on.
    """
    if label_fraction is None and val_fraction is None:
        return train, None
    if label_fraction is not None and not 0 < label_fraction <= 1:
        raise UserError(f"--label-fraction must be in (0, 1], got {label_fraction}; e.g. 0.01 for 1% of the labels")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be in (0, 1), got {val_fraction}; e.g. 0.1")
    indices, labels = split_labels(train)
    if label_fraction is not None:
        chosen = balanced_subset(labels, label_fraction, seed)
        indices, labels = indices[chosen], labels[chosen]
    if val_fraction is None:
        return select_samples(train, indices), None
    held = np.zeros(len(indices), dtype=bool)
    held[balanced_subset(labels, val_fraction, seed)] = True
    emptied = sorted(set(labels.tolist()) - set(labels[~held].tolist()))
    if emptied:
        raise UserError(f"--val-fraction {val_fraction} leaves class {emptied[0]} without a training image "
                        f"({int((labels == emptied[0]).sum())} labelled); lower --val-fraction or use more labels")
    return select_samples(train, indices[~held]), select_samples(train, indices[held])


def with_drop_path(encoder: Encoder, rate: float) -> Encoder:
    """``encoder`` rebuilt with timm's ``drop_path_rate`` (stochastic depth rising linearly over the blocks
    to ``rate``), weights copied: drop-path adds no parameters, so the state dict loads strictly."""
    spec = replace(encoder.spec, timm_kwargs={**encoder.spec.timm_kwargs, "drop_path_rate": rate})
    with torch.random.fork_rng(devices=[]):  # the throwaway random init must not move the caller's RNG
        try:
            rebuilt = Encoder(spec)
        except TypeError:
            raise UserError(f"{encoder.spec.arch} has no drop-path (timm takes no drop_path_rate for it); "
                            "drop --drop-path") from None
    rebuilt.model.load_state_dict(encoder.model.state_dict(), strict=True)
    return rebuilt


class BestEpoch:
    """``after_epoch`` hook of :func:`~sslcli.evaluation.finetune.train_classifier`: top-1 on ``val`` every
    ``every`` epochs and after the ``last``; the best epoch's classifier (highest validation top-1, the
    earliest on ties) is written to ``path`` (atomically, as every weights file).

    Under torchrun every process runs the hook: the processes share the validation split and all see its
    metrics, so they agree on the best epoch; rank 0 alone writes ``path``, which every process reads back
    in :meth:`test_metrics` (so ``path`` must be on a file system they all see, as a pretraining run's is)."""

    def __init__(self, val: DataSource, transform: Callable[[Any], torch.Tensor], path: Path,
                 meta: dict[str, str], *, every: int, last: int, device: torch.device, num_workers: int = 0,
                 log: Callable[[str], None] = print) -> None:
        self.val, self.transform, self.path, self.meta = val, transform, path, meta
        self.every, self.last, self.device, self.num_workers, self.log = every, last, device, num_workers, log
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] | None = None

    def __call__(self, epoch: int, model: Classifier) -> None:
        if epoch % self.every and epoch != self.last:
            return
        metrics = evaluate_classifier(model, self.val, self.transform, device=self.device,
                                      num_workers=self.num_workers)
        self.history.append({"epoch": epoch, **metrics})
        improved = self.best is None or metrics["top1"] > self.best["top1"]
        if improved:
            self.best = {"epoch": epoch, **metrics}
            dist.on_main(lambda: save_classifier(model, self.path, {**self.meta, "epoch": str(epoch)}))
        self.log(f"epoch {epoch}: validation top-1 {metrics['top1']:.1%}{' (best so far)' if improved else ''}")

    def test_metrics(self, test: DataSource, transform: Callable[[Any], torch.Tensor], *, device: torch.device,
                     num_workers: int, last: dict[str, float]) -> dict[str, Any]:
        """The best epoch, its validation top-1 / top-5, and its classifier's test metrics (``last``'s, the
        final epoch's test metrics, when the final epoch is the best)."""
        if self.best is None:
            raise RuntimeError("no validation ran: train_classifier did not call the hook")
        if self.best["epoch"] == self.last:
            tested = last
        else:
            model, _ = load_classifier(self.path)
            tested = evaluate_classifier(model, test, transform, device=device, num_workers=num_workers)
        return {"epoch": int(self.best["epoch"]), "val_top1": self.best["top1"], "val_top5": self.best["top5"],
                **{k: tested[k] for k in ("top1", "top5", "loss")}}
