"""Linear-probe protocols of the papers, resolved into one :class:`ProbeSettings`, and the validation split.

=========  ===========================================================================================
protocol   settings (every value can be overridden by an explicit option)
=========  ===========================================================================================
custom     sslcli's default: features standardised on the train split, SGD (momentum 0.9) at lr 0.1
           (AdamW 1e-3; LARS 0.1 x batch/256), wd 0, batch 256, 100 epochs, per-step cosine decay.
moco       MoCo v1 (He et al., 2020, Sec. 4.1; facebookresearch/moco ``main_lincls.py``), also used by
           MoCo v2: raw (unstandardised) features, SGD momentum 0.9, lr 30, wd 0, batch 256, 100 epochs,
           lr x 0.1 at epochs 60 and 80 (the step schedule).
mae        MAE (He et al., 2022, App. A.2, Table 10): ``BatchNorm1d(affine=False, eps=1e-6)`` before the
           linear layer on raw features, LARS (momentum 0.9, trust ratio on the weight matrix even at
           wd 0), lr = 0.1 x batch / 256, wd 0, batch 16384 (at most the number of train rows),
           90 epochs, 10 of them linear warm-up, then cosine decay to 0.
fast       CLIP's probe (Radford et al., 2021, App. A.3): L-BFGS multinomial logistic regression
           (:mod:`sslcli.evaluation.logistic`) on standardised features, ``lambda = --weight-decay``
           (default 1e-3), full batch, 200 iterations at most.  No epochs, lr, optimizer or BN head.
=========  ===========================================================================================

An explicit ``--lr`` is always the peak learning rate itself, for every protocol (no batch scaling).
Another ``--epochs`` keeps the schedule's shape: warm-up and step milestones stay at the same fractions
(MAE: the first 1/9 warms up; MoCo: x 0.1 at 60% and 80%).
Several ``--lr`` / ``--weight-decay`` values make a sweep: one head per ``(lr, weight decay)`` pair.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sslcli.data.subset import balanced_subset
from sslcli.errors import UserError

Solver = Literal["minibatch", "lbfgs"]
OPTIMIZERS = ("sgd", "adamw", "lars")
# custom's peak lr per optimizer on standardised features (AdamW's steps are already normalised);
# LARS's is the base lr of the batch/256 rule, as in MAE.
DEFAULT_LR: dict[str, float] = {"sgd": 0.1, "adamw": 1e-3, "lars": 0.1}
FAST_WEIGHT_DECAY = 1e-3  # logistic.py's default lambda, the one CLIP's few-shot probes use
MOMENTUM = 0.9


@dataclass(frozen=True)
class Protocol:
    """A paper's documented defaults.  ``warmup`` and ``milestones`` (step schedule) are fractions of the
    epochs, so the schedule keeps its shape when ``--epochs`` changes."""

    solver: Solver
    optimizer: str
    lr: float  # for lr_scaling "linear": the base lr of a batch of 256
    lr_scaling: Literal["none", "linear"]
    weight_decay: float
    epochs: int
    batch_size: int
    warmup: float
    schedule: Literal["cosine", "step"]
    milestones: tuple[float, ...]
    bn_head: bool
    standardize: bool
    source: str


PROTOCOLS: dict[str, Protocol] = {
    "custom": Protocol("minibatch", "sgd", 0.1, "none", 0.0, 100, 256, 0.0, "cosine", (), False, True, "sslcli"),
    "moco": Protocol("minibatch", "sgd", 30.0, "none", 0.0, 100, 256, 0.0, "step", (0.6, 0.8), False, False,
                     "MoCo v1 (He et al., 2020), Sec. 4.1"),
    "mae": Protocol("minibatch", "lars", 0.1, "linear", 0.0, 90, 16384, 10 / 90, "cosine", (), True, False,
                    "MAE (He et al., 2022), App. A.2, Table 10"),
    "fast": Protocol("lbfgs", "lbfgs", 0.0, "none", FAST_WEIGHT_DECAY, 0, 0, 0.0, "cosine", (), False, True,
                     "CLIP (Radford et al., 2021), App. A.3"),
}


@dataclass(frozen=True)
class ProbeSettings:
    """Every value a probe runs with.  ``lrs`` / ``weight_decays`` hold one value, or several for a sweep."""

    protocol: str
    solver: Solver
    optimizer: str
    lrs: tuple[float, ...]  # empty for the L-BFGS solver
    weight_decays: tuple[float, ...]
    epochs: int
    batch_size: int
    warmup_epochs: float
    schedule: Literal["cosine", "step"]
    milestones: tuple[float, ...]  # in epochs
    bn_head: bool
    standardize: bool
    max_iter: int = 200
    explicit_lr: bool = False  # False: lrs follow the protocol's rule and move with batch_size

    @property
    def grid(self) -> list[tuple[float | None, float]]:
        """``(lr, weight decay)`` of every head: the product of the two lists (lr None for L-BFGS)."""
        lrs: Sequence[float | None] = self.lrs or (None,)
        return [(lr, wd) for lr in lrs for wd in self.weight_decays]

    @property
    def is_sweep(self) -> bool:
        return len(self.grid) > 1

    def for_rows(self, num_rows: int) -> ProbeSettings:
        """These settings on ``num_rows`` training rows: the batch is at most ``num_rows`` (MAE's 16384 on a
        small set is the whole set), and a rule-based lr is recomputed for that batch."""
        if self.solver == "lbfgs" or self.batch_size <= num_rows:
            return self
        return _with_rule_lr(dataclasses.replace(self, batch_size=max(num_rows, 1)))

    def as_params(self, chosen: tuple[float | None, float] | None = None) -> dict[str, Any]:
        """The settings for a results file; ``chosen``: the head reported (default the only one)."""
        lr, wd = chosen if chosen is not None else self.grid[0]
        params: dict[str, Any] = {"protocol": self.protocol, "optimizer": self.optimizer}
        if self.solver == "minibatch":
            params.update(lr=lr, epochs=self.epochs, batch_size=self.batch_size, momentum=MOMENTUM,
                          schedule=self.schedule, warmup_epochs=self.warmup_epochs, bn_head=self.bn_head)
            if self.schedule == "step":
                params.update(milestones=list(self.milestones), gamma=0.1)
        else:
            params["max_iter"] = self.max_iter
        params.update(weight_decay=wd, standardize=self.standardize)
        if len(self.lrs) > 1:
            params["lr_sweep"] = list(self.lrs)
        if len(self.weight_decays) > 1:
            params["weight_decay_sweep"] = list(self.weight_decays)
        return params


def _with_rule_lr(settings: ProbeSettings) -> ProbeSettings:
    """Recomputes a protocol lr that scales with the batch (LARS / MAE); explicit lrs stay as given."""
    if settings.explicit_lr or settings.solver == "lbfgs":
        return settings
    proto = PROTOCOLS[settings.protocol]
    scaling, base = proto.lr_scaling, proto.lr
    if settings.protocol == "custom":
        base = DEFAULT_LR[settings.optimizer]
        scaling = "linear" if settings.optimizer == "lars" else "none"
    lr = base * settings.batch_size / 256 if scaling == "linear" else base
    return dataclasses.replace(settings, lrs=(lr,))


def _positive_floats(values: Sequence[float] | None, option: str, *, allow_zero: bool) -> tuple[float, ...] | None:
    if values is None:
        return None
    if len(values) == 0:
        raise UserError(f"{option} got an empty list; pass one value or several separated by commas")
    for value in values:
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            need = "non-negative" if allow_zero else "positive"
            raise UserError(f"{option} values must be finite and {need}, got {value}")
    return tuple(dict.fromkeys(float(v) for v in values))  # a repeated value would only train a duplicate head


def resolve_protocol(
    name: str,
    *,
    epochs: int | None = None,
    lr: Sequence[float] | None = None,
    weight_decay: Sequence[float] | None = None,
    optimizer: str | None = None,
    batch_size: int | None = None,
    bn_head: bool | None = None,
    standardize: bool | None = None,
    num_train: int | None = None,
) -> ProbeSettings:
    """The protocol ``name``'s settings with every explicit (non-None) option put over them.

    ``num_train``: the probe's training rows, which cap the batch (see :meth:`ProbeSettings.for_rows`).
    """
    if name not in PROTOCOLS:
        raise UserError(f"unknown --protocol '{name}'; use one of {', '.join(PROTOCOLS)}")
    proto = PROTOCOLS[name]
    lrs = _positive_floats(lr, "--lr", allow_zero=False)
    wds = _positive_floats(weight_decay, "--weight-decay", allow_zero=True)
    if proto.solver == "lbfgs":
        given = [flag for flag, value in (("--lr", lr), ("--epochs", epochs), ("--optimizer", optimizer),
                                          ("--bn-head", bn_head)) if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} does not apply to --protocol fast (one L-BFGS fit on all "
                            "train features; sweep --weight-decay instead); drop it or pick another --protocol")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer '{optimizer}'; use one of {', '.join(OPTIMIZERS)}")
    if epochs is not None and epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {epochs}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    epochs = proto.epochs if epochs is None else epochs
    settings = ProbeSettings(
        protocol=name, solver=proto.solver, optimizer=optimizer or proto.optimizer,
        lrs=lrs or (), weight_decays=wds or (proto.weight_decay,), epochs=epochs,
        batch_size=proto.batch_size if batch_size is None else batch_size,
        warmup_epochs=round(proto.warmup * epochs, 6), schedule=proto.schedule,
        milestones=tuple(round(f * epochs, 6) for f in proto.milestones),
        bn_head=proto.bn_head if bn_head is None else bn_head,
        standardize=proto.standardize if standardize is None else standardize,
        explicit_lr=lrs is not None,
    )
    settings = _with_rule_lr(settings) if proto.solver == "minibatch" else settings
    return settings.for_rows(num_train) if num_train is not None else settings


def validation_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train rows, validation rows)`` of ``labels [N]``: a seeded, class-balanced ``fraction`` of every
    class (``round(fraction * n_c)``, at least 1, by :func:`sslcli.data.subset.balanced_subset`) is held
    out, so hyper-parameters are chosen without looking at the test split."""
    if not 0 < fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {fraction}; e.g. 0.1")
    labels = labels.detach().cpu().long()
    val = torch.from_numpy(balanced_subset(labels.numpy(), fraction, seed)).long()
    held = torch.zeros(labels.shape[0], dtype=torch.bool)
    held[val] = True
    train = (~held).nonzero().flatten()
    missing = sorted(set(labels.unique().tolist()) - set(labels[train].unique().tolist()))
    if missing:
        count = int((labels == missing[0]).sum())
        raise UserError(f"class {missing[0]} has {count} train sample(s): holding out --val-fraction {fraction} "
                        "leaves none to train on; use a larger train split or a single --lr / --weight-decay")
    return train, val
