"""The one interface every pretraining method implements, and the method registry.

A method is an ``nn.Module`` built from an :class:`~sslcli.models.encoders.Encoder` plus its
keyword hyper-parameters (the recipe's ``method_args``).  The training loop only ever calls:

- ``before_epoch(epoch, dataset_features)`` before each epoch (DeepCluster's clustering);
- ``forward(views, batch) -> StepOutput`` with the loss to minimise;
- ``before_optimizer_step(progress)`` between backward (and clipping) and the optimiser step
  (DINO / SwAV cancel the gradients of a layer they keep frozen early in training);
- ``after_step(progress)`` after each optimiser step (EMA updates, queue bookkeeping);
- ``param_groups()`` once, to build the optimiser;
- ``backbone`` for evaluation, and ``export_backbone()`` for export (the backbone or a teacher's copy).
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from sslcli.engine.optim import param_groups
from sslcli.errors import UserError, suggest
from sslcli.models.encoders import Encoder


@dataclass
class StepOutput:
    """A step's loss, scalars to log, and the embeddings the collapse monitors watch.

    ``embedding`` is a ``[B, D]`` batch of the method's output embeddings (the projector's or
    head's output the loss is computed on, one view), detached by the consumer.
    """

    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)
    embedding: torch.Tensor | None = None


class Method(nn.Module, abc.ABC):
    name: ClassVar[str] = ""
    # False for a method that trains networks of its own instead of a timm backbone (the dVAE tokenizer):
    # it is built with ``encoder=None``, exports no encoder and writes its files in ``save_artifacts``.
    has_backbone: ClassVar[bool] = True

    def __init__(self, encoder: Encoder | None) -> None:
        super().__init__()
        self.backbone = encoder

    @abc.abstractmethod
    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        """One training step's loss from the augmented ``views`` (``[B, C, H, W]`` each)."""

    def track_progress(self, **schedules: Callable[[float], float]) -> None:
        """For a method whose ``forward`` depends on how far training is (DINO's teacher temperature,
        SwAV's queue start). The fraction done lives in a ``progress`` buffer, so checkpoints carry it
        and ``--resume`` restores it, mirrored in ``self.done`` on the host: reading it in ``forward``
        costs no device sync per step. ``after_step`` keeps both current with :meth:`record_progress`.

        Each ``name=fn`` in ``schedules`` adds a 0-dim float buffer ``self.<name>`` holding ``fn(progress)``,
        refreshed with the progress. ``forward`` reads scheduled values from these rather than computing them
        from ``self.done``: a Python float that changes every step is a constant to ``torch.compile``, which
        would recompile the step for each new value. The buffers are derived, so not saved; loading a
        checkpoint recomputes them from ``progress``."""
        self.register_buffer("progress", torch.zeros(()))
        self._schedules = schedules
        for name, fn in schedules.items():
            self.register_buffer(name, torch.tensor(float(fn(0.0))), persistent=False)
        self.done = 0.0
        self.register_load_state_dict_post_hook(lambda module, _: module.record_progress(float(module.progress)))

    def record_progress(self, progress: float) -> None:
        self.done = progress
        self.progress.fill_(progress)
        for name, fn in self._schedules.items():
            getattr(self, name).fill_(fn(progress))

    def before_epoch(self, epoch: int, dataset_features: Callable[[nn.Module], torch.Tensor]) -> list[nn.Parameter]:
        """Called before each epoch's data; returns parameters it re-initialised (their optimiser state
        is dropped).  ``dataset_features(module)`` gives ``module``'s outputs ``[N, D]`` on every training
        image (centre crop, eval mode, sample-index order): DeepCluster clusters them."""
        return []

    def before_optimizer_step(self, progress: float) -> None:
        """Called once gradients are final (after clipping), before the optimiser uses them;
        ``progress`` = fraction of training done before this step."""

    def after_step(self, progress: float) -> None:
        """Called after each optimiser step with ``progress`` = fraction of training done."""

    def param_groups(self) -> list[dict]:
        return param_groups(self)

    def describe(self) -> dict[str, str]:
        """Run-time facts worth logging once (e.g. which Shuffle-BN mode is active)."""
        return {}

    def extra_fields(self) -> dict[str, int]:
        """Sample fields beyond the image (e.g. ``{"depth.png": 1}``, field -> channels) that the
        loader crops and flips with the image and appends to ``views`` (see ``augment.MultiView``)."""
        return {}

    def export_backbone(self) -> Encoder | None:
        """The backbone written to ``encoder.safetensors``: ``self.backbone``, or an EMA teacher's copy
        for a method that offers it on request (DINO's ``export: teacher``, what its paper evaluates);
        None for a method without one."""
        return self.backbone

    def save_artifacts(self, out: Path) -> None:
        """Writes files of the run beyond ``encoder.safetensors`` into run directory ``out`` (each epoch, rank 0):
        the dVAE's ``tokenizer.safetensors``."""

    def export_metadata(self) -> dict[str, Any]:
        """Entries overriding the recipe's in the exported backbone's metadata, for a backbone that
        does not take the normalised RGB image (CMC: ``input_space`` ``lab_l`` and its mean/std)."""
        return {}


