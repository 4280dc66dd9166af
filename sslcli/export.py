"""Backbone weights as safetensors with timm-compatible keys and self-describing metadata.

The file loads into timm without sslcli::

    meta = safetensors.safe_open(path, "pt").metadata()
    model = timm.create_model(meta["timm_name"], num_classes=0, **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(safetensors.torch.load_file(path), strict=True)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import sslcli
from sslcli.errors import UserError
from sslcli.models.encoders import Encoder, EncoderSpec
from sslcli.weights_file import read_header, write_weights

FORMAT = "sslcli-encoder/1"


def encoder_metadata(encoder: Encoder, *, method: str, image_size: int, mean: tuple[float, ...],
                     std: tuple[float, ...], epochs: int, **extra: Any) -> dict[str, str]:
    meta = {
        "format": FORMAT, "sslcli_version": sslcli.__version__, "method": method, "arch": encoder.spec.arch,
        "timm_name": encoder.spec.timm_name, "timm_kwargs": json.dumps(encoder.spec.timm_kwargs),
        "image_size": str(image_size), "mean": json.dumps(list(mean)), "std": json.dumps(list(std)),
        "epochs": str(epochs), "feature_dim": str(encoder.dim),
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def save_encoder(encoder: Encoder, path: Path, metadata: dict[str, str]) -> Path:
    """Writes the backbone (timm keys, contiguous CPU tensors) atomically."""
    return write_weights(encoder.model.state_dict(), path, metadata)


def read_metadata(path: Path | str) -> dict[str, str]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"weights file '{path}' does not exist; pass a run directory or an exported .safetensors file")
    return read_header(path, FORMAT, "has no sslcli encoder metadata; export it with `sslcli export RUN --out FILE`")


def load_encoder(path: Path | str, expect_arch: str | None = None) -> tuple[Encoder, dict[str, str]]:
    """Rebuilds the backbone recorded in ``path``'s metadata and loads its weights strictly."""
    path = Path(path)
    meta = read_metadata(path)
    if expect_arch is not None and expect_arch != meta["arch"]:
        raise UserError(f"'{path}' holds a {meta['arch']} encoder, not {expect_arch}; drop --arch or pass matching weights")
    spec = EncoderSpec(arch=meta["arch"], timm_name=meta["timm_name"], timm_kwargs=json.loads(meta["timm_kwargs"]))
    encoder = Encoder(spec)
    state = load_file(str(path))
    own = encoder.model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or misshaped:
        raise UserError(
            f"weights in '{path}' do not fit {meta['arch']} ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(misshaped)} mis-shaped tensors); re-export the run or pass matching weights"
        )
    encoder.model.load_state_dict(state, strict=True)
    return encoder, meta


def state_to_tensor_dict(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The sub-dict of ``state`` under ``prefix`` (e.g. ``'backbone.model.'``), prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def export_run(run: Path, out: Path, *, overwrite: bool = False, keep_proj_layers: int = 0) -> Path:
    """Writes the backbone of a run's latest checkpoint (or of a checkpoint file) to ``out``.

    ``keep_proj_layers > 0`` also writes the projector's first layers to :func:`projector_path`
    (SimCLR v2's fine-tuning start), leaving ``out`` a plain timm backbone.
    """
    from sslcli.config import PretrainConfig, from_dict
    from sslcli.engine import checkpoint
    from sslcli.methods import get_method
    from sslcli.models.encoders import resolve_arch
    from sslcli.runs import run_checkpoint

    run = Path(run)
    ckpt = run_checkpoint(run, "export takes the backbone from a checkpoint")
    for path in [out, projector_path(out)] if keep_proj_layers else [out]:
        if path.exists() and not overwrite:
            raise UserError(f"'{path}' already exists; pass --overwrite to replace it or choose another --out")
    # Checked first, so a bad --keep-proj-layers leaves no half-written export behind.
    projector = run_projector(run, keep_proj_layers) if keep_proj_layers else None
    state = checkpoint.load(ckpt)
    cfg: PretrainConfig = from_dict(PretrainConfig, state["config"])
    if not get_method(cfg.method).has_backbone:
        raise UserError(f"'{run}' is a {cfg.method} run, which trains no backbone to export; its product is the "
                        "tokenizer.safetensors in the run directory")
    exported = state.get("export") or {}  # a backbone other than plain cfg.arch (CMC's L encoder)
    spec = (EncoderSpec(**exported["spec"]) if "spec" in exported
            else resolve_arch(cfg.arch, img_size=cfg.augment.eval_size))
    encoder = Encoder(spec)
    weights = state_to_tensor_dict(state["model"], f"{exported.get('module', 'backbone')}.model.")
    encoder.model.load_state_dict(weights, strict=True)
    meta = encoder_metadata(encoder, method=cfg.method, image_size=cfg.augment.eval_size, mean=cfg.augment.mean,
                            std=cfg.augment.std, epochs=int(state["epoch"]) + 1,
                            eval_crop_pct=str(cfg.augment.eval_crop_pct), checkpoint=ckpt.name,
                            proj_layers=str(keep_proj_layers))
    if projector is not None:
        save_projector(projector, encoder.dim, projector_path(out))
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in exported.get("metadata", {}).items()})
    return save_encoder(encoder, Path(out), meta)


