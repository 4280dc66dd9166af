"""Rebuilding a pretraining run's method (heads, decoder and all) from its checkpoint, for the commands
that need more than the exported backbone (``reconstruct``, ``export --keep-proj-layers``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sslcli.config import PretrainConfig, from_dict
from sslcli.engine import checkpoint
from sslcli.errors import UserError
from sslcli.methods.base import Method, build_method, check_method_args
from sslcli.models.encoders import Encoder, create_encoder


@dataclass
class LoadedRun:
    method: Method
    config: PretrainConfig
    checkpoint: Path
    epochs_done: int


def run_encoder(cfg: PretrainConfig) -> Encoder | None:
    """The backbone ``pretrain`` builds for ``cfg`` (None for a method without one, the dVAE): multi-crop
    views of several sizes make a ViT interpolate its positional embeddings to each one (the weights are
    the same either way)."""
    if not check_method_args(cfg.method, cfg.method_args).has_backbone:
        return None
    return create_encoder(cfg.arch, img_size=cfg.augment.eval_size, any_size=len({v.size for v in cfg.augment.views}) > 1)


def run_checkpoint(source: Path, needed_for: str) -> Path:
    """The latest checkpoint of run directory ``source``, or ``source`` itself if it is a file."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"'{source}' does not exist; pass a run directory written by `sslcli pretrain` or one of its "
                        f"checkpoints/epoch-NNNN.pt files ({needed_for})")
    ckpt = source if source.is_file() else checkpoint.latest(source / "checkpoints")
    if ckpt is None:
        raise UserError(f"'{source}' has no checkpoints ({needed_for}); train it with `sslcli pretrain ... "
                        f"--out {source}` first")
    return ckpt


def build_run_method(cfg: PretrainConfig) -> Method:
    """``cfg``'s method at initialisation (runtime facts such as a memory bank's size set to 1)."""
    return build_method(cfg.method, run_encoder(cfg), cfg.method_args, num_samples=1, augment=cfg.augment,
                        epochs=cfg.epochs)


def load_run(source: Path, needed_for: str, expect: type[Method] = Method, wrong_method: str = "") -> LoadedRun:
    """The method of a run's latest checkpoint (or of a checkpoint file), in eval mode on the CPU.

    A run whose method is not an ``expect`` is refused before anything is built: ``'SOURCE' is a M run;
    {wrong_method}``."""
    ckpt = run_checkpoint(source, needed_for)
    state = checkpoint.load(ckpt)
    cfg: PretrainConfig = from_dict(PretrainConfig, state["config"])
    if not issubclass(check_method_args(cfg.method, cfg.method_args), expect):
        raise UserError(f"'{source}' is a {cfg.method} run; {wrong_method}")
    method = build_run_method(cfg)
    try:
        method.load_state_dict(state["model"], strict=True)
    except RuntimeError as err:
        raise UserError(f"'{ckpt}' does not match the {cfg.method} model its config describes "
                        f"({str(err).splitlines()[0]}); it was written by another sslcli version") from None
    return LoadedRun(method.eval(), cfg, ckpt, int(state["epoch"]) + 1)