METHODS: dict[str, type[Method]] = {}
M = TypeVar("M", bound=type[Method])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator adding a method to the registry under ``name``."""
    def decorate(cls: M) -> M:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorate


def describe_method(cls: type[Method]) -> str:
    """One line: the first paragraph of the class docstring, else of its module's (the paper's title)."""
    doc = cls.__doc__ if cls.__doc__ and cls.__doc__ is not Method.__doc__ else inspect.getmodule(cls).__doc__
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def get_method(name: str) -> type[Method]:
    import sslcli.methods  # noqa: F401 - importing the package registers every method

    if name not in METHODS:
        raise UserError(f"unknown method '{name}'{suggest(name, METHODS)}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# Facts about the run, not recipe settings: a method asks for one by naming it in ``__init__``.
# num_samples: training-set size, for memory banks with one row per image; augment: the run's
# AugmentConfig, for a method that works on the views' pixels (CMC un-normalises them to Lab);
# epochs: the run's length, for settings given in epochs (DINO's frozen last layer, SwAV's queue
# start) that the method compares with ``progress * epochs``; captions: a function returning the training
# captions (an iterable of str), for a tokenizer built from the data (CLIP); absent when a run is rebuilt
# from its checkpoint, whose state dict then supplies what was built.
RUNTIME_ARGS = ("num_samples", "augment", "epochs", "captions")


def hyperparameters(cls: type[Method]) -> dict[str, Any]:
    """The method's keyword hyper-parameters and their defaults (from ``__init__``)."""
    sig = inspect.signature(cls.__init__)
    skip = ("self", "encoder", *RUNTIME_ARGS)
    return {n: p.default for n, p in sig.parameters.items() if n not in skip}


def check_method_args(name: str, method_args: dict[str, Any]) -> type[Method]:
    """The method's class, after checking ``method_args`` names only its hyper-parameters."""
    cls = get_method(name)
    known = hyperparameters(cls)
    for key in method_args:
        if key not in known:
            raise UserError(
                f"unknown config key 'method_args.{key}' for {name}{suggest(key, known)}; "
                f"valid: {', '.join(known)}"
            )
    return cls


def build_method(name: str, encoder: Encoder, method_args: dict[str, Any], *, num_samples: int | None = None,
                 augment: Any = None, epochs: int | None = None,
                 captions: Callable[[], Iterable[str]] | None = None) -> Method:
    """``name``'s method on ``encoder``; runtime facts reach methods whose ``__init__`` asks for them.

    A runtime argument the method declares without a default must be given (not None).
    """
    cls = check_method_args(name, method_args)
    runtime = {"num_samples": num_samples, "augment": augment, "epochs": epochs, "captions": captions}
    params = inspect.signature(cls.__init__).parameters
    wanted = {k: v for k, v in runtime.items() if k in params}
    required = [k for k, v in wanted.items() if v is None and params[k].default is inspect.Parameter.empty]
    if required:
        raise ValueError(f"method {name} needs {sorted(required)} to be built")
    return cls(encoder, **method_args, **{k: v for k, v in wanted.items() if v is not None})