# SimCLR v2 fine-tunes from the projector's first layer.  The kept layers travel in a sidecar file
# next to the encoder, so the encoder file itself still loads into timm with strict=True.
PROJECTOR_FORMAT = "sslcli-projector/1"


def projector_path(encoder_path: Path | str) -> Path:
    """``encoder.safetensors`` -> ``encoder.proj.safetensors``."""
    path = Path(encoder_path)
    return path.with_name(f"{path.name.removesuffix('.safetensors')}.proj.safetensors")


def kept_projector(head: torch.nn.Sequential, layers: int) -> torch.nn.Sequential:
    """The first ``layers`` ``Linear(-Norm)(-Act)`` blocks of ``head``, as a flat Sequential (shared weights)."""
    from sslcli.models.heads import head_blocks

    blocks = head_blocks(head)
    if not 1 <= layers <= len(blocks):
        raise UserError(f"--keep-proj-layers {layers} does not fit a {len(blocks)}-layer projector; "
                        f"choose 1..{len(blocks)}")
    return torch.nn.Sequential(*[m for block in blocks[:layers] for m in block])


def save_projector(head: torch.nn.Sequential, in_dim: int, path: Path) -> Path:
    """Writes ``head`` with its layer list in the header, so :func:`load_projector` rebuilds it by data."""
    from sslcli.models.heads import describe_layers

    meta = {"format": PROJECTOR_FORMAT, "in_dim": str(in_dim), "layers": json.dumps(describe_layers(head))}
    return write_weights(head.state_dict(), path, meta)


def load_projector(path: Path) -> torch.nn.Sequential:
    """The projector layers saved by :func:`save_projector`."""
    from sslcli.models.heads import build_mlp

    meta = read_header(path, PROJECTOR_FORMAT,
                       "is not an sslcli projector file; export it with `sslcli export RUN --keep-proj-layers N`")
    head = build_mlp(int(meta["in_dim"]), [tuple(layer) for layer in json.loads(meta["layers"])])
    head.load_state_dict(load_file(str(path)), strict=True)
    return head


def run_projector(run: Path, layers: int) -> torch.nn.Sequential:
    """The first ``layers`` blocks of the projector of a run's latest checkpoint (or of a .pt checkpoint)."""
    from sslcli.config import PretrainConfig, from_dict
    from sslcli.engine import checkpoint
    from sslcli.runs import build_run_method, run_checkpoint

    state = checkpoint.load(run_checkpoint(run, "a projector is taken from a checkpoint"))
    cfg: PretrainConfig = from_dict(PretrainConfig, state["config"])
    method = build_run_method(cfg)
    head = getattr(method, "projector", None)
    if not isinstance(head, torch.nn.Sequential):
        raise UserError(f"method {cfg.method} has no projector to keep; drop --keep-proj-layers "
                        "(SimCLR and SimCLR v2 have one)")
    head.load_state_dict(state_to_tensor_dict(state["model"], "projector."), strict=True)
    return kept_projector(head, layers)
